"""Where a pipeline run's pending files live, and that ``colar retry`` finds them from any folder (issue 22,
item 4).

With no ``COLAR_HOME`` the colar home is ``./.colar`` under the current folder. A pipeline run started in
folder A fixes its pending folder, absolute, when its parent run starts (the parent's tag
``colar.pending_dir``); every writer of its runs keeps to it, and a retry started in folder B (a new
process: nothing remembered) reads the tag and sends the files, instead of taking the finished stages
for dead ones.
"""

from __future__ import annotations

import json

import pytest
from mlflow import MlflowClient

from colar_core.net import free_port
from colar_infra.tracking import pending
from colar_infra.tracking.metrics_sender import MlflowMetricsCallback
from colar_infra.tracking.pending import PENDING_DIR_TAG, ArtifactRecord, EndRecord, append_records, pending_path
from colar_infra.tracking.runs import (
    ORPHAN_TAG,
    end_orphaned_children,
    ending_run,
    log_metrics,
    log_or_defer,
    start_child_run,
    start_parent_run,
)


def _a_new_process(monkeypatch) -> None:
    """What a fresh ``colar retry`` process knows of pending folders: nothing."""
    monkeypatch.setattr(pending, "_FOLDERS", {})


def test_retry_from_another_folder_finds_and_sends_what_a_run_could_not(tmp_path, monkeypatch, mlflow_server):
    folder_a, folder_b = tmp_path / "a", tmp_path / "b"
    folder_a.mkdir()
    folder_b.mkdir()
    monkeypatch.delenv("COLAR_HOME")
    monkeypatch.chdir(folder_a)
    client = MlflowClient()
    parent = start_parent_run("colar-pending-location", "moved", client=client)
    child = start_child_run(parent, "sft-colar", client=client)
    older = start_child_run(parent, "sft-cot", client=client)  # its end: in an older version's pending file
    recorded = folder_a / ".colar" / "unflushed"
    assert client.get_run(parent).data.tags[PENDING_DIR_TAG] == str(recorded)

    # The server goes away; the stage's writers keep what it could not take. Meanwhile the process's
    # current folder changes: the files still go to the folder the run recorded.
    gone = MlflowClient(f"http://127.0.0.1:{free_port()}")
    plot = tmp_path / "curves.png"
    plot.write_bytes(b"png")
    monkeypatch.chdir(folder_b)
    callback = MlflowMetricsCallback(gone, child, max_retries=0)
    callback.on_step(1, {"loss": 2.0})
    with pytest.warns(RuntimeWarning):
        callback.close()
        log_metrics(child, {"acc": 0.5}, step=2, client=gone)
        assert log_or_defer(ArtifactRecord(child, str(plot), "plots"), client=gone) is False
        with ending_run(child, client=gone):
            pass
        log_metrics(parent, {"time/sft-colar/wall_s": 3.0}, client=gone)
        with ending_run(parent, client=gone):
            pass
    assert sorted(p.name for p in recorded.iterdir()) == sorted([f"{child}.jsonl", f"{parent}.jsonl"])
    assert not (folder_b / ".colar").exists()
    child_ended_at = json.loads(pending_path(child).read_text().splitlines()[-1])["end_time"]

    # A retry in a new process started in folder B, no COLAR_HOME. A file an older version left in
    # B's home (here: another stage's end) is sent too.
    _a_new_process(monkeypatch)
    assert pending_path(child) == folder_b / ".colar" / "unflushed" / f"{child}.jsonl"  # unknown run: the home
    append_records(folder_b / ".colar" / "unflushed" / f"{older}.jsonl", [EndRecord(older, "FINISHED", 5)])
    assert end_orphaned_children(parent, client=client) == []  # nothing taken for a dead stage
    run = client.get_run(child)
    assert (run.info.status, run.info.end_time) == ("FINISHED", child_ended_at)
    assert ORPHAN_TAG not in run.data.tags
    assert [(m.step, m.value) for m in client.get_metric_history(child, "loss")] == [(1, 2.0)]
    assert [(m.step, m.value) for m in client.get_metric_history(child, "acc")] == [(2, 0.5)]
    assert [a.path for a in client.list_artifacts(child, "plots")] == ["plots/curves.png"]
    assert client.get_run(older).info.status == "FINISHED"
    assert client.get_run(parent).data.metrics["time/sft-colar/wall_s"] == 3.0
    assert client.get_run(parent).info.status == "FINISHED"
    assert not list(recorded.glob("*.jsonl")) and len(list(recorded.glob("*.jsonl.replayed"))) == 2

    # From then on the retry's own runs keep to the recorded folder too, whatever its current folder.
    assert pending_path(parent) == recorded / f"{parent}.jsonl"
    again = start_child_run(parent, "evaluate", client=client)
    assert pending_path(again) == recorded / f"{again}.jsonl"
