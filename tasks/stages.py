"""The pipeline's stages as Prefect tasks.

Each task is thin: it opens an MLflow child run under the pipeline's parent run, calls
``colar_core`` for the work, logs params / metrics / artifacts, and returns a small dict of paths
and run ids (never tensors). Each receives a precomputed cache ``key`` (see ``colar.tasks.keys``): a
finished stage with the same key comes back Cached, and its output folder is named by the key, so a
failed stage run again resumes from its own checkpoints.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Optional

from prefect import get_run_logger, task

from colar.tasks.keys import cache_key_from_param
from colar.tasks.tracking import (
    MlflowMetricsCallback,
    end_run,
    flatten_params,
    log_artifact_dir,
    log_dataset_input,
    start_child_run,
)

RESULT_FILE = "stage_result.json"
FAIL_SWITCH = "COLAR_TEST_FAIL_STAGE"  # test-only: "stage:step" makes that stage fail once at that step


def _client():
    from mlflow.tracking import MlflowClient

    return MlflowClient()


def _finish(out_dir: Path, result: dict) -> dict:
    (out_dir / RESULT_FILE).write_text(json.dumps(result, indent=2, sort_keys=True))
    return result


class _FailOnce:
    """Test-only fault injection: raise once at a given step of a given stage (a marker makes it once)."""

    def __init__(self, stage: str, out_dir: Path):
        spec = os.environ.get(FAIL_SWITCH, "")
        name, _, step = spec.partition(":")
        self.step = int(step) if name == stage and step.isdigit() else None
        self.marker = out_dir / ".failed_once"

    def on_step(self, step: int, metrics: dict) -> None:
        if self.step is not None and step >= self.step and not self.marker.exists():
            self.marker.write_text(str(step))
            raise RuntimeError(f"{FAIL_SWITCH}: injected failure at step {step}")

    def on_eval(self, step, metrics):
        pass

    def on_checkpoint(self, step, path):
        pass


def _with_child_run(parent_run_id: str, stage: str, params: dict):
    run_id = start_child_run(parent_run_id, stage, flatten_params(params))
    return run_id


@task(name="prepare", cache_key_fn=cache_key_from_param, persist_result=True, retries=1, retry_delay_seconds=2)
def prepare_stage(data: dict, model: dict, out_dir: str, parent_run_id: str, key: str) -> dict:
    """Read / generate, validate and split the data; build the tokenizer for a from-scratch model."""
    from colar_core.config import ModelConfig
    from colar_core.data.prepare import load_split, prepare_data
    from colar_core.tokenizer import build_tokenizer

    logger = get_run_logger()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    run_id = _with_child_run(parent_run_id, "prepare", {"data": data})
    client = _client()
    try:
        builtin = data["builtin"] if data["source"] == "builtin" else None
        t0 = time.perf_counter()
        manifest = prepare_data(data["source"], out / "data", format=data["format"], policy=data["policy"],
                                val_fraction=data["val_fraction"], test_fraction=data["test_fraction"],
                                seed=data["seed"], builtin=builtin)
        for split, n in manifest["counts"].items():
            client.log_metric(run_id, f"records/{split}", n)
        client.log_metric(run_id, "records/skipped", manifest["skipped"])
        for split in ("train", "val", "test"):
            # MLflow caps a dataset digest at 36 characters: the first 32 hex of the sha256 go there,
            # the full digest is in the run's tags and the manifest.
            log_dataset_input(run_id, str(out / "data" / f"{split}.jsonl"), manifest["digests"][split][:32],
                              name=f"{data['source']}:{split}", context=split)
            client.set_tag(run_id, f"colar.digest.{split}", manifest["digests"][split])
        client.set_tag(run_id, "colar.digest", manifest["digest"])
        model_cfg = ModelConfig.model_validate(model)
        tokenizer_dir = None
        if model_cfg.name_or_path == "tiny" and model_cfg.tokenizer is None:
            tokenizer_dir = str(out / "tokenizer")
            build_tokenizer(load_split(out / "data" / "train.jsonl"), tokenizer_dir)
        work_s = time.perf_counter() - t0
        client.log_artifact(run_id, str(out / "data" / "manifest.json"))
        logger.info("prepared %s: %s (digest %s)", data["source"], manifest["counts"], manifest["digest"][:12])
        end_run(run_id, "FINISHED")
    except BaseException:
        end_run(run_id, "FAILED")
        raise
    return _finish(out, {"data_dir": str(out / "data"), "digest": manifest["digest"], "tokenizer_dir": tokenizer_dir,
                         "counts": manifest["counts"], "mlflow_run_id": run_id, "work_s": work_s})


def _training_stage(stage: str, job, runner, launched: bool, params: dict, out: Path, parent_run_id: str) -> dict:
    """Shared body of the SFT and RL tasks: child run, metrics callback, run, model artifact, curves."""
    from colar_core.training.callbacks import ConsoleLogger

    logger = get_run_logger()
    run_id = _with_child_run(parent_run_id, stage, params)
    client = _client()
    metrics_cb = MlflowMetricsCallback(client, run_id)
    try:
        t0 = time.perf_counter()
        progress = ConsoleLogger(sink=logger.info)  # ~20 progress lines with ETA in the Prefect log
        result = runner(job, callbacks=[metrics_cb, _FailOnce(stage, out), progress], on_line=logger.info).to_dict()
        result["work_s"] = time.perf_counter() - t0
        metrics_cb.close()
        if launched:  # the launched processes wrote metrics.jsonl; the callbacks ran nowhere
            _log_metrics_file(client, run_id, out / "metrics.jsonl")
        result["model_digest"] = directory_digest(result["model_dir"])
        log_artifact_dir(client, run_id, result["model_dir"], "model")
        _log_training_curves(run_id, out)
        end_run(run_id, "FINISHED")
    except BaseException:
        metrics_cb.close()
        end_run(run_id, "FAILED")
        raise
    result["mlflow_run_id"] = run_id
    logger.info("%s finished at step %s (resumed from %s): %s", stage, result.get("final_step"),
                result.get("resumed_from"), result["model_dir"])
    return _finish(out, result)


def _job_data(data_dir: str):
    from colar_core.training.sft import DataConfig as JobData

    return JobData(train=str(Path(data_dir) / "train.jsonl"), val=str(Path(data_dir) / "val.jsonl"))


@task(name="sft", cache_key_fn=cache_key_from_param, persist_result=True, retries=0)
def sft_stage(stage: str, train: dict, model: dict, init_model_dir: Optional[str], data_dir: str,
              tokenizer_dir: Optional[str], out_dir: str, parent_run_id: str, key: str) -> dict:
    """One SFT stage (CoT warm-up, CoLaR, or answer-only) on the DeepSpeed engine; resumes if interrupted.

    One process: trains here, metrics stream to MLflow. Several GPUs/nodes (``train.launcher``): the
    job runs under the ``deepspeed``/``torchrun`` launcher as a subprocess whose output goes to the
    Prefect log, and its ``metrics.jsonl`` is logged to MLflow afterwards.
    """
    from colar_core.training.launch import run_sft_stage
    from colar_core.training.sft import SFTJob

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_cfg = dict(model)
    if tokenizer_dir:
        model_cfg["tokenizer"] = tokenizer_dir
    job = SFTJob(output_dir=str(out), train=train, model=model_cfg, init_from=init_model_dir, data=_job_data(data_dir))
    return _training_stage(stage, job, run_sft_stage, job.train.launcher.multi_process,
                           {"train": train, "model": model_cfg, "init": init_model_dir}, out, parent_run_id)


@task(name="rl", cache_key_fn=cache_key_from_param, persist_result=True, retries=0)
def rl_stage(rl: dict, init_model_dir: str, data_dir: str, out_dir: str, parent_run_id: str, key: str) -> dict:
    """GRPO over the latents of the CoLaR-SFT model; same engine, checkpoints and resume as SFT."""
    from colar_core.rl.trainer import RLJob, run_rl_stage

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    job = RLJob(output_dir=str(out), init_from=init_model_dir, rl=rl, data=_job_data(data_dir))
    return _training_stage("rl", job, run_rl_stage, job.rl.launcher.multi_process,
                           {"rl": rl, "init": init_model_dir}, out, parent_run_id)


def directory_digest(path) -> str:
    """sha256 over a directory's files (relative path and bytes): the lineage id of a model."""
    import hashlib

    h = hashlib.sha256()
    root = Path(path)
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(root)).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _log_metrics_file(client, run_id: str, path: Path) -> None:
    from colar_core.training.callbacks import read_metrics

    cb = MlflowMetricsCallback(client, run_id)
    for row in read_metrics(path):
        if row.get("event") not in ("step", "eval"):
            continue
        values = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k not in ("step", "time")}
        (cb.on_eval if row["event"] == "eval" else cb.on_step)(int(row["step"]), values)
    cb.close()


