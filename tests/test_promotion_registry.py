"""The promotion gate against a real MLflow server when reports overlap or repeat (issue 22, items 6
and 8): two runs deciding at once (forced to interleave between reading the alias and moving it), the
lock that makes the read-decide-move one step, and a report retried after Ctrl-C."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from types import SimpleNamespace

import pytest

import tasks.report as report
from colar_infra.tracking.model_lock import ModelLockLost, ModelLockTimeout, lock_name, model_lock

DIGEST = "d" * 64
RULE = {"rule": "better", "metric": "accuracy/c2"}
FAST_LOCK = {"poll_s": 0.05}


def _metrics(accuracy: float) -> dict[str, float]:
    return {"accuracy/c2": accuracy, "accuracy_ci95/c2": 0.0, "accuracy_qci95/c2": 0.03, "n_questions/c2": 500.0,
            "mean_latents/c2": 8.0}


@pytest.fixture
def registry(mlflow_server, tmp_path):
    """``(client, experiment id, registered model name, make_run)``; ``make_run(accuracy)`` makes a
    pipeline run as the report leaves it before the gate (metrics, set digest tags) with a
    registered version: ``(run id, version)``."""
    from mlflow import MlflowClient

    client = MlflowClient()
    exp = client.create_experiment(f"registry-{tmp_path.name}")
    name = f"reg-{tmp_path.name}"
    client.create_registered_model(name)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "MLmodel").write_text("flavors: {}\n")

    def make_run(accuracy: float) -> tuple[str, str]:
        run = client.create_run(exp).info.run_id
        for key, value in _metrics(accuracy).items():
            client.log_metric(run, key, value)
        for tag, value in report.eval_digest_tags({"test": DIGEST}).items():
            client.set_tag(run, tag, value)
        client.log_artifacts(run, str(tmp_path / "m"), "model")
        return run, str(client.create_model_version(name, f"runs:/{run}/model", run_id=run).version)

    return SimpleNamespace(client=client, exp=exp, name=name, make_run=make_run)


def _interleaved(monkeypatch, registry, first: float, second: float, wait_s: float = 1.5) -> str:
    """Run the gate of two runs (accuracies ``first`` and ``second``) in two threads, forced to
    interleave: the first reads the alias, then waits (up to ``wait_s``) for the second to have read
    it too; the second moves only after the first has finished. Returns the version holding
    ``candidate`` at the end, after checking that the lock is gone."""
    from mlflow import MlflowClient

    runs = {acc: registry.make_run(acc) for acc in (first, second)}
    both_read = threading.Barrier(2)
    first_read = threading.Event()
    threads: dict[str, threading.Thread] = {}
    real_decide = report.decide

    def decide_then_pause(new, current, **kwargs):  # between reading the alias and moving it
        decision = real_decide(new, current, **kwargs)
        me = threading.current_thread()
        if me is threads["first"]:
            first_read.set()
        with contextlib.suppress(threading.BrokenBarrierError):
            both_read.wait(timeout=wait_s)  # without the lock the other reads now; with it, it cannot
        if me is threads["second"]:
            threads["first"].join(timeout=30)  # the second run moves last
        return decision

    monkeypatch.setattr(report, "decide", decide_then_pause)
    errors: list[BaseException] = []

    def gate(accuracy: float) -> None:
        try:
            run, version = runs[accuracy]
            report.promote(MlflowClient(), registry.name, version, run, _metrics(accuracy), RULE, **FAST_LOCK)
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads["first"] = threading.Thread(target=gate, args=(first,), name="first")
    threads["second"] = threading.Thread(target=gate, args=(second,), name="second")
    threads["first"].start()
    assert first_read.wait(timeout=30)
    threads["second"].start()
    for t in threads.values():
        t.join(timeout=60)
    assert not errors, errors
    with pytest.raises(Exception, match="RESOURCE_DOES_NOT_EXIST"):
        registry.client.get_registered_model(lock_name(registry.name))  # released
    held = registry.client.get_model_version_by_alias(registry.name, "candidate")
    return {version: acc for acc, (_, version) in runs.items()}[str(held.version)]


@pytest.mark.parametrize("first, second", [(0.90, 0.50), (0.50, 0.90)])
def test_two_reports_deciding_at_once_leave_the_better_run_holding_candidate(monkeypatch, registry, first, second):
    """Issue 22 item 6: both runs read "no candidate" before either moved the alias, and the 0.50 run
    ended up holding it over the 0.90 run. Under the lock the second reads the first one's result."""
    assert _interleaved(monkeypatch, registry, first, second) == 0.90


def test_without_the_lock_the_interleaving_reproduces_the_race(monkeypatch, registry):
    """The harness above really interleaves: with the lock taken away, the 0.50 run wins."""
    class NoLock:
        def check(self) -> None:
            pass

    monkeypatch.setattr(report, "model_lock", lambda *a, **k: contextlib.nullcontext(NoLock()))
    assert _interleaved(monkeypatch, registry, 0.90, 0.50, wait_s=10) == 0.50


