"""The pipeline's MLflow helpers (colar_infra.tracking.params, .runs, .pending, .metrics_sender, .system_metrics
and colar_infra.tracking.artifacts) against a real MLflow server: params, runs, metrics callback, pending files, system
metrics, datasets, artifacts."""

from __future__ import annotations

import inspect
import json
import math
import socket
import threading
import time
import warnings

import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient

from colar_infra.secrets import MASK
from colar_infra.tracking import metrics_sender, pending, runs
from colar_infra.tracking.artifacts import log_artifact_dir, log_dataset_input
from colar_infra.tracking.metrics_sender import MlflowMetricsCallback
from colar_infra.tracking.params import flatten_params
from colar_infra.tracking.pending import (
    ArtifactRecord,
    EndRecord,
    MetricRecord,
    TagRecord,
    append_records,
    from_json,
    read_records,
    replay_pending,
)
from colar_infra.tracking.runs import PARENT_TAG, STAGE_TAG, end_run, find_child_run, start_child_run, start_parent_run
from colar_infra.tracking.system_metrics import system_metrics_monitor


def _dead_uri() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture
def run_id(mlflow_server):
    rid = start_parent_run("colar-tests", "callback", tags={}, params={})
    yield rid
    end_run(rid)


# ---- flatten_params (no server) -----------------------------------------------------------


def test_flatten_params_dots_joins_and_truncates():
    flat = flatten_params(
        {
            "model": {"name_or_path": "tiny", "lora": {"r": 128, "target_modules": ["q_proj", "v_proj"]}},
            "lr": 1e-4,
            "steps": [{"name": "sft"}, {"name": "rl"}],
            "note": "x" * 7000,
            "empty": None,
        },
        prefix="cfg",
    )
    assert flat["cfg.model.name_or_path"] == "tiny"
    assert flat["cfg.model.lora.r"] == "128"
    assert flat["cfg.model.lora.target_modules"] == "q_proj,v_proj"
    assert flat["cfg.lr"] == "0.0001"
    assert flat["cfg.steps.0.name"] == "sft" and flat["cfg.steps.1.name"] == "rl"
    assert len(flat["cfg.note"]) == 6000  # MLflow's param value limit
    assert flat["cfg.empty"] == "None"
    assert all(isinstance(v, str) for v in flat.values())


def test_flatten_params_accepts_pydantic_configs():
    from pydantic import BaseModel

    class Lora(BaseModel):
        r: int = 8
        target_modules: list[str] = ["q_proj"]

    class Cfg(BaseModel):
        lora: Lora = Lora()

    assert flatten_params(Cfg()) == {"lora.r": "8", "lora.target_modules": "q_proj"}


