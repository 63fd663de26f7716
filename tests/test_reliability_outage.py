"""Reliability, MLflow lost mid-training through the real stage until its end.

A real tiny pipeline runs in this process against a Prefect server (the session's) and an MLflow
server of its own, which is stopped in the middle of the CoLaR SFT stage and stays away until the
flow has given up. Training finishes; the stage's unsent metrics, its model and plot artifacts and
its run's end go to the run's pending file instead of crashing the stage (or hanging for minutes in
MLflow's own retries); the next stage fails at once naming the server; and once the server is back
(same port, same store) `colar retry` finds the trained stage cached and sends what was pending:
every step once, the artifacts, the run ended FINISHED at the time it really ended (not KILLED).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from bench.pipeline_run import TINY
from colar_core.net import free_port
from tests.helpers import child_runs

MAX_STEPS = 8
OUTAGE_AT = 3  # steps 1..3 reach the server; 4..8 and everything after the stage do not


@pytest.mark.slow
def test_mlflow_lost_mid_training_until_the_stage_ends_loses_nothing_and_retry_sends_it(
        tmp_path, monkeypatch, prefect_server, at_training_step, one_thread):
    from mlflow import MlflowClient

    from colar_core.training.callbacks import read_metrics
    from colar_core.training.sft import SFTResult
    from colar_infra.servers import ensure_mlflow, stop_servers
    from colar_infra.tracking.metrics_sender import MlflowMetricsCallback
    from colar_infra.tracking.pending import pending_dir
    from colar_infra.tracking.runs import ORPHAN_TAG
    from flows.cli import main
    from flows.config import load_config
    from flows.pipeline import run_pipeline

    state_dir, port = tmp_path / "mlflow", free_port()
    uri = ensure_mlflow(state_dir, port=port)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("COLAR_HOME", str(tmp_path / "home"))  # this test's own pending files
    seen = {}

    def outage(callbacks):
        metrics_cb = next(cb for cb in callbacks if isinstance(cb, MlflowMetricsCallback))
        seen["flushed"] = metrics_cb.flush(wait=True, timeout_s=60)  # steps 1..3 are on the server
        stop_servers(state_dir)
        seen["down_at"] = time.monotonic()

    at_training_step("sft-colar", OUTAGE_AT, outage)
    cfg = load_config(None, TINY + ["name=rel-outage", "tracking.registered_model_name=null", "sft_cot=null",
                                    f"sft_colar.max_steps={MAX_STEPS}", f"output_dir={tmp_path / 'runs'}"])
    try:
        state = run_pipeline(cfg, return_state=True)
        gave_up_after = time.monotonic() - seen["down_at"]
        assert seen["flushed"] is True

        # Training finished and its result is kept (the stage completed; the flow stopped at the next one).
        colar_dir = next((tmp_path / "runs").glob("sft-colar-*"))
        result = SFTResult.load(colar_dir)
        assert result.final_step == MAX_STEPS and (colar_dir / "model").is_dir()
        stage = json.loads((colar_dir / "stage_result.json").read_text())
        child_id = stage["mlflow_run_id"]
        assert state.is_failed()
        assert "does not answer: cannot start the run of stage evaluate" in state.message, state.message
        assert gave_up_after < 90, gave_up_after  # no stage waited out MLflow's minutes of retries

        # What the server missed is in the pending files: the stage's metrics from step 4 on, its
        # artifacts and its end; the parent's timings and its end.
        pending = {p.stem: [json.loads(line) for line in p.read_text().splitlines()]
                   for p in pending_dir().glob("*.jsonl")}
        assert child_id in pending and len(pending) == 2
        records = pending.pop(child_id)
        assert sorted(r["step"] for r in records if r.get("key") == "loss") == list(range(OUTAGE_AT + 1, MAX_STEPS + 1))
        assert {(r.get("artifact_path"), Path(r["artifact"]).name) for r in records if "artifact" in r} == {
            ("model", "model"), ("plots", "training_curves.png")}
        assert records[-1]["end"] == "FINISHED"
        ended_at_ms = records[-1]["end_time"]
        (parent_id, parent_records), = pending.items()
        assert parent_records[-1]["end"] == "FAILED"
        assert any(r.get("key") == "time/sft-colar/wall_s" for r in parent_records)

        # The server comes back (same port, same store): the stage's run is still RUNNING with steps 1..3.
        monkeypatch.delenv("MLFLOW_TRACKING_URI")  # ensure_mlflow would only probe the URI it names
        assert ensure_mlflow(state_dir, port=port) == uri
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        client = MlflowClient(uri)
        assert client.get_run(child_id).info.status == "RUNNING"
        assert sorted(m.step for m in client.get_metric_history(child_id, "loss")) == list(range(1, OUTAGE_AT + 1))

        assert main(["retry", parent_id]) == 0

        stages = sorted((r.data.tags["colar.stage"], r.info.status) for r in child_runs(client, parent_id))
        assert stages == [("evaluate", "FINISHED"), ("prepare", "FINISHED"), ("sft-colar", "FINISHED")]
        child = client.get_run(child_id)
        assert ORPHAN_TAG not in child.data.tags  # ended as it ended, not taken for a dead attempt
        assert child.info.end_time == ended_at_ms
        history = client.get_metric_history(child_id, "loss")
        assert sorted(m.step for m in history) == list(range(1, MAX_STEPS + 1))  # every step, none twice
        losses = {r["step"]: r["loss"] for r in read_metrics(colar_dir / "metrics.jsonl", "step")}
        assert {m.step: m.value for m in history} == pytest.approx(losses, rel=1e-6)
        assert {a.path for a in client.list_artifacts(child_id)} >= {"model", "plots"}
        assert "plots/training_curves.png" in {a.path for a in client.list_artifacts(child_id, "plots")}
        parent = client.get_run(parent_id)
        assert parent.info.status == "FINISHED" and "time/sft-colar/wall_s" in parent.data.metrics
        assert not list(pending_dir().glob("*.jsonl")) and len(list(pending_dir().glob("*.jsonl.replayed"))) == 2
        assert len(read_metrics(colar_dir / "metrics.jsonl", "start")) == 1  # trained once: the retry found it Cached
    finally:
        stop_servers(state_dir)


def test_what_a_run_does_while_the_server_is_away_waits_in_its_pending_file_until_retry(
        tmp_path, monkeypatch, mlflow_server):
    """The pieces the stage uses, against a client whose server is gone: its end (FINISHED, or FAILED
    with the block's own exception), an artifact and metrics are kept, at once, and
    ``end_orphaned_children`` (what ``colar retry`` calls) sends them instead of marking the runs KILLED."""
    from mlflow import MlflowClient

    from colar_infra.tracking.pending import ArtifactRecord, pending_path
    from colar_infra.tracking.runs import (
        end_orphaned_children,
        ending_run,
        log_metrics,
        log_or_defer,
        start_child_run,
        start_parent_run,
    )

    monkeypatch.setenv("COLAR_HOME", str(tmp_path / "home"))
    client = MlflowClient()
    parent = start_parent_run("colar-reliability", "away", client=client)
    done, failed = start_child_run(parent, "sft-colar", client=client), start_child_run(parent, "rl", client=client)
    gone = MlflowClient(f"http://127.0.0.1:{free_port()}")
    plot = tmp_path / "curves.png"
    plot.write_bytes(b"png")

    t0 = time.monotonic()
    with pytest.warns(RuntimeWarning, match="MLflow server away"):
        log_metrics(done, {"loss": 0.5}, step=7, client=gone)
        assert log_or_defer(ArtifactRecord(done, str(plot), "plots"), client=gone) is False
        with ending_run(done, client=gone):
            pass
        with pytest.raises(KeyError, match="the block's own"):  # not an MLflow error from ending the run
            with ending_run(failed, client=gone):
                raise KeyError("the block's own")
    assert time.monotonic() - t0 < 15  # probes, not MLflow's minutes of retries
    records = [json.loads(line) for line in pending_path(done).read_text().splitlines()]
    assert [next(k for k in ("key", "artifact", "end") if k in r) for r in records] == ["key", "artifact", "end"]
    assert client.get_run(done).info.status == "RUNNING"

    assert end_orphaned_children(parent, client=client) == []  # nothing left RUNNING to take for dead
    run = client.get_run(done)
    assert (run.info.status, run.info.end_time) == ("FINISHED", records[-1]["end_time"])
    assert [(m.step, m.value) for m in client.get_metric_history(done, "loss")] == [(7, 0.5)]
    assert [a.path for a in client.list_artifacts(done, "plots")] == ["plots/curves.png"]
    assert client.get_run(failed).info.status == "FAILED"
    assert not pending_path(done).exists() and pending_path(done).with_suffix(".jsonl.replayed").exists()
    client.set_terminated(parent)
