"""Re-runs you can trust: a finished stage comes back Cached only when nothing it depends on changed
(the content of its data and models, the code, the output folder), and a result is never handed
to a run with another output folder. Stage results are stored by Prefect as JSON."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from colar_core.files import content_digest
from flows.config import PipelineConfig, load_config
from tasks import keys
from tasks.stage_spec import StageSpec

# ---------------------------------------------------------------------------------------------
# keys and digests (no servers)


def test_content_digest_follows_the_bytes_of_a_file_or_folder_not_its_place(tmp_path):
    import hashlib

    f = tmp_path / "a.jsonl"
    f.write_text('{"q": 1}\n{"q": 2}\n')
    assert content_digest(f) == hashlib.sha256(f.read_bytes()).hexdigest()
    (tmp_path / "elsewhere").mkdir()
    assert content_digest(shutil.copy(f, tmp_path / "elsewhere" / "b.jsonl")) == content_digest(f)

    model = tmp_path / "model"
    (model / "sub").mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (model / "sub" / "weights.bin").write_bytes(b"\x00\x01")
    before = content_digest(model)
    assert content_digest(shutil.copytree(model, tmp_path / "copy")) == before
    (model / "sub" / "weights.bin").write_bytes(b"\x00\x02")
    assert content_digest(model) != before
    (model / "sub" / "weights.bin").write_bytes(b"\x00\x01")
    (model / "sub" / "weights.bin").rename(model / "weights.bin")
    assert content_digest(model) != before  # a file's name counts too
    with pytest.raises(FileNotFoundError):
        content_digest(tmp_path / "missing")


def test_code_version_covers_the_library_the_tasks_and_the_flows(tmp_path, monkeypatch):
    names = {name for name, _ in keys.code_files()}
    assert {"colar_core/model.py", "colar_infra/tracking/runs.py", "tasks/keys.py", "tasks/prepare.py",
            "flows/pipeline.py", "flows/config.py"} <= names
    module = tmp_path / "pipeline.py"
    module.write_text("x = 1\n")
    monkeypatch.setattr(keys, "code_files", lambda: [("flows/pipeline.py", module)])
    keys.code_version.cache_clear()
    try:
        before = keys.code_version()
        module.write_text("x = 2\n")
        keys.code_version.cache_clear()
        assert keys.code_version() != before
    finally:
        keys.code_version.cache_clear()


def _fake_hub_cache(monkeypatch, root: Path, repo_folder: str, commit: str) -> None:
    from huggingface_hub import constants

    (root / repo_folder / "refs").mkdir(parents=True, exist_ok=True)
    (root / repo_folder / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))


def test_inputs_are_keyed_by_content_and_hub_ids_by_their_cached_revision(tmp_path, monkeypatch):
    data = tmp_path / "data.jsonl"
    data.write_text("line 1\nline 2\n")
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"weights")
    data_before, model_before = keys.data_inputs({"source": str(data)}), keys.model_inputs(
        {"name_or_path": str(model), "tokenizer": None})
    data.write_text("line 1\nline 2 edited\n")
    (model / "model.safetensors").write_bytes(b"weights, trained more")
    assert keys.data_inputs({"source": str(data)}) != data_before
    assert keys.model_inputs({"name_or_path": str(model), "tokenizer": None}) != model_before
    assert keys.data_inputs({"source": "builtin"}) == {} == keys.model_inputs({"name_or_path": "tiny"})

    _fake_hub_cache(monkeypatch, tmp_path / "hub", "models--org--llm", "a" * 40)
    hub = {"name_or_path": "org/llm", "tokenizer": "org/llm"}
    assert keys.model_inputs(hub) == {"model.name_or_path": f"hub:org/llm@{'a' * 40}",
                                      "model.tokenizer": f"hub:org/llm@{'a' * 40}"}
    _fake_hub_cache(monkeypatch, tmp_path / "hub", "models--org--llm", "b" * 40)  # a new revision pulled
    assert keys.model_inputs(hub)["model.name_or_path"] == f"hub:org/llm@{'b' * 40}"
    _fake_hub_cache(monkeypatch, tmp_path / "hub", "datasets--org--math", "c" * 40)
    assert keys.data_inputs({"source": "org/math"}) == {"data.source": f"hub:org/math@{'c' * 40}"}
    assert keys.data_inputs({"source": "org/not-cached"}) == {"data.source": "hub:org/not-cached@unresolved"}


def test_the_output_folder_is_part_of_the_key_and_holds_the_stage_folder(tmp_path, monkeypatch):
    def spec(output_dir, name="prepare") -> StageSpec:
        return StageSpec(None, name, {"data": {"source": "builtin"}}, output_dir, code=keys.stage_code("prepare"))

    a, b = spec(tmp_path / "a"), spec(tmp_path / "b")
    assert a.key != b.key
    assert a.folder.parent == (tmp_path / "a").resolve() and b.folder.parent == (tmp_path / "b").resolve()
    assert spec(tmp_path / "a").key == a.key
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    monkeypatch.chdir(tmp_path / "x")
    in_x = spec("runs")
    monkeypatch.chdir(tmp_path / "y")
    assert spec("runs").key != in_x.key  # a relative output_dir means another folder elsewhere
    assert spec(tmp_path / "x" / "runs").key == in_x.key
    with pytest.raises(ValueError, match="outside"):
        spec(tmp_path / "a", name="../escape").folder


def test_evaluate_only_flow_keys_on_model_and_data_content_not_paths(tmp_path):
    from flows.single_stage import evaluate_only_spec

    model, data = tmp_path / "model", tmp_path / "data"
    model.mkdir()
    data.mkdir()
    (model / "model.safetensors").write_bytes(b"weights")
    (data / "test.jsonl").write_text('{"question": "q"}\n')

    def key(model_dir: Path, data_dir: Path) -> str:
        return evaluate_only_spec(str(model_dir), str(data_dir), {}, str(tmp_path / "runs"), "parent").key

    before = key(model, data)
    assert key(shutil.copytree(model, tmp_path / "moved"), data) == before
    (model / "model.safetensors").write_bytes(b"weights, retrained in place")
    assert key(model, data) != before
    after_model = key(model, data)
    (data / "test.jsonl").write_text('{"question": "q2"}\n')
    assert key(model, data) != after_model


def test_a_run_holds_its_output_dir_absolute_while_defaults_stay_relative(tmp_path, monkeypatch):
    assert PipelineConfig().output_dir == "runs"
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["sft_colar.max_steps=70"]).for_run()
    assert cfg.output_dir == str(tmp_path / "runs") and cfg.sft_colar.max_steps == 70
    assert cfg.for_run() == cfg
    assert load_config(None, ["output_dir=~/colar-runs"]).for_run().output_dir == str(Path.home() / "colar-runs")


def test_stage_tasks_persist_their_results_as_json():
    from tasks.evaluate import evaluate_stage
    from tasks.prepare import prepare_stage
    from tasks.training import rl_stage, sft_stage

    for stage in (prepare_stage, sft_stage, rl_stage, evaluate_stage):
        assert stage.persist_result and stage.result_serializer == "json", stage.name
        assert stage.cache_key_fn is keys.cache_key_from_param


# ---------------------------------------------------------------------------------------------
# the pipeline against real servers

FAST = ["sft_cot=null", "eval.cot_baseline=false", "tracking.registered_model_name=null"]


def _config(output_dir, *extra) -> PipelineConfig:
    from bench.pipeline_run import TINY

    return load_config(None, [*TINY, *FAST, f"output_dir={output_dir}", *extra])


def _stage_states(flow_run_id: str) -> dict:
    """``{stage name: (Prefect state name, result)}`` of the stage task runs of a flow run, as Prefect
    reports them (the report step, which always runs, left out)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {r.name: (r.state.name, r.state.result()) for r in runs if not r.name.startswith("report")}