def test_flatten_params_masks_secrets(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_SECRETabcdef123456")
    monkeypatch.setenv("FEATURE_KEY", "1")  # too short to mask anything
    flat = flatten_params(
        {
            "hf_token": "anything",
            "auth": {"password": "hunter22", "api_key": "k-123", "apiKey": "k-456", "client_secret": "s"},
            "tokenizer": {"max_new_tokens": 64, "pad_token_id": 0, "eos_token": "<eos>", "name": "tiny"},
            "hub_auth": "hf_SECRETabcdef123456",
            "cmd": "download --token hf_SECRETabcdef123456 --fast",
            "db": "postgresql://colar:pw1234@db:5432/mlflow",
            "workers": 1,
        }
    )
    for key in ("hf_token", "auth.password", "auth.api_key", "auth.apiKey", "auth.client_secret"):
        assert flat[key] == MASK, key
    assert flat["hub_auth"] == MASK  # value of a *TOKEN* env var
    assert flat["cmd"] == f"download --token {MASK} --fast"
    assert flat["db"] == f"postgresql://colar:{MASK}@db:5432/mlflow"
    # ordinary ML parameters that merely contain "token" are kept
    assert flat["tokenizer.max_new_tokens"] == "64"
    assert flat["tokenizer.pad_token_id"] == "0"
    assert flat["tokenizer.eos_token"] == "<eos>"
    assert flat["tokenizer.name"] == "tiny"
    assert flat["workers"] == "1"
    assert not any("hf_SECRET" in v or "hunter22" in v for v in flat.values())


# ---- runs ---------------------------------------------------------------------------------


def test_parent_and_child_runs_are_nested_tagged_and_findable(mlflow_server):
    client = MlflowClient()
    parent = start_parent_run(
        "colar-tests",
        "pipeline-1",
        tags={"colar.pipeline": "test", "colar.seed": 7},
        params={"sft": {"lr": 1e-4, "epochs": 2}, "hub": {"token": "abc"}},
    )
    assert mlflow.active_run() is None  # nothing went through the thread-global active run
    prun = client.get_run(parent)
    assert prun.info.run_name == "pipeline-1" and prun.info.status == "RUNNING"
    assert prun.data.tags["colar.pipeline"] == "test" and prun.data.tags["colar.seed"] == "7"
    assert prun.data.params == {"sft.lr": "0.0001", "sft.epochs": "2", "hub.token": MASK}

    sft = start_child_run(parent, "sft", {"max_steps": 10})
    crun = client.get_run(sft)
    assert crun.info.experiment_id == prun.info.experiment_id
    assert crun.data.tags[PARENT_TAG] == parent
    assert crun.data.tags[STAGE_TAG] == "sft"
    assert crun.info.run_name == "sft"
    assert crun.data.params == {"max_steps": "10"}

    # a retried flow skips only stages that finished
    assert find_child_run(parent, "sft") is None
    assert find_child_run(parent, "sft", status=None).info.run_id == sft
    end_run(sft, "FAILED")
    assert find_child_run(parent, "sft") is None
    sft2 = start_child_run(parent, "sft", {"max_steps": 10})
    start_child_run(parent, "rl", {})
    end_run(sft2)
    found = find_child_run(parent, "sft")
    assert found.info.run_id == sft2 and found.info.status == "FINISHED"
    assert find_child_run(parent, "evaluate") is None

    end_run(parent, "COMPLETED")  # Prefect's word is accepted
    assert client.get_run(parent).info.status == "FINISHED"
    with pytest.raises(ValueError):
        end_run(parent, "DONE-ish")


def test_child_runs_can_be_created_from_worker_threads(mlflow_server):
    """Prefect runs tasks in threads: children are created by id, not via the active run."""
    parent = start_parent_run("colar-tests", "threads", tags={}, params={})
    ids: dict[str, str] = {}

    def stage(name):
        ids[name] = start_child_run(parent, name, {"stage": name})
        end_run(ids[name])

    threads = [threading.Thread(target=stage, args=(n,)) for n in ("sft", "rl")]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert {n: find_child_run(parent, n).info.run_id for n in ("sft", "rl")} == ids


# ---- metrics callback ---------------------------------------------------------------------


def test_callback_metrics_come_back_from_the_server(run_id, tmp_path):
    client = MlflowClient()
    cb = MlflowMetricsCallback(client, run_id, flush_every=5, fallback_path=tmp_path / "fallback.jsonl")
    for step in range(12):
        cb.on_step(step, {"loss": 1.0 / (step + 1), "lr": 0.1, "note": "not a number"})
    cb.on_eval(10, {"accuracy": 0.5, "eval/latent_len": 3})
    cb.on_checkpoint(10, "/ckpt/step-10")
    cb.close()

    loss = client.get_metric_history(run_id, "loss")
    assert [m.step for m in sorted(loss, key=lambda m: m.step)] == list(range(12))
    assert sorted(loss, key=lambda m: m.step)[3].value == pytest.approx(0.25)
    assert [m.value for m in client.get_metric_history(run_id, "eval/accuracy")] == [0.5]
    assert [m.step for m in client.get_metric_history(run_id, "eval/latent_len")] == [10]
    assert client.get_metric_history(run_id, "note") == []
    tags = client.get_run(run_id).data.tags
    assert tags["colar.checkpoint.latest"] == "/ckpt/step-10" and tags["colar.checkpoint.step"] == "10"
    assert cb.pending() == 0 and cb.flushed_metrics == 12 * 2 + 2 + 1
    assert not (tmp_path / "fallback.jsonl").exists()


class _FlakyClient:
    """A real client whose first ``failures`` log_batch calls fail like a restarting server."""

    def __init__(self, failures: int):
        self._client = MlflowClient()
        self.failures = failures

    def log_batch(self, *args, **kwargs):
        if self.failures > 0:
            self.failures -= 1
            raise ConnectionError("server restarting")
        return self._client.log_batch(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._client, name)


def test_callback_keeps_buffer_when_server_unreachable_and_sends_at_next_flush(run_id, tmp_path):
    client = _FlakyClient(failures=1)
    cb = MlflowMetricsCallback(client, run_id, flush_every=1000, max_retries=0, fallback_path=tmp_path / "f.jsonl")
    for step in range(3):
        cb.on_step(step, {"loss": float(step)})
    assert cb.flush(wait=True) is False  # this flush failed: the buffer is kept
    assert cb.pending() == 3 and isinstance(cb.last_error, ConnectionError)
    for step in range(3, 6):
        cb.on_step(step, {"loss": float(step)})
    assert cb.flush(wait=True) is True  # the next flush sends the old and the new metrics
    cb.close()
    history = MlflowClient().get_metric_history(run_id, "loss")
    assert sorted(m.step for m in history) == list(range(6))
    assert not (tmp_path / "f.jsonl").exists()


def test_callback_survives_dead_server_and_writes_fallback_file(run_id, tmp_path):
    fallback = tmp_path / "unflushed.jsonl"
    dead = MlflowClient(_dead_uri())
    cb = MlflowMetricsCallback(dead, run_id, flush_every=2, max_retries=2, backoff_s=0.01, fallback_path=fallback)
    t0 = time.monotonic()
    for step in range(5):
        cb.on_step(step, {"loss": 0.5 * step, "lr": 1e-3})
    cb.on_eval(4, {"accuracy": 0.25})
    cb.on_checkpoint(4, "/ckpt/step-4")
    assert time.monotonic() - t0 < 1.0  # the training loop is never held up
    with pytest.warns(RuntimeWarning, match="could not be sent"):
        cb.close()
    assert time.monotonic() - t0 < 20

    records = [json.loads(line) for line in fallback.read_text().splitlines()]
    metrics = [r for r in records if "key" in r]
    assert len(metrics) == 5 * 2 + 1 + 1  # loss+lr per step, eval/accuracy, checkpoint_step
    assert {r["run_id"] for r in records} == {run_id}
    assert {"run_id": run_id, "tag": "colar.checkpoint.latest", "value": "/ckpt/step-4"} in records
    cb.on_step(6, {"loss": 1.0})  # after close: ignored, still no exception

    # the file can be replayed once the server is back (here: the live session server)
    assert replay_pending(fallback, MlflowClient()) == len(records)
    history = MlflowClient().get_metric_history(run_id, "loss")
    assert sorted(m.step for m in history) == list(range(5))


# ---- datasets and artifacts ---------------------------------------------------------------


def test_dataset_input_is_logged_with_digest_name_and_context(run_id, tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"question": f"q{i}", "answer": str(i)}) + "\n" for i in range(4)))
    log_dataset_input(run_id, path, digest="d1g3st01", name="gsm8k-aug-train", context="training")
    log_dataset_input(run_id, pd.DataFrame({"x": [1, 2]}), digest="d1g3st02", name="eval-set", context="eval",
                      source="s3://bucket/eval.jsonl")

    inputs = {d.dataset.name: d for d in MlflowClient().get_run(run_id).inputs.dataset_inputs}
    train = inputs["gsm8k-aug-train"]
    assert train.dataset.digest == "d1g3st01"
    assert path.as_uri() in train.dataset.source
    assert {t.key: t.value for t in train.tags}["mlflow.data.context"] == "training"
    assert "question" in train.dataset.schema
    ev = inputs["eval-set"]
    assert ev.dataset.digest == "d1g3st02" and "s3://bucket/eval.jsonl" in ev.dataset.source
    assert {t.key: t.value for t in ev.tags}["mlflow.data.context"] == "eval"


