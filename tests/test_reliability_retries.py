"""Reliability, Prefect's own retries in a real flow run: the prepare stage (under ``data.policy:
skip``, on a file with bad records) and the CoLaR SFT stage each fail once and are retried by
Prefect inside the same flow run. MLflow then holds exactly one FINISHED child run per stage and
exactly one FAILED child run per failed attempt (no duplicates), and the skipped-records count is
logged once per prepare attempt, with the exact count, and nowhere else.
"""

from __future__ import annotations

import json

import pytest

from bench.pipeline_run import TINY
from tests.helpers import mixed_file

pytestmark = pytest.mark.slow


def test_prefect_retries_leave_one_failed_run_per_failed_attempt_and_count_skipped_records_once(
        tmp_path, mlflow_server, prefect_server, fail_stage_once, fail_once, one_thread):
    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from colar_core.training.sft import SFTResult
    from flows.config import load_config
    from flows.pipeline import run_pipeline
    from tasks import prepare

    source, n_good, n_bad = mixed_file(tmp_path / "mixed.jsonl")
    assert n_bad == 9
    # prepare: a transient failure after it counted and logged the skipped records (the first
    # dataset input it logs); sft-colar: a crash at step 3, after the step-2 checkpoint.
    calls = fail_once(prepare, "log_dataset_input", ConnectionError("artifact store hiccup"))
    fail_stage_once("sft-colar", 3)
    cfg = load_config(None, TINY + ["name=rel-prefect-retries", "tracking.registered_model_name=null",
                                    f"data.source={source}", "data.policy=skip", "eval.n_examples=2",
                                    f"output_dir={tmp_path / 'runs'}"])
    state = run_pipeline(cfg, return_state=True)
    assert state.is_completed(), state.message
    assert len(calls) == 1 + 3  # the failed call, then train, val and test datasets of the retry

    client = MlflowClient()
    parent_id = state.result()["parent_run_id"]
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")
    by_stage: dict = {}
    for run in children:
        by_stage.setdefault(run.data.tags["colar.stage"], []).append(run)
    assert {stage: sorted(r.info.status for r in runs) for stage, runs in by_stage.items()} == {
        "prepare": ["FAILED", "FINISHED"], "sft-cot": ["FINISHED"], "sft-colar": ["FAILED", "FINISHED"],
        "evaluate": ["FINISHED"]}

    # Prefect retried both inside this one flow run (its retry mechanism, not `colar retry`).
    with get_client(sync_client=True) as pc:
        flow_run_id = parent.data.tags["prefect.flow_run_id"]
        task_runs = pc.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    run_counts = {t.name: t.run_count for t in task_runs}
    assert run_counts["prepare"] == 2 and run_counts["sft-colar"] == 2 and run_counts["sft-cot"] == 1
    assert "prefect.flow_run_id.retry" not in parent.data.tags  # no `colar retry` took part

    # The count: once per prepare attempt, exact, on no other run; the manifest agrees.
    for run in children + [parent]:
        history = client.get_metric_history(run.info.run_id, "records/skipped")
        if run.data.tags.get("colar.stage") == "prepare":
            assert [(m.step, m.value) for m in history] == [(0, n_bad)], run.info.status
        else:
            assert history == [], run.data.tags.get("colar.stage", "parent")
    prep_dir = next((tmp_path / "runs").glob("prepare-*"))
    manifest = json.loads((prep_dir / "data" / "manifest.json").read_text())
    assert manifest["skipped"] == n_bad and sum(manifest["counts"].values()) == n_good
    finished = next(r for r in by_stage["prepare"] if r.info.status == "FINISHED")
    assert finished.data.metrics["records/skipped"] == n_bad
    assert {i.dataset.name.rsplit(":", 1)[1] for i in finished.inputs.dataset_inputs} == {"train", "val", "test"}

    colar = SFTResult.load(next((tmp_path / "runs").glob("sft-colar-*")))
    assert colar.resumed_from == 2 and colar.final_step == 6  # the retry resumed from the checkpoint
