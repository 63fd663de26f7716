"""Typed stage results: what each stage task returns, the flow reads by attribute and
``stage_result.json`` holds (written atomically, one writer); a cached result is reused only while
its folder holds that file. The training job's own ``result.json`` is another record, also atomic."""

from __future__ import annotations

import json
import os
import typing
from pathlib import Path

import pytest

from tasks.evaluate import EvaluateResult, evaluate_stage
from tasks.keys import CACHED_STAGE, stage_code
from tasks.prepare import PrepareResult, prepare_stage
from tasks.stage_spec import STAGE_RESULT_FILE, StageResult, StageSpec
from tasks.training import TrainResult, baseline_stage, rl_stage, sft_stage

TRAIN = dict(model_dir="/runs/sft-colar-abc/model", model_digest="d" * 64, final_step=6, resumed_from=2,
             mlflow_run_id="r" * 32, work_s=1.5)


def test_every_stage_task_returns_its_typed_result():
    returns = {task.name: typing.get_type_hints(task.fn)["return"]
               for task in (prepare_stage, sft_stage, rl_stage, baseline_stage, evaluate_stage)}
    assert returns == {"prepare": PrepareResult, "sft": TrainResult, "rl": TrainResult,
                       "sft-baseline": TrainResult, "evaluate": EvaluateResult}
    for cls in (PrepareResult, TrainResult, EvaluateResult):
        assert issubclass(cls, StageResult) and {"mlflow_run_id", "work_s"} <= set(cls.model_fields)


def test_a_result_round_trips_through_its_file_and_prefects_json(tmp_path):
    from prefect.serializers import JSONSerializer

    result = TrainResult(**TRAIN)
    assert result.save(tmp_path) is result
    assert json.loads((tmp_path / STAGE_RESULT_FILE).read_text()) == TRAIN
    assert TrainResult.load(tmp_path) == result
    # What Prefect's cache record holds (result_serializer="json") decodes to the same typed result.
    assert CACHED_STAGE["result_serializer"] == "json"
    serializer = JSONSerializer()
    assert serializer.loads(serializer.dumps(result)) == result
    evaluation = EvaluateResult(metrics={"accuracy/test/c1": 0.5, "accuracy/c1": 0.5}, predictions="/p.csv",
                                example_question="q?", mlflow_run_id="e", work_s=0.1)
    again = serializer.loads(serializer.dumps(evaluation))
    assert again == evaluation and list(again.metrics) == ["accuracy/test/c1", "accuracy/c1"]  # order kept


def test_a_renamed_or_missing_field_is_an_error_naming_it(tmp_path):
    renamed = {**TRAIN, "model_digset": TRAIN["model_digest"]}
    del renamed["model_digest"]
    (tmp_path / STAGE_RESULT_FILE).write_text(json.dumps(renamed))
    with pytest.raises(ValueError) as info:
        TrainResult.load(tmp_path)
    message = str(info.value)
    assert str(tmp_path / STAGE_RESULT_FILE) in message and "TrainResult" in message
    assert "model_digest" in message and "model_digset" in message
    with pytest.raises(ValueError, match="model_digest"):
        TrainResult(**{k: v for k, v in TRAIN.items() if k != "model_digest"})
    result = TrainResult(**TRAIN)
    with pytest.raises(AttributeError):
        result.model_digset  # noqa: B018 - the flow's typo fails here, and a type checker sees it
    with pytest.raises(ValueError, match="frozen"):
        result.model_dir = "/elsewhere"