def test_artifact_dir_is_uploaded(run_id, tmp_path):
    ckpt = tmp_path / "ckpt"
    (ckpt / "sub").mkdir(parents=True)
    (ckpt / "config.json").write_text("{}")
    (ckpt / "sub" / "weights.bin").write_bytes(b"\0" * 10)
    client = MlflowClient()
    log_artifact_dir(client, run_id, ckpt, "checkpoints/final")
    log_artifact_dir(None, run_id, ckpt / "config.json", "single")
    listed = {a.path for a in client.list_artifacts(run_id, "checkpoints/final")}
    assert listed == {"checkpoints/final/config.json", "checkpoints/final/sub"}
    assert [a.path for a in client.list_artifacts(run_id, "single")] == ["single/config.json"]
    with pytest.raises(FileNotFoundError):
        log_artifact_dir(client, run_id, tmp_path / "missing", "x")


def test_callback_cleans_metric_names_and_keeps_nan(run_id, tmp_path):
    client = MlflowClient()
    with MlflowMetricsCallback(client, run_id, fallback_path=tmp_path / "f.jsonl") as cb:
        cb.on_train_start({"max_steps": 3, "resumed_from": None, "world_size": 1})
        cb.on_step(1, {"acc@c=5": 0.5, "grad_norm": float("nan"), "r": float("inf"), "/loss//ce/": 2.0})
        cb.on_eval(1, {"mean #L": 4.0})
        cb.on_train_end({"best_score": 0.5})
    run = client.get_run(run_id)
    assert run.data.metrics["acc_c_5"] == 0.5 and run.data.metrics["loss/ce"] == 2.0
    assert run.data.metrics["eval/mean _L"] == 4.0
    assert run.data.metrics["r"] >= 1.7e308  # MLflow stores inf as the largest float
    assert [m.value != m.value for m in client.get_metric_history(run_id, "grad_norm")] == [True]  # NaN
    assert run.data.tags["colar.train.max_steps"] == "3" and run.data.tags["colar.train.best_score"] == "0.5"
    assert "colar.train.resumed_from" not in run.data.tags
    assert not (tmp_path / "f.jsonl").exists()


