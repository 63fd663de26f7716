"""The ``evaluate`` stage: the run's evaluation suite (:func:`colar_core.evaluation_suite.evaluate_suite`:
CoLaR at each compression factor, the CoT / No-CoT models and the latent-reasoning baselines that ran,
on each test set of ``eval.datasets``), logged to the ``evaluate`` child run as every stage logs: the
metrics, and the predictions and metrics files as artifacts that wait in the run's pending file when
the server is away (:func:`~colar_infra.tracking.runs.log_or_defer`). Its results also go to the
Prefect UI as the table artifact ``colar-evaluation`` (:mod:`tasks.prefect_artifacts`).

Each set's content digest (:func:`colar_core.evaluation.eval_set_digest`: the questions and answers
scored) and number of questions go to the child run as the artifact ``eval_sets.json`` (deferred like
the others), and the digests go on in the result (``set_digests``): the report stage records them on
the parent run as tags, where the promotion gate reads them to compare a run only with a candidate
measured on the same set.

The first ``eval.thoughts_questions`` questions of the primary set, read step by step by the suite
(:mod:`colar_core.latent_inspect`), go to the child run as the self-contained page ``thoughts.html``
(deferred like the others; the MLflow UI's artifact view shows it) and to the Prefect UI as the markdown
artifact ``colar-thoughts``."""

from __future__ import annotations

import time
from typing import Optional

import pandas as pd
from mlflow import MlflowClient
from prefect import get_run_logger, task

from colar_core.config import EvalConfig, ModelConfig
from colar_core.devices import release_memory
from colar_core.evaluation import eval_set_digest
from colar_core.evaluation_suite import SuiteModels, evaluate_suite, load_eval_sets
from colar_core.files import atomic_write_json, atomic_write_text
from colar_core.latent_inspect import render_html, render_markdown
from colar_infra.tracking.pending import ArtifactRecord
from colar_infra.tracking.runs import child_run, log_metrics, log_or_defer
from tasks.keys import CACHED_STAGE
from tasks.prefect_artifacts import evaluation_table_artifact, thoughts_artifact
from tasks.stage_spec import StageResult, stage_folder


class EvaluateResult(StageResult):
    """What the ``evaluate`` stage hands on: the metrics (what the report logs on the parent run and
    the promotion gate reads), the predictions file, the first question of the first set that
    has one (the logged model's input example), and ``{set: content digest}`` of the sets evaluated,
    the primary set first (empty in a result from before the digests: the gate then refuses to compare)."""

    metrics: dict[str, float]
    predictions: str
    example_question: str
    set_digests: dict[str, str] = {}


@task(name="evaluate", **CACHED_STAGE, retries=1, retry_delay_seconds=2)
def evaluate_stage(eval_cfg: dict, colar_model_dir: str, cot_model_dir: Optional[str], nocot_model_dir: Optional[str],
                   data_dir: str, out_dir: str, parent_run_id: str, key: str, model: Optional[dict] = None,
                   baseline_model_dirs: Optional[dict] = None) -> EvaluateResult:
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
    models = SuiteModels(colar=colar_model_dir, cot=cot_model_dir, nocot=nocot_model_dir,
                         baselines=dict(baseline_model_dirs or {}))
    with child_run(parent_run_id, "evaluate", {"eval": eval_cfg}) as run_id:
        t0 = time.perf_counter()
        records = load_eval_sets(cfg, data_dir)
        logger.info("evaluation sets: %s", {name: len(r) for name, r in records.items()})
        set_digests = {name: eval_set_digest(recs) for name, recs in records.items()}
        suite = evaluate_suite(models, records, cfg, ModelConfig.model_validate(model) if model else None)
        release_memory()  # the models it loaded are out of scope
        metrics = suite.metrics
        work_s = time.perf_counter() - t0
        log_metrics(run_id, metrics, client=client)
        pd.DataFrame(suite.rows).to_csv(out / "predictions.csv", index=False)
        atomic_write_json(out / "metrics.json", metrics)
        atomic_write_json(out / "eval_sets.json", {name: {"digest": set_digests[name], "n_questions": len(recs)}
                                                   for name, recs in records.items()})
        names = ["predictions.csv", "metrics.json", "eval_sets.json"]
        if suite.thoughts:
            primary = next(iter(records))
            where = f"the first {len(suite.thoughts)} questions of test set {primary}, seed {cfg.seeds[0]}"
            atomic_write_text(out / "thoughts.html", render_html(suite.thoughts, "colar: latent thoughts",
                                                                 subtitle=f"MLflow run {run_id} (stage evaluate); "
                                                                 + where))
            names.append("thoughts.html")
            thoughts_artifact(render_markdown(suite.thoughts),
                              f"MLflow run `{run_id}` (stage evaluate), artifact thoughts.html: {where}")
        for name in names:
            log_or_defer(ArtifactRecord(run_id, str(out / name)), client=client)
        logger.info("evaluation: %s", {k: round(v, 3) for k, v in metrics.items()})
        evaluation_table_artifact(metrics, f"MLflow run `{run_id}` (stage evaluate); test sets: "
                                  + ", ".join(f"{name} ({len(recs)} questions)" for name, recs in records.items()))
    example = next((r[0].question for r in records.values() if r), "")
    return EvaluateResult(metrics=metrics, predictions=str(out / "predictions.csv"), example_question=example,
                          set_digests=set_digests, mlflow_run_id=run_id, work_s=work_s).save(out)
