"""The ``evaluate`` stage: the sweep over compression factors plus the CoT / No-CoT baselines and the
latent-reasoning baselines that ran (iCoT, Coconut, Distill: each decoded as its model folder says), on each
test set of ``eval.datasets`` (default: the test split of the prepared data). Its results also go to
the Prefect UI as the table artifact ``colar-evaluation`` (:mod:`colar.tasks.prefect_artifacts`)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import pandas as pd
from mlflow import MlflowClient
from prefect import get_run_logger, task

from colar_core.config import TEST_SPLIT, EvalConfig, EvalSet, ModelConfig
from colar_core.data.prepare import load_split
from colar_core.data.readers import read_records
from colar_core.data.records import Record
from colar_core.evaluation import average_over_sets, evaluate_baseline, evaluate_latent, evaluate_text, for_set
from colar_core.model import ColarModel
from colar_core.text import PromptEncoder
from colar.tasks.keys import CACHED_STAGE
from colar.tasks.prefect_artifacts import evaluation_table_artifact
from colar.tasks.runs import child_run, log_metrics
from colar.tasks.stage_spec import save_result, stage_folder


def _load(model_dir: str, options: dict) -> tuple[ColarModel, PromptEncoder]:
    model, tokenizer = ColarModel.load_dir(model_dir, is_trainable=False, **options)
    return model, PromptEncoder(tokenizer)


def load_eval_set(spec: EvalSet, data_dir: str, n_examples: Optional[int]) -> list[Record]:
    """The first ``spec.n_examples`` (else ``n_examples``; None = all) problems of one test set: the
    prepared test split for source 'test', else the set read with the data readers (policy fail: a
    test set with a bad record is an error naming it, not a smaller test set)."""
    if spec.source == TEST_SPLIT:
        records = load_split(Path(data_dir) / "test.jsonl")
    else:
        records = read_records(spec.source, spec.format, policy="fail", split=spec.split).records
    return records[: spec.n_examples or n_examples]


@task(name="evaluate", **CACHED_STAGE, retries=1, retry_delay_seconds=2)
def evaluate_stage(eval_cfg: dict, colar_model_dir: str, cot_model_dir: Optional[str], nocot_model_dir: Optional[str],
                   data_dir: str, out_dir: str, parent_run_id: str, key: str, model: Optional[dict] = None,
                   baseline_model_dirs: Optional[dict] = None) -> dict:
    """Evaluate the CoLaR model (and the baselines given; ``baseline_model_dirs``: method -> model
    folder of sft-icot / sft-coconut / sft-distill) on each set of ``eval.datasets`` (default
    ``data_dir/test.jsonl``); metrics, the predictions table (a ``set`` column) and ``metrics.json``
    go to the ``evaluate`` child run. ``model``: the pipeline's
    model config, the only thing that may allow remote code or name a LoRA base (see
    ``ColarModel.load_options``); None allows neither."""
    logger = get_run_logger()
    cfg = EvalConfig.model_validate(eval_cfg)
    out = stage_folder(out_dir)
    client = MlflowClient()
    with child_run(parent_run_id, "evaluate", {"eval": eval_cfg}) as run_id:
        t0 = time.perf_counter()
        sets = cfg.sets()
        records = {s.name: load_eval_set(s, data_dir, cfg.n_examples) for s in sets}
        logger.info("evaluation sets: %s", {name: len(r) for name, r in records.items()})
        metrics, rows = {}, []

        def add(name: str, m: dict, r: list) -> None:
            metrics.update(for_set(m, name))
            if name == sets[0].name:  # the primary set also under the names runs had before named sets
                metrics.update(m)
            rows.extend({"set": name, **row} for row in r)

        options = ColarModel.load_options(ModelConfig.model_validate(model)) if model else {}
        colar_model, enc = _load(colar_model_dir, options)
        for name, recs in records.items():
            add(name, *evaluate_latent(colar_model, enc, recs, cfg.compression_factors, cfg.seeds, cfg.generation))
        del colar_model
        for mode, model_dir in (("cot", cot_model_dir), ("nocot", nocot_model_dir)):
            if model_dir:
                base, base_enc = _load(model_dir, options)
                for name, recs in records.items():
                    add(name, *evaluate_text(base, base_enc, recs, mode, cfg.seeds, cfg.generation))
        for method, model_dir in (baseline_model_dirs or {}).items():
            baseline, base_enc = _load(model_dir, options)
            if baseline.state.method != method:
                raise ValueError(f"{model_dir}: trained as {baseline.state.method!r}, evaluated as {method!r}")
            for name, recs in records.items():
                add(name, *evaluate_baseline(baseline, base_enc, recs, cfg.seeds, cfg.generation))
            del baseline
        if len(sets) > 1:
            metrics.update(average_over_sets(metrics, [s.name for s in sets]))
        work_s = time.perf_counter() - t0
        log_metrics(run_id, metrics, client=client)
        pd.DataFrame(rows).to_csv(out / "predictions.csv", index=False)
        client.log_artifact(run_id, str(out / "predictions.csv"))
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
        client.log_artifact(run_id, str(out / "metrics.json"))
        logger.info("evaluation: %s", {k: round(v, 3) for k, v in metrics.items()})
        evaluation_table_artifact(metrics, f"MLflow run `{run_id}` (stage evaluate); test sets: "
                                  + ", ".join(f"{name} ({len(recs)} questions)" for name, recs in records.items()))
    example = next((r[0].question for r in records.values() if r), "")
    return save_result(out, {"metrics": metrics, "predictions": str(out / "predictions.csv"), "mlflow_run_id": run_id,
                             "work_s": work_s, "example_question": example})