def test_callback_sets_aside_batches_the_server_refuses(mlflow_server, tmp_path):
    client = MlflowClient()
    rid = start_parent_run("colar-tests", "deleted", tags={}, params={})
    client.delete_run(rid)  # logging to a deleted run is refused for good: no endless retries
    cb = MlflowMetricsCallback(client, rid, max_retries=5, backoff_s=1.0, fallback_path=tmp_path / "f.jsonl")
    cb.on_step(1, {"loss": 1.0})
    t0 = time.monotonic()
    with pytest.warns(RuntimeWarning, match="could not be sent"):
        cb.close()
    assert time.monotonic() - t0 < 5
    assert [json.loads(x)["key"] for x in (tmp_path / "f.jsonl").read_text().splitlines()] == ["loss"]


def test_callback_sends_large_batches_in_chunks_within_mlflow_limits(run_id, tmp_path):
    client = MlflowClient()
    cb = MlflowMetricsCallback(client, run_id, flush_every=10_000, fallback_path=tmp_path / "f.jsonl")
    cb.on_checkpoint(0, "/ckpt/0")  # tags + metrics in the same batch
    for step in range(1, 701):
        cb.on_step(step, {"loss": 1.0, "lr": 0.1, "ce": 0.5})  # 2100 metrics
    cb.close()
    assert len(client.get_metric_history(run_id, "ce")) == 700
    assert cb.flushed_metrics == 2101 and not (tmp_path / "f.jsonl").exists()