def test_a_result_file_is_replaced_atomically(tmp_path, monkeypatch):
    """A write that fails before the rename (a crash, a full disk) leaves the previous result whole."""
    import colar_core.files

    old = TrainResult(**TRAIN).save(tmp_path)
    before = (tmp_path / STAGE_RESULT_FILE).read_bytes()

    def no_rename(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(colar_core.files.os, "replace", no_rename)
    with pytest.raises(OSError, match="disk gone"):
        TrainResult(**{**TRAIN, "final_step": 99}).save(tmp_path)
    assert (tmp_path / STAGE_RESULT_FILE).read_bytes() == before and TrainResult.load(tmp_path) == old
    assert sorted(os.listdir(tmp_path)) == [STAGE_RESULT_FILE]  # no temporary file left behind


def test_the_training_jobs_own_result_file_is_replaced_atomically(tmp_path, monkeypatch):
    import colar_core.files
    from colar_core.training.sft import SFTResult
    from colar_core.training.stage import JOB_RESULT_FILE

    job = SFTResult(model_dir=tmp_path / "model", final_step=6, best_val_accuracy=None,
                    metrics_path=tmp_path / "metrics.jsonl")
    assert job.save(tmp_path) == tmp_path / JOB_RESULT_FILE and SFTResult.load(tmp_path) == job
    assert JOB_RESULT_FILE != STAGE_RESULT_FILE
    monkeypatch.setattr(colar_core.files.os, "replace", lambda src, dst: (_ for _ in ()).throw(OSError("gone")))
    with pytest.raises(OSError):
        SFTResult(model_dir=tmp_path / "model", final_step=7, best_val_accuracy=None,
                  metrics_path=tmp_path / "metrics.jsonl").save(tmp_path)
    assert SFTResult.load(tmp_path).final_step == 6


class _Task:
    """A stand-in for a Prefect task: records the options and arguments a stage is called with."""

    def __init__(self):
        self.options, self.kwargs = None, None

    def with_options(self, **options):
        self.options = options
        return self

    def __call__(self, **kwargs):
        self.kwargs = kwargs
        return "state"


def test_a_cached_result_is_used_only_while_its_folder_holds_the_result_file(tmp_path):
    task = _Task()
    spec = StageSpec(task, "sft-colar", {"train": {"lr": 1}}, tmp_path, {"data": "abc"}, {"stage": "sft-colar"},
                     code=stage_code("sft"))
    assert spec.run() == "state"
    assert task.options == {"task_run_name": "sft-colar", "refresh_cache": True}  # nothing there: run again
    assert task.kwargs == {"train": {"lr": 1}, "stage": "sft-colar", "out_dir": str(spec.folder), "key": spec.key,
                           "return_state": True}
    spec.folder.mkdir(parents=True)
    (spec.folder / "metrics.jsonl").write_text("")  # a folder without the result: an unfinished stage
    spec.run()
    assert task.options.get("refresh_cache") is True
    TrainResult(**TRAIN).save(spec.folder)
    spec.run()
    assert task.options == {"task_run_name": "sft-colar"}  # Prefect may hand back its cached result


# ---------------------------------------------------------------------------------------------
# with a real Prefect server: the cache hands back the typed result, until the folder loses its file


class ToyResult(StageResult):
    """A stage result of the toy stage below (importable by name: Prefect decodes cached results so)."""

    value: int


def _toy_stage():
    from prefect import task

    @task(name="toy", **CACHED_STAGE)
    def toy(value: int, out_dir: str, key: str) -> ToyResult:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        return ToyResult(value=value, mlflow_run_id="toy", work_s=0.0).save(out_dir)

    return toy


@pytest.mark.slow
def test_prefect_caches_the_typed_result_until_its_file_is_gone(tmp_path, prefect_server):
    from prefect import flow

    toy = _toy_stage()
    spec = StageSpec(toy, "toy", {"value": 7}, tmp_path, code=stage_code("evaluate"))

    @flow(name="toy-flow")
    def run_once():
        state = spec.run()
        return state.name, state.result()

    first, second = run_once(), run_once()
    assert first == ("Completed", ToyResult(value=7, mlflow_run_id="toy", work_s=0.0))
    assert second == ("Cached", first[1]) and isinstance(second[1], ToyResult)
    (spec.folder / STAGE_RESULT_FILE).unlink()
    third = run_once()
    assert third == ("Completed", first[1]) and (spec.folder / STAGE_RESULT_FILE).is_file()


def test_the_evaluate_task_defers_its_artifacts_as_the_training_stages_do(tmp_path, monkeypatch):
    """With the tracking server gone during evaluation, the metrics and both files wait in the run's
    pending file (sent later by ``colar retry``), and the stage still returns and saves its result."""
    import contextlib
    from types import SimpleNamespace

    from mlflow import MlflowClient

    import tasks.evaluate as evaluate
    from colar_core.evaluation_suite import SuiteResult
    from colar_core.net import free_port
    from colar_infra.tracking.pending import ArtifactRecord, MetricRecord, pending_path, read_records

    monkeypatch.setenv("COLAR_HOME", str(tmp_path / "home"))
    gone = f"http://127.0.0.1:{free_port()}"
    metrics = {"accuracy/test/c1": 0.25, "accuracy/c1": 0.25}
    monkeypatch.setattr(evaluate, "MlflowClient", lambda: MlflowClient(gone))
    monkeypatch.setattr(evaluate, "child_run", contextlib.contextmanager(lambda *a, **k: (yield "run-e")))
    monkeypatch.setattr(evaluate, "load_eval_sets", lambda cfg, data_dir: {"test": [SimpleNamespace(question="q?", answer="1")]})
    monkeypatch.setattr(evaluate, "evaluate_suite", lambda *a: SuiteResult(dict(metrics), [{"set": "test", "id": 1}]))
    monkeypatch.setattr(evaluate, "evaluation_table_artifact", lambda *a: None)
    monkeypatch.setattr(evaluate, "get_run_logger", lambda: SimpleNamespace(info=lambda *a: None))

    out = tmp_path / "evaluate-abc"
    with pytest.warns(RuntimeWarning, match="MLflow server away"):
        result = evaluate.evaluate_stage.fn({}, "/models/colar", None, None, str(tmp_path), str(out), "parent", "k")
    assert result == EvaluateResult.load(out) and result.metrics == metrics and result.example_question == "q?"
    records = read_records(pending_path("run-e")).records
    assert {r.key: r.value for r in records if isinstance(r, MetricRecord)} == metrics
    assert [r for r in records if isinstance(r, ArtifactRecord)] == [
        ArtifactRecord("run-e", str(out / name)) for name in ("predictions.csv", "metrics.json", "eval_sets.json")]
    # each set's content digest goes on to the report (the promotion gate compares like with like)
    assert list(result.set_digests) == ["test"] and len(result.set_digests["test"]) == 64


def test_the_evaluate_task_logs_the_thoughts_page_and_its_prefect_artifact(tmp_path, monkeypatch):
    """The suite's thoughts become ``thoughts.html`` on the evaluate run (deferred like every artifact
    while the server is away) and the markdown artifact ``colar-thoughts``."""
    import contextlib
    from types import SimpleNamespace

    from mlflow import MlflowClient

    import tasks.evaluate as evaluate
    from colar_core.evaluation_suite import SuiteResult
    from colar_core.latent_inspect import LatentChain, LatentStep, QuestionThoughts, Scored
    from colar_core.net import free_port
    from colar_infra.tracking.pending import ArtifactRecord, pending_path, read_records

    monkeypatch.setenv("COLAR_HOME", str(tmp_path / "home"))
    step = LatentStep(0, (Scored("20", 0.9),), (Scored("###", 0.8),), 0.01, 0.6)
    thoughts = [QuestionThoughts("How many <pens>?", (LatentChain(2, (step,), "Answer:20", "20"),))]
    markdown: list[str] = []
    monkeypatch.setattr(evaluate, "MlflowClient", lambda: MlflowClient(f"http://127.0.0.1:{free_port()}"))
    monkeypatch.setattr(evaluate, "child_run", contextlib.contextmanager(lambda *a, **k: (yield "run-t")))
    monkeypatch.setattr(evaluate, "load_eval_sets", lambda cfg, data_dir: {"test": [SimpleNamespace(question="q?", answer="1")]})
    monkeypatch.setattr(evaluate, "evaluate_suite", lambda *a: SuiteResult({"accuracy/c2": 0.5}, [], thoughts))
    monkeypatch.setattr(evaluate, "evaluation_table_artifact", lambda *a: None)
    monkeypatch.setattr(evaluate, "thoughts_artifact", lambda md, description="": markdown.append(md))
    monkeypatch.setattr(evaluate, "get_run_logger", lambda: SimpleNamespace(info=lambda *a: None))

    out = tmp_path / "evaluate-t"
    with pytest.warns(RuntimeWarning, match="MLflow server away"):
        evaluate.evaluate_stage.fn({}, "/models/colar", None, None, str(tmp_path), str(out), "parent", "k")
    artifacts = [r for r in read_records(pending_path("run-t")).records if isinstance(r, ArtifactRecord)]
    assert ArtifactRecord("run-t", str(out / "thoughts.html")) in artifacts
    page = (out / "thoughts.html").read_text()
    assert "How many &lt;pens&gt;?" in page and "c = 2" in page and "run-t" in page
    assert len(markdown) == 1 and "How many &lt;pens&gt;?" in markdown[0]
