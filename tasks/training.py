"""The training stages: ``sft-cot``, ``sft-colar`` and ``sft-nocot`` (one task, three configs), ``rl``, and
the baselines ``sft-icot``, ``sft-coconut``, ``sft-distill`` (one task, the method in its config).

Each trains on the DeepSpeed engine in its own folder (checkpoints there; a re-run resumes), streams
its metrics to its child run (with MLflow's system metrics: CPU, memory, GPU when there is one),
keeps a Prefect progress artifact up to date (``colar-progress-<stage>``), and logs the final model
(``model/`` artifact, content digest) and a loss plot. Under a multi-process launcher the job runs in
subprocesses whose ``metrics.jsonl`` is logged to MLflow afterwards.

Training never waits for MLflow. If the server is away when the stage ends, the metrics not yet
sent, the model and plot artifacts and the run's end go to the run's pending file
(:mod:`colar.tasks.runs`) and the stage still returns its result (and is cached): nothing trained
is lost, and the pending file is sent when the next stage starts or by ``colar retry``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Optional

from mlflow import MlflowClient
from prefect import get_run_logger, task

from colar_core.baselines.stage import BaselineJob, run_baseline_stage
from colar_core.rl.trainer import RLJob, run_rl_stage
from colar_core.training.callbacks import ConsoleLogger, read_metrics
from colar_core.training.sft import SFTJob, run_sft_stage
from colar_core.training.stage import StageData
from colar.tasks.artifacts import directory_digest
from colar.tasks.keys import CACHED_STAGE
from colar.tasks.metrics_sender import MlflowMetricsCallback
from colar.tasks.plots import training_curves_plot
from colar.tasks.prefect_artifacts import TrainingProgress
from colar.tasks.runs import child_run, log_or_defer
from colar.tasks.stage_spec import save_result, stage_folder


def training_callbacks(stage: str, metrics_cb: MlflowMetricsCallback, log: Callable[[str], None],
                       progress: Optional[TrainingProgress] = None) -> list:
    """The callbacks of an in-process training stage: metrics to MLflow, ~20 progress lines with ETA
    to ``log``, the Prefect progress artifact (``progress``). The one place that builds the list, so
    a test can add a callback of its own."""
    return [metrics_cb, ConsoleLogger(sink=log)] + ([progress] if progress is not None else [])


def _training_stage(stage: str, job, runner, launched: bool, params: dict, out: Path, parent_run_id: str) -> dict:
    """Shared body of the SFT and RL tasks: child run, metrics callback, run, model artifact, curves."""
    logger = get_run_logger()
    client = MlflowClient()
    progress = TrainingProgress(stage)
    with child_run(parent_run_id, stage, params, log_system_metrics=True) as run_id:
        t0 = time.perf_counter()
        with MlflowMetricsCallback(client, run_id) as metrics_cb:  # closed (last flush) however the run ends
            result = runner(job, callbacks=training_callbacks(stage, metrics_cb, logger.info, progress),
                            on_line=logger.info).to_dict()
            result["work_s"] = time.perf_counter() - t0
        progress.done(result.get("final_step"), _max_steps(job))  # a launched job's callbacks ran elsewhere
        if launched:  # the launched processes wrote metrics.jsonl; the callbacks ran nowhere
            _log_metrics_file(client, run_id, out / "metrics.jsonl")
        result["model_digest"] = directory_digest(result["model_dir"])
        log_or_defer(run_id, {"artifact": result["model_dir"], "artifact_path": "model"}, client=client)
        _log_training_curves(client, run_id, out)
    result["mlflow_run_id"] = run_id
    logger.info("%s finished at step %s (resumed from %s): %s", stage, result.get("final_step"),
                result.get("resumed_from"), result["model_dir"])
    return save_result(out, result)


def _max_steps(job) -> Optional[int]:
    section = getattr(job, "train", None) or getattr(job, "rl", None)
    return getattr(section, "max_steps", None)


def _with_tokenizer(model: dict, tokenizer_dir: Optional[str]) -> dict:
    """The pipeline's model config with the prepare stage's tokenizer, when it built one."""
    return {**model, "tokenizer": tokenizer_dir} if tokenizer_dir else dict(model)


def _stage_data(data_dir: str) -> StageData:
    return StageData(train=str(Path(data_dir) / "train.jsonl"), val=str(Path(data_dir) / "val.jsonl"))


@task(name="sft", **CACHED_STAGE, retries=0)
def sft_stage(stage: str, train: dict, model: dict, init_model_dir: Optional[str], data_dir: str,
              tokenizer_dir: Optional[str], out_dir: str, parent_run_id: str, key: str) -> dict:
    """One SFT stage (CoT warm-up, CoLaR, or answer-only), logged as child run ``stage``."""
    out = stage_folder(out_dir)
    model_cfg = _with_tokenizer(model, tokenizer_dir)
    job = SFTJob(output_dir=str(out), train=train, model=model_cfg, init_from=init_model_dir,
                 data=_stage_data(data_dir))
    return _training_stage(stage, job, run_sft_stage, job.train.launcher.multi_process,
                           {"train": train, "model": model_cfg, "init": init_model_dir}, out, parent_run_id)


@task(name="rl", **CACHED_STAGE, retries=0)
def rl_stage(rl: dict, init_model_dir: str, data_dir: str, out_dir: str, parent_run_id: str, key: str,
             model: Optional[dict] = None) -> dict:
    """GRPO over the latents of the CoLaR-SFT model; same engine, checkpoints and resume as SFT.
    ``model``: the pipeline's model config (what may be trusted when the SFT model is loaded)."""
    out = stage_folder(out_dir)
    job = RLJob(output_dir=str(out), init_from=init_model_dir, rl=rl, data=_stage_data(data_dir), model=model)
    return _training_stage("rl", job, run_rl_stage, job.rl.launcher.multi_process,
                           {"rl": rl, "init": init_model_dir}, out, parent_run_id)