def test_callback_memory_stays_bounded_during_a_long_outage(tmp_path):
    fallback = tmp_path / "f.jsonl"
    cb = MlflowMetricsCallback(MlflowClient(_dead_uri()), "0" * 32, flush_every=10_000, max_retries=0,
                               max_buffer=1000, fallback_path=fallback)
    for step in range(1500):
        cb.on_step(step, {"loss": 1.0})
    with pytest.warns(RuntimeWarning, match="moved to"):
        assert cb.flush(wait=True) is False
    assert cb.pending() == 750 and len(fallback.read_text().splitlines()) == 750
    with pytest.warns(RuntimeWarning, match="could not be sent"):
        cb.close()
    steps = [json.loads(x)["step"] for x in fallback.read_text().splitlines()]
    assert steps == list(range(1500))  # oldest first, nothing lost


# ---- the pending file ---------------------------------------------------------------------


def test_pending_records_round_trip_through_their_json_line(tmp_path):
    records = [MetricRecord("r1", "loss", 0.25, 7, 1_700_000_000_000),
               MetricRecord("r1", "grad_norm", float("inf"), 8, 1_700_000_000_001),
               MetricRecord("r1", "neg", float("-inf"), 8, 1_700_000_000_001),
               TagRecord("r1", "colar.checkpoint.step", "10"),
               ArtifactRecord("r1", "/abs/model", "model"), ArtifactRecord("r1", "/abs/notes.txt"),
               EndRecord("r1", "FINISHED", 1_700_000_000_002)]
    for record in records:
        assert from_json(record.to_json()) == record
    nan = from_json(MetricRecord("r1", "x", float("nan"), 1, 2).to_json())
    assert isinstance(nan.value, float) and math.isnan(nan.value)
    path = append_records(tmp_path / "sub" / "r1.jsonl", records[:3])
    append_records(path, records[3:])
    assert read_records(path).records == records  # one reader, typed records, in the order written
    # the file's lines are what the docs show (and what tests/test_reliability_outage.py reads)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[0] == {"run_id": "r1", "key": "loss", "value": 0.25, "step": 7, "timestamp": 1_700_000_000_000}
    assert lines[3] == {"run_id": "r1", "tag": "colar.checkpoint.step", "value": "10"}
    assert lines[4] == {"run_id": "r1", "artifact": "/abs/model", "artifact_path": "model"}
    assert lines[6] == {"run_id": "r1", "end": "FINISHED", "end_time": 1_700_000_000_002}
    assert '"value": Infinity' in path.read_text() and '"inf"' not in path.read_text()


def test_a_line_cut_short_by_a_crash_costs_only_itself_and_a_bad_record_is_named(tmp_path):
    path = tmp_path / "r1.jsonl"
    append_records(path, [MetricRecord("r1", "loss", 1.0, 1, 5)])
    with open(path, "a") as fh:
        fh.write('{"run_id": "r1", "key": "loss", "val')  # the process died here
    append_records(path, [EndRecord("r1", "FAILED", 9)])
    found = read_records(path)
    assert found.records == [MetricRecord("r1", "loss", 1.0, 1, 5), EndRecord("r1", "FAILED", 9)]
    assert [(u.line, u.text) for u in found.unreadable] == [(2, '{"run_id": "r1", "key": "loss", "val')]
    assert "cut short" in found.unreadable[0].reason
    bad = tmp_path / "bad.jsonl"
    bad.write_text(MetricRecord("r1", "loss", 1.0, 1, 5).to_json() + '\n{"run_id": "r1", "key": "loss", "value": "0.5",'
                   ' "step": 1, "timestamp": 5}\n')
    found = read_records(bad)
    assert found.records == [MetricRecord("r1", "loss", 1.0, 1, 5)]
    assert found.unreadable[0].line == 2
    assert "field 'value' of a metric record must be int or float" in found.unreadable[0].reason
    with pytest.raises(ValueError, match="not a pending record"):
        from_json('{"run_id": "r1", "what": 1}')