def _log_training_curves(run_id: str, out: Path) -> None:
    """Plot loss parts from the stage's metrics.jsonl and log the PNG."""
    path = out / "metrics.jsonl"
    if not path.is_file():
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from colar_core.training.callbacks import read_metrics

    steps = read_metrics(path, "step")
    if not steps:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in ("loss", "ce", "latent"):
        pts = [(r["step"], r[name]) for r in steps if name in r]
        if pts:
            ax.plot(*zip(*pts), label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.set_title(out.name)
    fig.tight_layout()
    png = out / "training_curves.png"
    fig.savefig(png, dpi=100)
    plt.close(fig)
    _client().log_artifact(run_id, str(png), "plots")


@task(name="evaluate", cache_key_fn=cache_key_from_param, persist_result=True, retries=1, retry_delay_seconds=2)
def evaluate_stage(eval_cfg: dict, colar_model_dir: str, cot_model_dir: Optional[str], nocot_model_dir: Optional[str],
                   data_dir: str, out_dir: str, parent_run_id: str, key: str) -> dict:
    """The sweep over compression factors plus the CoT / no-CoT baselines, on the test split."""
    import pandas as pd

    from colar_core.config import EvalConfig
    from colar_core.data.prepare import load_split
    from colar_core.evaluation import evaluate_latent, evaluate_text
    from colar_core.model import ColarModel
    from colar_core.text import PromptEncoder
    from colar_core.tokenizer import load_tokenizer

    logger = get_run_logger()
    cfg = EvalConfig.model_validate(eval_cfg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    run_id = _with_child_run(parent_run_id, "evaluate", {"eval": eval_cfg})
    client = _client()
    try:
        t0 = time.perf_counter()
        records = load_split(Path(data_dir) / "test.jsonl")[: cfg.n_examples]
        metrics, rows = {}, []

        def load(model_dir):
            model = ColarModel.from_pretrained(model_dir, is_trainable=False).eval()
            return model, PromptEncoder(load_tokenizer(str(Path(model_dir) / "tokenizer")))

        model, enc = load(colar_model_dir)
        m, r = evaluate_latent(model, enc, records, cfg.compression_factors, cfg.seeds, cfg.generation)
        metrics.update(m)
        rows += r
        for mode, model_dir in (("cot", cot_model_dir), ("nocot", nocot_model_dir)):
            if model_dir:
                base, base_enc = load(model_dir)
                m, r = evaluate_text(base, base_enc, records, mode, cfg.seeds, cfg.generation)
                metrics.update(m)
                rows += r
        work_s = time.perf_counter() - t0
        client.log_batch(run_id, metrics=_metric_list(metrics))
        table = pd.DataFrame(rows)
        table.to_csv(out / "predictions.csv", index=False)
        client.log_artifact(run_id, str(out / "predictions.csv"))
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
        client.log_artifact(run_id, str(out / "metrics.json"))
        logger.info("evaluation: %s", {k: round(v, 3) for k, v in metrics.items()})
        end_run(run_id, "FINISHED")
    except BaseException:
        end_run(run_id, "FAILED")
        raise
    return _finish(out, {"metrics": metrics, "predictions": str(out / "predictions.csv"), "mlflow_run_id": run_id,
                         "work_s": work_s})


def _metric_list(metrics: dict, step: int = 0):
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(k, float(v), now, step) for k, v in metrics.items()]
