"""The ``evaluate`` stage: the sweep over compression factors plus the CoT / No-CoT baselines, on the
test split."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import pandas as pd
from mlflow import MlflowClient
from prefect import get_run_logger, task

from colar_core.config import EvalConfig, ModelConfig
from colar_core.data.prepare import load_split
from colar_core.evaluation import evaluate_latent, evaluate_text
from colar_core.model import ColarModel
from colar_core.text import PromptEncoder
from colar.tasks.keys import CACHED_STAGE
from colar.tasks.runs import child_run, log_metrics
from colar.tasks.stage_spec import save_result, stage_folder


def _load(model_dir: str, options: dict) -> tuple[ColarModel, PromptEncoder]:
    model, tokenizer = ColarModel.load_dir(model_dir, is_trainable=False, **options)
    return model, PromptEncoder(tokenizer)


@task(name="evaluate", **CACHED_STAGE, retries=1, retry_delay_seconds=2)
def evaluate_stage(eval_cfg: dict, colar_model_dir: str, cot_model_dir: Optional[str], nocot_model_dir: Optional[str],
                   data_dir: str, out_dir: str, parent_run_id: str, key: str, model: Optional[dict] = None) -> dict:
    """Evaluate the CoLaR model (and the baselines given) on ``data_dir/test.jsonl``; metrics, the
    predictions table and ``metrics.json`` go to the ``evaluate`` child run. ``model``: the pipeline's
    model config, the only thing that may allow remote code or name a LoRA base (see
    ``ColarModel.load_options``); None allows neither."""
    logger = get_run_logger()
    cfg = EvalConfig.model_validate(eval_cfg)
    out = stage_folder(out_dir)
    client = MlflowClient()
    with child_run(parent_run_id, "evaluate", {"eval": eval_cfg}) as run_id:
        t0 = time.perf_counter()
        records = load_split(Path(data_dir) / "test.jsonl")[: cfg.n_examples]
        metrics, rows = {}, []
        options = ColarModel.load_options(ModelConfig.model_validate(model)) if model else {}
        colar_model, enc = _load(colar_model_dir, options)
        m, r = evaluate_latent(colar_model, enc, records, cfg.compression_factors, cfg.seeds, cfg.generation)
        metrics.update(m)
        rows += r
        for mode, model_dir in (("cot", cot_model_dir), ("nocot", nocot_model_dir)):
            if model_dir:
                base, base_enc = _load(model_dir, options)
                m, r = evaluate_text(base, base_enc, records, mode, cfg.seeds, cfg.generation)
                metrics.update(m)
                rows += r
        work_s = time.perf_counter() - t0
        log_metrics(run_id, metrics, client=client)
        pd.DataFrame(rows).to_csv(out / "predictions.csv", index=False)
        client.log_artifact(run_id, str(out / "predictions.csv"))
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
        client.log_artifact(run_id, str(out / "metrics.json"))
        logger.info("evaluation: %s", {k: round(v, 3) for k, v in metrics.items()})
    return save_result(out, {"metrics": metrics, "predictions": str(out / "predictions.csv"), "mlflow_run_id": run_id,
                             "work_s": work_s})