def test_both_writers_are_the_one_fsynced_writer(tmp_path, monkeypatch):
    """The training callback's fallback and the run helpers (metrics, artifacts, ends) append through
    ``pending.append_records``, which fsyncs every write."""
    assert metrics_sender.append_records is pending.append_records and runs.append_records is pending.append_records
    monkeypatch.setenv("COLAR_HOME", str(tmp_path / "home"))
    synced = []  # the files fsynced
    real_fsync = pending.os.fsync
    monkeypatch.setattr(pending.os, "fsync", lambda fd: (synced.append(pending.os.readlink(f"/proc/self/fd/{fd}")),
                                                         real_fsync(fd))[1])
    dead = MlflowClient(_dead_uri())
    cb = MlflowMetricsCallback(dead, "a" * 32, max_retries=0)
    cb.on_step(1, {"loss": 1.0})
    with pytest.warns(RuntimeWarning, match="could not be sent"):
        cb.close()
    assert synced == [str(pending.pending_path("a" * 32))]
    with pytest.warns(RuntimeWarning, match="MLflow server away"):
        runs.log_metrics("a" * 32, {"acc": 0.5}, step=2, client=dead)
        runs.log_or_defer(EndRecord("a" * 32, "FINISHED", 3), client=dead)
    assert synced == [str(pending.pending_path("a" * 32))] * 3
    assert [type(r) for r in read_records(pending.pending_path("a" * 32)).records] == [MetricRecord, MetricRecord,
                                                                                    EndRecord]


def test_a_nan_metric_the_sender_could_not_send_is_replayed_as_nan(run_id, tmp_path):
    fallback = tmp_path / "f.jsonl"
    cb = MlflowMetricsCallback(MlflowClient(_dead_uri()), run_id, max_retries=0, fallback_path=fallback)
    cb.on_step(3, {"grad_norm": float("nan"), "r": float("inf"), "loss": 0.5})
    with pytest.warns(RuntimeWarning, match="could not be sent"):
        cb.close()
    assert '"nan"' not in fallback.read_text() and '"value": NaN' in fallback.read_text()
    values = {r.key: r.value for r in read_records(fallback).records if isinstance(r, MetricRecord)}
    assert isinstance(values["grad_norm"], float) and math.isnan(values["grad_norm"])
    assert values["r"] == float("inf") and values["loss"] == 0.5
    assert replay_pending(fallback, MlflowClient()) == 3
    history = MlflowClient().get_metric_history(run_id, "grad_norm")
    assert [(m.step, math.isnan(m.value)) for m in history] == [(3, True)]
    assert MlflowClient().get_run(run_id).data.metrics["r"] >= 1.7e308  # MLflow stores inf as the largest float


# ---- MLflow's system metrics ----------------------------------------------------------------


def test_mlflow_system_metrics_internals_are_still_there(run_id):
    """``system_metrics.start_mlflow_monitor`` relies on MLflow's non-public ``SystemMetricsMonitor``:
    this fails when an MLflow upgrade changes what it uses (the names, and a short run getting its
    ``system/...`` metrics from the last sample)."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    params = inspect.signature(SystemMetricsMonitor).parameters
    assert list(params)[0] == "run_id" and "tracking_uri" in params
    for method, args in {"start": [], "finish": [], "collect_metrics": [], "aggregate_metrics": [],
                         "publish_metrics": ["metrics"]}.items():
        assert list(inspect.signature(getattr(SystemMetricsMonitor, method)).parameters)[1:] == args, method
    assert callable(SystemMetricsMonitor(run_id, tracking_uri=MlflowClient().tracking_uri).mlflow_logger.flush)

    with warnings.catch_warnings(record=True) as caught:  # a failed start or last sample is only a warning
        warnings.simplefilter("always")
        with system_metrics_monitor(run_id) as running:
            assert running is True
    assert not [w for w in caught if "system metrics" in str(w.message)], [str(w.message) for w in caught]
    metrics = MlflowClient().get_run(run_id).data.metrics
    expected = {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"}
    assert expected <= set(metrics), sorted(metrics)


def test_a_pending_file_from_the_old_sender_reads_its_string_nan_as_a_float():
    """Before one writer held every pending record, the sender's fallback wrote non-finite values as strings."""
    import math

    from colar_infra.tracking.pending import from_json

    for text, check in (('"NaN"', math.isnan), ('"Infinity"', lambda v: v == math.inf),
                        ('"-Infinity"', lambda v: v == -math.inf)):
        record = from_json('{"run_id": "r", "key": "loss", "value": %s, "step": 3, "timestamp": 7}' % text)
        assert check(record.value) and isinstance(record.value, float)