@task(name="sft-baseline", **CACHED_STAGE, retries=0)
def baseline_stage(stage: str, method: dict, model: dict, init_model_dir: Optional[str], data_dir: str,
                   tokenizer_dir: Optional[str], out_dir: str, parent_run_id: str, key: str) -> dict:
    """One latent-reasoning baseline (iCoT, Coconut or Distill: ``method["method"]``), from the CoT
    model or the backbone, logged as child run ``stage``; same engine, checkpoints and resume as SFT."""
    out = stage_folder(out_dir)
    model_cfg = _with_tokenizer(model, tokenizer_dir)
    job = BaselineJob(output_dir=str(out), method=method, model=model_cfg, init_from=init_model_dir,
                      data=_stage_data(data_dir))
    return _training_stage(stage, job, run_baseline_stage, job.train.launcher.multi_process,
                           {"method": method, "model": model_cfg, "init": init_model_dir}, out, parent_run_id)


def _log_metrics_file(client: MlflowClient, run_id: str, path: Path) -> None:
    """Send the step and eval rows of a launched job's ``metrics.jsonl`` to ``run_id``."""
    with MlflowMetricsCallback(client, run_id) as cb:
        for row in read_metrics(path):
            if row.get("event") not in ("step", "eval"):
                continue
            values = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k not in ("step", "time")}
            (cb.on_eval if row["event"] == "eval" else cb.on_step)(int(row["step"]), values)


def _log_training_curves(client: MlflowClient, run_id: str, out: Path) -> None:
    """Plot loss parts from the stage's metrics.jsonl and log the PNG."""
    path = out / "metrics.jsonl"
    if not path.is_file():
        return
    steps = read_metrics(path, "step")
    if steps:
        png = training_curves_plot(steps, out / "training_curves.png", out.name)
        log_or_defer(run_id, {"artifact": str(png), "artifact_path": "plots"}, client=client)
