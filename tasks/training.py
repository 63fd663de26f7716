"""The training stages: ``sft-cot``, ``sft-colar`` and ``sft-nocot`` (one task, three configs), ``rl``, and
the baselines ``sft-icot``, ``sft-coconut``, ``sft-distill`` (one task, the method in its config).

Each trains on the DeepSpeed engine in its own folder (checkpoints there; a re-run resumes), streams
its metrics to its child run (with MLflow's system metrics: CPU, memory, GPU when there is one),
keeps a Prefect progress artifact up to date (``colar-progress-<stage>``), and logs the final model
(``model/`` artifact, content digest) and a loss plot. Under a multi-process launcher the job runs in
subprocesses whose ``metrics.jsonl`` is logged to MLflow afterwards.

Training never waits for MLflow. If the server is away when the stage ends, the metrics not yet
sent, the model and plot artifacts and the run's end go to the run's pending file
(:mod:`colar_infra.tracking.runs`) and the stage still returns its result (and is cached): nothing trained
is lost, and the pending file is sent when the next stage starts or by ``colar retry``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Optional, Union

from mlflow import MlflowClient
from prefect import get_run_logger, task

from colar_core.baselines.stage import BaselineJob, run_baseline_stage
from colar_core.devices import release_memory
from colar_core.files import content_digest
from colar_core.rl.trainer import RLJob, RLResult, run_rl_stage
from colar_core.training.callbacks import ConsoleLogger, read_metrics
from colar_core.training.checkpoint import carried_checkpoints_failed, drop_carried_marker
from colar_core.training.sft import SFTJob, SFTResult, run_sft_stage
from colar_core.training.stage import StageData
from colar_infra.tracking.metrics_sender import MlflowMetricsCallback
from colar_infra.tracking.pending import ArtifactRecord
from colar_infra.tracking.runs import child_run, log_or_defer
from tasks.keys import CACHED_STAGE
from tasks.plots import training_curves_plot
from tasks.prefect_artifacts import TrainingProgress
from tasks.stage_spec import StageResult, stage_folder


def training_callbacks(stage: str, metrics_cb: MlflowMetricsCallback, log: Callable[[str], None],
                       progress: Optional[TrainingProgress] = None) -> list:
    """The callbacks of an in-process training stage: metrics to MLflow, ~20 progress lines with ETA
    to ``log``, the Prefect progress artifact (``progress``). The one place that builds the list, so
    a test can add a callback of its own."""
    return [metrics_cb, ConsoleLogger(sink=log)] + ([progress] if progress is not None else [])


class TrainResult(StageResult):
    """What a training stage hands on: its final model folder and that folder's content digest (an
    input of the keys of the stages that start from it or evaluate it), the step it ended at and the
    checkpoint step it resumed from (None: it started afresh). The training job's own record (best
    validation, early stop, curriculum stage, ...) is its ``result.json`` beside it
    (:mod:`colar_core.training.stage`)."""

    model_dir: str
    model_digest: str
    final_step: int
    resumed_from: Optional[int]


def _training_stage(stage: str, job, runner: Callable[..., Union[SFTResult, RLResult]], launched: bool,
                    params: dict, out: Path, parent_run_id: str) -> TrainResult:
    """Shared body of the SFT and RL tasks: child run, metrics callback, run, model artifact, curves."""
    logger = get_run_logger()
    client = MlflowClient()
    progress = TrainingProgress(stage)
    with child_run(parent_run_id, stage, params, log_system_metrics=True) as run_id:
        t0 = time.perf_counter()
        with MlflowMetricsCallback(client, run_id) as metrics_cb:  # closed (last flush) however the run ends
            def run_job():
                try:
                    return runner(job, callbacks=training_callbacks(stage, metrics_cb, logger.info, progress),
                                  on_line=logger.info)
                finally:  # the job's models are out of scope: what they held goes back to the system
                    release_memory()
            try:
                job_result = run_job()
            except Exception as err:
                if (origin := carried_checkpoints_failed(out)) is None:
                    raise
                # checkpoints a retry carried over from the attempt under older code (flows.retry) do
                # not load with this code: the stage starts again, and says why
                logger.warning("%s: the checkpoints carried over from %s do not load with today's code (%s); "
                               "the stage starts again from step 0", stage, origin, err)
                drop_carried_marker(out)
                job_result = run_job()
            work_s = time.perf_counter() - t0
        progress.done(job_result.final_step, _max_steps(job))  # a launched job's callbacks ran elsewhere
        if launched:  # the launched processes wrote metrics.jsonl; the callbacks ran nowhere
            _log_metrics_file(client, run_id, out / "metrics.jsonl")
        model_dir = str(job_result.model_dir)
        model_digest = content_digest(model_dir)
        log_or_defer(ArtifactRecord(run_id, model_dir, "model"), client=client)
        _log_training_curves(client, run_id, out)
    logger.info("%s finished at step %s (resumed from %s): %s", stage, job_result.final_step,
                job_result.resumed_from, model_dir)
    return TrainResult(model_dir=model_dir, model_digest=model_digest, final_step=job_result.final_step,
                       resumed_from=job_result.resumed_from, mlflow_run_id=run_id, work_s=work_s).save(out)


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
              tokenizer_dir: Optional[str], out_dir: str, parent_run_id: str, key: str) -> TrainResult:
    """One SFT stage (CoT warm-up, CoLaR, or answer-only), logged as child run ``stage``."""
    out = stage_folder(out_dir)
    model_cfg = _with_tokenizer(model, tokenizer_dir)
    job = SFTJob(output_dir=str(out), train=train, model=model_cfg, init_from=init_model_dir,
                 data=_stage_data(data_dir))
    return _training_stage(stage, job, run_sft_stage, job.train.launcher.multi_process,
                           {"train": train, "model": model_cfg, "init": init_model_dir}, out, parent_run_id)


@task(name="rl", **CACHED_STAGE, retries=0)
def rl_stage(rl: dict, init_model_dir: str, data_dir: str, out_dir: str, parent_run_id: str, key: str,
             model: Optional[dict] = None) -> TrainResult:
    """GRPO over the latents of the CoLaR-SFT model; same engine, checkpoints and resume as SFT.
    ``model``: the pipeline's model config (what may be trusted when the SFT model is loaded)."""
    out = stage_folder(out_dir)
    job = RLJob(output_dir=str(out), init_from=init_model_dir, rl=rl, data=_stage_data(data_dir), model=model)
    return _training_stage("rl", job, run_rl_stage, job.rl.launcher.multi_process,
                           {"rl": rl, "init": init_model_dir}, out, parent_run_id)


@task(name="sft-baseline", **CACHED_STAGE, retries=0)
def baseline_stage(stage: str, method: dict, model: dict, init_model_dir: Optional[str], data_dir: str,
                   tokenizer_dir: Optional[str], out_dir: str, parent_run_id: str, key: str) -> TrainResult:
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
        log_or_defer(ArtifactRecord(run_id, str(png), "plots"), client=client)