def test_the_lock_makes_a_second_holder_wait_then_fail_naming_the_first(registry):
    client, name = registry.client, registry.name
    with model_lock(client, name, owner="run A") as lock:
        assert lock.held()
        t0 = time.monotonic()
        with pytest.raises(ModelLockTimeout, match=r"held by run A .*delete the registered model"):
            with model_lock(client, name, owner="run B", timeout_s=0.5, poll_s=0.05):
                pass
        assert 0.5 <= time.monotonic() - t0 < 10
    with model_lock(client, name, owner="run B", timeout_s=0.5):  # released: taken at once
        pass
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C inside the block releases it too
        with model_lock(client, name, owner="run C"):
            raise KeyboardInterrupt
    with model_lock(client, name, owner="run D", timeout_s=0.5):
        pass


def test_a_lock_left_by_a_dead_holder_is_broken_once_stale(registry, caplog):
    client, name = registry.client, registry.name
    client.create_registered_model(lock_name(name), tags={  # as a SIGKILLed holder leaves it
        "colar.lock.owner": "run dead", "colar.lock.token": "t", "colar.lock.acquired_at": f"{time.time() - 120:.3f}"})
    with pytest.raises(ModelLockTimeout, match="run dead"):  # not stale yet at 300 s
        with model_lock(client, name, owner="run A", timeout_s=0.3, poll_s=0.05):
            pass
    with caplog.at_level(logging.WARNING, logger="colar_infra.tracking.model_lock"):
        with model_lock(client, name, owner="run A", timeout_s=5, stale_after_s=60) as lock:
            assert lock.held()
    assert "breaking stale lock" in caplog.text and "run dead" in caplog.text


def test_a_holder_whose_lock_was_taken_away_does_not_move_the_alias(registry, monkeypatch):
    """A holder so slow that its lock was broken as stale (here: deleted) must not act on what it read."""
    client, name = registry.client, registry.name
    run, version = registry.make_run(0.9)
    real = report._promotion_decision

    def slow_decision(*args, **kwargs):
        decision = real(*args, **kwargs)
        client.delete_registered_model(lock_name(name))  # another waiter broke it meanwhile
        return decision

    monkeypatch.setattr(report, "_promotion_decision", slow_decision)
    with pytest.raises(ModelLockLost):
        report.promote(client, name, version, run, _metrics(0.9), RULE, **FAST_LOCK)
    assert "candidate" not in client.get_registered_model(name).aliases


@pytest.fixture
def tiny_model_dir(tmp_path, one_thread):
    import torch

    from bench.tiny import tiny_model, tiny_tokenizer

    torch.manual_seed(0)
    tok = tiny_tokenizer()
    model = tiny_model(tok)
    model.state.trained_compression_factors = [1, 2]
    model.save_pretrained(tmp_path / "model", tok)
    return str(tmp_path / "model")


@pytest.mark.slow
@pytest.mark.parametrize("interrupted_after", ["version", "alias"])
def test_a_report_retried_after_ctrl_c_keeps_one_version_per_run(registry, tiny_model_dir, tmp_path, monkeypatch,
                                                                  interrupted_after):
    """Issue 22 item 8: Ctrl-C right after the model version was created (or right after the alias
    moved) in the report; the retry registered another version for the same run. Now it finds the
    run's version and reuses it, logging nothing again, and the gate's decision applies to it."""
    from bench.tiny import PROBLEMS

    client, name = registry.client, registry.name
    parent = client.create_run(registry.exp).info.run_id
    monkeypatch.setattr(report, "get_run_logger", lambda: logging.getLogger("test-report"))
    for quiet in ("table1_artifact", "links_artifact"):  # Prefect artifacts: no Prefect server here
        monkeypatch.setattr(report, quiet, lambda *a, **k: None)
    logged: list[str] = []
    real_log = report.log_colar_model
    ctrl_c = {"after": interrupted_after}  # where the first attempt is interrupted; the retry is not

    def log_then_ctrl_c(*args, **kwargs):
        info = real_log(*args, **kwargs)
        logged.append(str(info.registered_model_version))
        if ctrl_c["after"] == "version":
            raise KeyboardInterrupt
        return info

    def artifact_then_ctrl_c(*args, **kwargs):
        if ctrl_c["after"] == "alias":
            raise KeyboardInterrupt

    monkeypatch.setattr(report, "log_colar_model", log_then_ctrl_c)
    monkeypatch.setattr(report, "promotion_artifact", artifact_then_ctrl_c)

    def attempt() -> dict:
        return report.report_stage.fn(parent, _metrics(0.6), tiny_model_dir, str(tmp_path / "report"), name,
                                      PROBLEMS[0].question, RULE, {"test": DIGEST})

    with pytest.raises(KeyboardInterrupt):
        attempt()
    assert len(logged) == 1
    moved = client.get_registered_model(name).aliases.get("candidate")
    assert moved == (logged[0] if interrupted_after == "alias" else None)

    ctrl_c["after"] = None  # the retry runs to the end
    result = attempt()
    versions = [v.version for v in client.search_model_versions(f"name = '{name}'") if v.run_id == parent]
    assert versions == [logged[0]] == [result["version"]], versions  # one version for the run: the first
    assert len(logged) == 1  # nothing logged again
    assert result["promoted"] and client.get_model_version_by_alias(name, "candidate").version == logged[0]
    assert client.get_run(parent).data.tags["colar.promotion.decision"] == "promoted"
    assert client.get_run(parent).data.tags["colar.eval.digest"] == DIGEST