def _run(cfg: PipelineConfig) -> dict:
    from flows.pipeline import run_pipeline

    state = run_pipeline(cfg, return_state=True)
    assert state.is_completed(), state.message
    stages = _stage_states(str(state.state_details.flow_run_id))
    assert {name: s for name, (s, _) in stages.items()} == state.result()["stages"]
    return stages


def _write_problems(path: Path) -> None:
    from colar_core.data import builtin_splits

    splits = builtin_splits(n_train=64, n_val=8, n_test=8, seed=0, difficulty="tiny")
    path.write_text("".join(json.dumps(r.to_dict()) + "\n" for split in splits.values() for r in split))


@pytest.mark.slow
def test_editing_the_data_file_in_place_reruns_every_stage_and_nothing_else_does(tmp_path, mlflow_server,
                                                                                 prefect_server):
    from prefect.settings import get_current_settings

    data = tmp_path / "problems.jsonl"
    _write_problems(data)
    cfg = _config(tmp_path / "runs", "name=test-rerun-data", f"data.source={data}")
    first = _run(cfg)
    assert set(first) == {"prepare", "sft-colar", "evaluate"}
    assert all(state == "Completed" for state, _ in first.values()), first

    # Prefect's stored result of a stage is JSON (no pickle): the stage's typed result, which is
    # also its stage_result.json.
    prepare_dir = Path(first["prepare"][1].data_dir).parent
    storage = Path(get_current_settings().results.local_storage_path)
    (record_file,) = storage.glob(prepare_dir.name.removeprefix("prepare-") + "*")
    record = json.loads(record_file.read_bytes())
    assert record["metadata"]["serializer"]["type"] == "json"
    assert json.loads(record["result"]) == {"__class__": "tasks.prepare.PrepareResult",
                                            "data": json.loads((prepare_dir / "stage_result.json").read_text())}

    again = _run(cfg)
    assert all(state == "Cached" for state, _ in again.values()), again

    lines = data.read_text().splitlines(keepends=True)
    record0 = json.loads(lines[0])
    lines[0] = json.dumps({**record0, "question": record0["question"] + " Answer with a number."}) + "\n"
    data.write_text("".join(lines))
    edited = _run(cfg)
    assert all(state == "Completed" for state, _ in edited.values()), edited
    assert Path(edited["prepare"][1].data_dir).parent != prepare_dir


