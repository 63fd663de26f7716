"""tasks.prefect_artifacts and the run description: what the two UIs are given, without servers
(Prefect's artifact calls are replaced by recorders; the browser test sees the real ones)."""

from __future__ import annotations

from tasks import prefect_artifacts as pa
from tasks.report import run_description
from tasks.table1 import table1, table1_markdown

METRICS = {
    "accuracy/test/c1": 0.5, "accuracy_ci95/test/c1": 0.1, "mean_latents/test/c1": 12.0, "sec_per_question/test/c1": 0.02,
    "accuracy/test/c2": 0.25, "accuracy_ci95/test/c2": 0.1, "mean_latents/test/c2": 6.0, "sec_per_question/test/c2": 0.01,
    "accuracy/test/cot": 0.75, "accuracy_ci95/test/cot": 0.05, "mean_tokens/test/cot": 24.0,
    "sec_per_question/test/cot": 0.04,
    "accuracy/svamp/c2": 0.125, "mean_latents/svamp/c2": 5.0,
    "accuracy/avg/c2": 0.1875, "mean_latents/avg/c2": 5.5,
    "accuracy/c2": 0.25,  # the primary set unprefixed: not a row of its own
}


def test_evaluation_rows_follow_table1_order_per_set_with_the_average_last():
    rows = pa.evaluation_rows(METRICS)
    assert [(r["set"], r["method"]) for r in rows] == [
        ("test", "CoT"), ("test", "CoLaR-1"), ("test", "CoLaR-2"), ("svamp", "CoLaR-2"), ("average", "CoLaR-2")]
    assert rows[2] == {"set": "test", "method": "CoLaR-2", "accuracy_pct": 25.0, "ci95_pct": 10.0,
                       "mean_length": 6.0, "ms_per_question": 10.0}
    assert rows[0]["mean_length"] == 24.0  # CoT's chain length is its reasoning tokens
    assert rows[3]["ci95_pct"] is None and rows[3]["ms_per_question"] is None


def test_evaluation_table_artifact_is_a_keyed_table_and_never_raises(monkeypatch):
    calls = []
    monkeypatch.setattr(pa, "create_table_artifact", lambda table, **kw: calls.append((table, kw)) or "id-1")
    assert pa.evaluation_table_artifact(METRICS, "run abc") == "id-1"
    (table, kw), = calls
    assert kw["key"] == "colar-evaluation" and kw["description"].startswith("run abc")
    assert len(table) == 5
    assert pa.evaluation_table_artifact({}) is None  # nothing evaluated: no empty table

    def down(*a, **kw):
        raise ConnectionError("Prefect API away")

    monkeypatch.setattr(pa, "create_table_artifact", down)
    assert pa.evaluation_table_artifact(METRICS) is None  # a warning in the log, never a failed stage


def test_links_link_mlflow_pages_without_credentials():
    md = pa.links_markdown(tracking_uri="http://alice:s3cret@127.0.0.1:5000/", experiment_id="7",
                           parent_run_id="p1", pipeline="tiny", children={"sft-cot": "c1", "evaluate": "c2"},
                           registered_model="colar tiny", version="3")
    assert "s3cret" not in md and "alice:***@127.0.0.1:5000" in md
    assert "[tiny](http://alice:***@127.0.0.1:5000/#/experiments/7/runs/p1)" in md
    assert "[sft-cot](http://alice:***@127.0.0.1:5000/#/experiments/7/runs/c1)" in md
    assert "/#/models/colar%20tiny/versions/3)" in md and "models:/colar tiny@candidate" in md
    # A store that is not an HTTP server has no UI to link: the ids are given instead.
    plain = pa.links_markdown(tracking_uri="sqlite:///x.db", experiment_id="7", parent_run_id="p1",
                              model_uri="models:/m-1")
    assert "http" not in plain and "`p1`" in plain and "models:/m-1" in plain


def test_progress_key_is_a_valid_artifact_key():
    assert pa.progress_key("sft-colar") == "colar-progress-sft-colar"
    assert pa.progress_key("RL_stage 2") == "colar-progress-rl-stage-2"


class _FakePrefect:
    def __init__(self, monkeypatch, fail_after: int | None = None):
        self.calls: list[tuple[str, float]] = []
        self.fail_after = fail_after

        def create(progress, key, description):
            self._maybe_fail()
            self.calls.append(("create", progress))
            return "artifact-1"

        def update(artifact_id, progress, description=None):
            assert artifact_id == "artifact-1"
            self._maybe_fail()
            self.calls.append(("update", progress))
            return artifact_id

        monkeypatch.setattr(pa, "create_progress_artifact", create)
        monkeypatch.setattr(pa, "update_progress_artifact", update)

    def _maybe_fail(self):
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise ConnectionError("Prefect API away")


def test_training_progress_is_updated_as_training_goes_throttled_and_finished(monkeypatch):
    prefect = _FakePrefect(monkeypatch)
    now = [0.0]
    progress = pa.TrainingProgress("sft-colar", min_interval_s=2.0, clock=lambda: now[0])
    progress.on_train_start({"step": 0, "max_steps": 10})
    for step in range(1, 11):
        now[0] += 0.5  # a step every half second: at most one update per 2 s, and the last step
        progress.on_step(step, {"loss": 1.0})
    progress.on_train_end({"step": 10})
    progress.done(10, 10)
    assert prefect.calls == [("create", 0.0), ("update", 40.0), ("update", 80.0), ("update", 100.0)]


def test_training_progress_starts_where_a_resumed_run_resumes_and_marks_launched_jobs_done(monkeypatch):
    prefect = _FakePrefect(monkeypatch)
    resumed = pa.TrainingProgress("sft-cot", min_interval_s=0)
    resumed.on_train_start({"step": 4, "max_steps": 8, "resumed_from": 4})
    assert prefect.calls == [("create", 50.0)]
    prefect.calls.clear()
    launched = pa.TrainingProgress("rl")  # a multi-process job: the callbacks ran in its own processes
    launched.done(final_step=6, max_steps=6)
    assert prefect.calls == [("create", 100.0)]


def test_training_progress_turns_itself_off_after_a_failure(monkeypatch):
    prefect = _FakePrefect(monkeypatch, fail_after=1)
    progress = pa.TrainingProgress("sft-cot", min_interval_s=0)
    progress.on_train_start({"step": 0, "max_steps": 4})
    for step in range(1, 5):
        progress.on_step(step, {})  # the first update fails; no further call is made
    progress.on_train_end({"step": 4})
    assert prefect.calls == [("create", 0.0)] and progress.failed


def test_run_description_summarises_each_set_the_model_and_table1():
    md = table1_markdown(table1(METRICS), "Table 1")
    text = run_description(METRICS, name="tiny", table_md=md, model="colar-tiny", version="4",
                           flow_run_url="http://u:pw@127.0.0.1:4200/runs/flow-run/f1")
    assert text.startswith("**colar pipeline tiny**")
    assert "- test: CoT 75.0 % ± 5.0 (#L 24.0), CoLaR-1 50.0 % ± 10.0 (#L 12.0), CoLaR-2 25.0 % ± 10.0 (#L 6.0)" in text
    assert "- average over sets: CoLaR-2 18.8 % (#L 5.5)" in text
    assert "`models:/colar-tiny@candidate` (version 4)" in text
    assert "pw" not in text and "/runs/flow-run/f1" in text
    assert "| CoLaR-2 |" in text
    long_table = "x" * 9000  # past MLflow's 8000-character tag limit: the summary alone
    short = run_description(METRICS, table_md=long_table)
    assert len(short) <= 8000 and "CoLaR-2" in short and "xxx" not in short
