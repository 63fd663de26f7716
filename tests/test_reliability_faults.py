"""Reliability, faults: a pipeline SIGKILLed mid-stage and retried, MLflow down at start or lost
mid-training, an unwritable checkpoint directory.

Library-level exact resume after SIGKILL is tested in tests/test_training_distributed.py (SFT) and
tests/test_rl_jobs.py / tests/test_rl_training.py (RL); here the whole pipeline is killed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.pipeline_run import TINY, cli_env, colar_cmd
from colar_core.evaluation import without_timings
from colar_core.net import free_port
from colar_core.training.checkpoint import COMPLETE, CheckpointError, latest_checkpoint
from tests.helpers import child_runs, sigkill_at_checkpoint, toy_loop

#: Evaluation metrics of a killed-and-retried run vs an uninterrupted one. Training resumes exactly
#: (weights, optimizer, RNG and data position are checkpointed) and evaluation sampling is seeded,
#: so they are expected to be equal; the tolerance only absorbs float formatting.
METRIC_TOL = 1e-9


# ---------------------------------------------------------------------------------------------
# MLflow down at start


def test_colar_run_with_dead_mlflow_fails_fast_naming_the_uri(tmp_path, monkeypatch, capsys):
    from flows.cli import main

    uri = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)  # it must not start a Prefect server meanwhile
    monkeypatch.setenv("COLAR_HOME", str(tmp_path / "home"))
    t0 = time.monotonic()
    code = main(["run", "--set", f"output_dir={tmp_path / 'out'}"])
    elapsed = time.monotonic() - t0
    try:
        err = capsys.readouterr().err
        assert code == 3
        assert err.startswith(f"colar run: MLflow server at {uri} (from $MLFLOW_TRACKING_URI) does not answer"), err
        assert elapsed < 10
        assert not (tmp_path / "home" / "servers.json").exists()  # no server started
        assert not (tmp_path / "out").exists()
    finally:
        from colar_infra.servers import stop_servers

        stop_servers(tmp_path / "home")


# ---------------------------------------------------------------------------------------------
# MLflow lost mid-training


@pytest.mark.slow
def test_mlflow_lost_mid_training_training_goes_on_and_metrics_are_flushed_when_it_returns(tmp_path):
    """A real MLflow server is stopped at step 10 and restarted on the same port (same store) at step 20."""
    from mlflow import MlflowClient

    from colar_infra.servers import ensure_mlflow, stop_servers
    from colar_infra.tracking.metrics_sender import MlflowMetricsCallback
    from colar_infra.tracking.runs import end_run, start_parent_run

    state_dir, port = tmp_path / "mlflow", free_port()
    uri = ensure_mlflow(state_dir, port=port)
    try:
        client = MlflowClient(uri)
        run_id = start_parent_run("colar-reliability", "outage", client=client)
        fallback = tmp_path / "unflushed.jsonl"
        metrics_cb = MlflowMetricsCallback(client, run_id, flush_every=2, max_retries=1, backoff_s=0.05,
                                           fallback_path=fallback)
        seen = {}

        class Outage:
            def on_step(self, step, metrics):
                if step == 10:
                    assert metrics_cb.flush(wait=True)  # steps 1-10 reached the server
                    stop_servers(state_dir)
                    seen["down_at"] = time.monotonic()
                elif step == 15:
                    assert metrics_cb.flush(wait=True, timeout_s=30) is False  # a flush fails: buffer kept
                    seen["pending"] = metrics_cb.pending()
                elif step == 20:
                    seen["steps_11_20_s"] = time.monotonic() - seen["down_at"]
                    assert ensure_mlflow(state_dir, port=port) == uri  # back, same port and store

        state = toy_loop(tmp_path / "run", callbacks=[metrics_cb, Outage()])
        assert state.step == 30 and state.finished  # training went on through the outage
        assert seen["pending"] >= 5 * 2  # loss + lr of steps 11-15 at least, held in memory
        assert seen["steps_11_20_s"] < 40  # no step waited for the server (the flush at 15 is bounded)
        metrics_cb.close()
        assert metrics_cb.pending() == 0 and not fallback.exists()
        history = client.get_metric_history(run_id, "loss")
        assert sorted(m.step for m in history) == list(range(1, 31))  # every step, none twice
        end_run(run_id, client=client)
    finally:
        stop_servers(state_dir)


# ---------------------------------------------------------------------------------------------
# Checkpoint directory unwritable


@contextlib.contextmanager
def unwritable(path: Path):
    """Make ``path`` refuse new entries: chmod for a normal user; root ignores modes, so chattr +i
    (immutable) there. If neither works, creating entries in it is made to fail with EACCES."""
    if os.geteuid() != 0:
        path.chmod(0o555)
        try:
            yield "chmod"
        finally:
            path.chmod(0o755)
        return
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0:
        try:
            yield "chattr"
        finally:
            subprocess.run(["chattr", "-i", str(path)], check=True)
        return
    real_mkdir = Path.mkdir

    def mkdir(self, *args, **kwargs):
        if Path(self).parent == path:
            raise PermissionError(13, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Path, "mkdir", mkdir)
        yield "simulated"


def test_unwritable_checkpoint_directory_is_a_clear_error_and_the_previous_checkpoint_stays_valid(tmp_path):
    out = tmp_path / "run"
    root = out / "checkpoints"
    with contextlib.ExitStack() as stack:
        class LockAfterFirst:
            def on_checkpoint(self, step, path):
                if step == 10:
                    stack.enter_context(unwritable(root))

        with pytest.raises(CheckpointError) as info:
            toy_loop(out, callbacks=[LockAfterFirst()])
    msg = str(info.value)
    assert f"cannot write checkpoint step 20 under {root}" in msg
    assert "step_00000010 is intact" in msg and "run the stage again" in msg
    assert re.search(r"not permitted|denied", msg)
    assert latest_checkpoint(out).name == "step_00000010" and (root / "step_00000010" / COMPLETE).is_file()
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp-")]

    resumed = toy_loop(out)  # writable again: the same run resumes from step 10 and finishes
    assert resumed.resumed_from == 10 and resumed.step == 30
    assert latest_checkpoint(out).name == "step_00000030"


# ---------------------------------------------------------------------------------------------
# SIGKILL mid-pipeline, then `colar retry`


def test_still_running_tells_a_live_pipeline_process_from_a_dead_one():
    from types import SimpleNamespace

    from flows.pipeline import PROCESS_TAG, _process_identity, still_running

    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        run = SimpleNamespace(info=SimpleNamespace(status="RUNNING"),
                              data=SimpleNamespace(tags={PROCESS_TAG: _process_identity(proc.pid)}))
        assert still_running(run) == f"process {proc.pid} on {socket.gethostname()}"
        run.info.status = "FAILED"
        assert still_running(run) is None
        run.info.status = "RUNNING"
        proc.kill()
        deadline = time.time() + 10
        while Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
            assert time.time() < deadline
            time.sleep(0.01)
        assert still_running(run) is None  # killed, not yet reaped (a zombie): gone
    finally:
        proc.kill()
        proc.wait()
    assert still_running(run) is None  # killed: an orphan that retry may take over


@pytest.mark.slow
def test_pipeline_killed_in_sft_colar_resumes_on_retry_and_matches_an_uninterrupted_run(
        tmp_path, mlflow_server, prefect_server, one_thread):
    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client

    from colar_core.training.sft import SFTResult
    from flows.cli import main
    from flows.config import load_config
    from flows.pipeline import run_pipeline

    overrides = TINY + ["tracking.registered_model_name=null", "sft_colar.max_steps=40",
                        "sft_colar.checkpoint_every=4"]
    killed_root = tmp_path / "killed" / "runs"
    log_path = tmp_path / "killed.log"
    sigkill_at_checkpoint(colar_cmd("run", overrides=overrides + ["name=rel-kill", f"output_dir={killed_root}"]),
                          cli_env(MLFLOW_TRACKING_URI=mlflow_server, PREFECT_API_URL=prefect_server),
                          killed_root, f"sft-colar-*/checkpoints/step_*/{COMPLETE}", log_path, timeout_s=300, tail=4000,
                          what="sft-colar wrote no checkpoint")
    colar_dir = next(killed_root.glob("sft-colar-*"))
    killed_at = int(latest_checkpoint(colar_dir).name.split("_")[1])
    assert 4 <= killed_at < 40

    client = MlflowClient()
    exp = client.get_experiment_by_name("colar")
    parent = client.search_runs([exp.experiment_id], filter_string="attributes.run_name = 'rel-kill'")[0]
    parent_id, flow_run_id = parent.info.run_id, parent.data.tags["prefect.flow_run_id"]
    # What SIGKILL leaves behind: everything RUNNING.
    assert parent.info.status == "RUNNING"
    orphan = {r.data.tags["colar.stage"]: r for r in child_runs(client, parent_id)}["sft-colar"]
    assert orphan.info.status == "RUNNING"
    with get_client(sync_client=True) as pc:
        assert pc.read_flow_run(flow_run_id).state.is_running()

    assert main(["retry", parent_id]) == 0

    stages = sorted((r.data.tags["colar.stage"], r.info.status) for r in child_runs(client, parent_id))
    assert stages == [("evaluate", "FINISHED"), ("prepare", "FINISHED"), ("sft-colar", "FINISHED"),
                      ("sft-colar", "KILLED"), ("sft-cot", "FINISHED")]
    orphan = client.get_run(orphan.info.run_id)
    assert orphan.info.status == "KILLED" and "orphaned" in orphan.data.tags["colar.end_reason"]
    assert client.get_run(parent_id).info.status == "FINISHED"
    with get_client(sync_client=True) as pc:
        assert pc.read_flow_run(flow_run_id).state.type.value == "CRASHED"
    result = SFTResult.load(colar_dir)
    assert result.resumed_from == killed_at and result.final_step == 40

    # The same config, uninterrupted, in another output dir.
    reference = run_pipeline(load_config(None, overrides + ["name=rel-kill-ref", f"output_dir={tmp_path / 'ref'}"]),
                             return_state=True)
    assert reference.is_completed(), reference.message
    expected = without_timings(reference.result()["metrics"])  # decoding wall times differ run to run
    evaluate = next(r for r in child_runs(client, parent_id)
                    if r.data.tags["colar.stage"] == "evaluate" and r.info.status == "FINISHED")
    got = {k: v for k, v in evaluate.data.metrics.items() if k in expected}
    assert set(got) == set(expected) and any(k.startswith("accuracy/c") for k in got)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=METRIC_TOL), key
    # The tiny model's evaluation metrics are nearly degenerate, so compare what they come from too:
    # the resumed CoLaR model is bit-identical to the uninterrupted one, and so is its last loss.
    from colar_core.files import content_digest
    from colar_core.training.callbacks import read_metrics

    ref_colar = next((tmp_path / "ref").glob("sft-colar-*"))
    # The keys differ (the output folder is part of every key), the data they were trained on does not.
    assert colar_dir.name != ref_colar.name
    data = [json.loads(next(root.glob("prepare-*/stage_result.json")).read_text())["digest"]
            for root in (colar_dir.parent, ref_colar.parent)]
    assert data[0] == data[1]
    assert content_digest(colar_dir / "model") == content_digest(ref_colar / "model")
    last = [read_metrics(d / "metrics.jsonl", "step")[-1] for d in (colar_dir, ref_colar)]
    assert last[0]["step"] == last[1]["step"] == 40 and last[0]["loss"] == last[1]["loss"]