@pytest.mark.slow
def test_a_run_in_another_output_folder_never_gets_its_results(tmp_path, mlflow_server, prefect_server):
    """Same config in folder A, then B, then A again with B deleted: B runs every stage in B, and the
    second A run finds its own finished stages (Cached) with results that point into A."""
    folder_a, folder_b = tmp_path / "a", tmp_path / "b"

    def points_into(stages: dict, folder: Path) -> bool:
        """Every stage result holds paths, and all of them lie in ``folder``."""
        paths = {name: [v for v in result.model_dump().values() if isinstance(v, str) and v.startswith("/")]
                 for name, (_, result) in stages.items()}
        return all(paths.values()) and all(Path(p).is_relative_to(folder) for ps in paths.values() for p in ps)

    first_a = _run(_config(folder_a, "name=test-rerun-a"))
    assert points_into(first_a, folder_a)
    in_b = _run(_config(folder_b, "name=test-rerun-b"))
    assert all(state == "Completed" for state, _ in in_b.values()), in_b
    assert points_into(in_b, folder_b)
    shutil.rmtree(folder_b)
    again_a = _run(_config(folder_a, "name=test-rerun-a"))
    assert all(state == "Cached" for state, _ in again_a.values()), again_a
    assert points_into(again_a, folder_a)
    assert {n: r.mlflow_run_id for n, (_, r) in again_a.items()} == {n: r.mlflow_run_id
                                                                      for n, (_, r) in first_a.items()}


@pytest.mark.slow
def test_colar_retry_from_another_directory_finds_the_finished_stages(tmp_path, monkeypatch, mlflow_server,
                                                                      prefect_server, fail_stage_once):
    from mlflow.tracking import MlflowClient

    from colar_core.training.sft import SFTResult
    from flows.cli import main
    from flows.pipeline import run_pipeline

    started, elsewhere = tmp_path / "started-here", tmp_path / "elsewhere"
    started.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(started)
    fail_stage_once("sft-colar", 3)  # after the step-2 checkpoint
    assert run_pipeline(_config("runs", "name=test-rerun-retry", "training_retries=0"), return_state=True).is_failed()
    client = MlflowClient()
    parent = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                filter_string="attributes.run_name = 'test-rerun-retry'")[0]
    config_json = json.loads(Path(client.download_artifacts(parent.info.run_id, "config.json",
                                                           str(tmp_path))).read_text())
    assert config_json["output_dir"] == str(started / "runs")

    monkeypatch.chdir(elsewhere)
    assert main(["retry", parent.info.run_id]) == 0
    retry_flow_run = client.get_run(parent.info.run_id).data.tags["prefect.flow_run_id.retry"]
    states = {name: state for name, (state, _) in _stage_states(retry_flow_run).items()}
    assert states == {"prepare": "Cached", "sft-colar": "Completed", "evaluate": "Completed"}
    result = SFTResult.load(next((started / "runs").glob("sft-colar-*")))
    assert result.resumed_from == 2 and result.final_step == 6
    assert not (elsewhere / "runs").exists()