class _RecordingClient:
    """What replay_pending asks of an MLflow client, recorded (a unit test needs no server)."""

    def __init__(self):
        self.metrics, self.tags, self.artifacts, self.ends = [], [], [], []

    def log_batch(self, run_id, metrics=(), tags=(), synchronous=True):
        self.metrics += [(run_id, m.key, m.step) for m in metrics]
        self.tags += [(run_id, t.key) for t in tags]

    def log_artifact(self, run_id, local, artifact_path=None):
        self.artifacts.append((run_id, local))

    log_artifacts = log_artifact

    def set_terminated(self, run_id, status, end_time=None):
        self.ends.append((run_id, status))


def test_a_bad_record_is_set_aside_and_counted_the_others_are_sent_and_the_end_applied(tmp_path):
    """Issue 22 item 2: one record without a timestamp used to stop the whole file on every retry."""
    path = tmp_path / "r1.jsonl"
    append_records(path, [MetricRecord("r1", "loss", 0.1 * i, i, 1_000 + i) for i in range(5)])
    with open(path, "a") as fh:
        fh.write('{"run_id": "r1", "key": "loss", "value": 0.5, "step": 99}\n')
    append_records(path, [EndRecord("r1", "FINISHED", 2_000)])
    client = _RecordingClient()
    with pytest.warns(RuntimeWarning, match=r"1 line\(s\) hold no record.*line 6: field 'timestamp'.*6 other record"):
        assert replay_pending(path, client) == 6
    assert [step for _, _, step in client.metrics] == [0, 1, 2, 3, 4]
    assert client.ends == [("r1", "FINISHED")]
    assert pending.rejected_path(path).read_text() == '{"run_id": "r1", "key": "loss", "value": 0.5, "step": 99}\n'
    assert not path.exists() and path.with_name(path.name + ".replayed").is_file()


def test_a_cut_line_with_a_record_appended_onto_it_is_counted_and_kept_as_written(tmp_path):
    """Issue 22 item 3: a line cut by a crash and the record a later writer appended onto it were both
    dropped silently. The one writer now starts on a fresh line; a file written otherwise still reports
    the merged line and keeps its text in the rejected file, where the appended record can be recovered."""
    path = tmp_path / "r2.jsonl"
    merged = '{"run_id": "r2", "key": "loss", "va' + MetricRecord("r2", "loss", 0.5, 2, 7).to_json()
    path.write_text(MetricRecord("r2", "loss", 1.0, 1, 5).to_json() + "\n" + merged + "\n")
    client = _RecordingClient()
    with pytest.warns(RuntimeWarning, match=r"1 line\(s\) hold no record.*line 2: not JSON"):
        assert replay_pending(path, client) == 1
    assert pending.rejected_path(path).read_text() == merged + "\n"
    append_records(tmp_path / "r3.jsonl", [])  # nothing to write: no file
    cut = tmp_path / "r3.jsonl"
    cut.write_text('{"run_id": "r3", "key": "loss", "va')
    append_records(cut, [MetricRecord("r3", "loss", 0.5, 2, 7)])
    assert read_records(cut).records == [MetricRecord("r3", "loss", 0.5, 2, 7)]
    assert [u.line for u in read_records(cut).unreadable] == [1]
