"""Re-trigger after a fix (issue 21): ``colar run`` re-runs only the stages whose code changed, and
``colar retry`` reuses what finished in that pipeline run (like Metaflow's resume), with ``--from``
to re-run a stage and what follows; a failed stage resumes across a code change from its
checkpoints when they still load. Against real servers, on the tiny pipeline. "Editing" a module
means changing the source digest the keys read for it (tasks.keys.source_digest)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flows.config import PipelineConfig, load_config
from flows.retry import RetryPlan, StageRecord, journal_path, read_journal
from tasks import keys
from tasks.stage_spec import StageSpec

FAST = ["sft_cot=null", "eval.cot_baseline=false", "tracking.registered_model_name=null"]
RL = ["rl.max_steps=2", "rl.questions_per_step=2", "rl.group_size=2", "rl.checkpoint_every=0",
      "rl.compression_factor=2", "rl.lr=0.0001"]


def _config(output_dir, *extra) -> PipelineConfig:
    from bench.pipeline_run import TINY

    return load_config(None, [*TINY, *FAST, f"output_dir={output_dir}", *extra])


def _edit(monkeypatch, *modules: str) -> None:
    """From now on the keys read another source digest for ``modules`` (as after an edit)."""
    real = keys.source_digest
    edited = set(modules)

    def digest(module: str) -> str:
        return f"edited-{real(module)}" if module in edited else real(module)

    monkeypatch.setattr(keys, "source_digest", digest)


def _run(cfg: PipelineConfig, **kwargs):
    from flows.pipeline import run_pipeline

    return run_pipeline(cfg, return_state=True, **kwargs)


def _parent(name: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    return client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string=f"attributes.run_name = '{name}'")[0]


# ---------------------------------------------------------------------------------------------
# no servers: the plan


def _spec(tmp_path, name="sft-colar", section=None, code="sft") -> StageSpec:
    return StageSpec(None, name, {"train": section or {"lr": 1}}, tmp_path / "runs", {"data": "d"},
                     code=keys.stage_code(code))


def _journal(tmp_path, **records: StageRecord) -> None:
    path = journal_path(str(tmp_path / "runs"), "parent")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"parent_run_id": "parent", "stages": {k: r.model_dump() for k, r in records.items()}}))


def _record(spec: StageSpec, status="finished", key=None, spec_digest=None) -> StageRecord:
    key = key or spec.key
    return StageRecord(key=key, code="old-code", spec=spec_digest or spec.spec_digest,
                       folder=str(keys.stage_dir(spec.output_dir, spec.name, key)), status=status)


def test_a_retry_reuses_finished_stages_until_the_first_that_did_not_finish_or_from(tmp_path):
    prep, sft, ev = _spec(tmp_path, "prepare", code="prepare"), _spec(tmp_path), _spec(tmp_path, "evaluate", code="evaluate")
    old = {s.name: _record(s, key="0" * 64) for s in (prep, sft)}
    _journal(tmp_path, **old, evaluate=_record(ev, "started", key="1" * 64))
    for record in old.values():  # their folders hold their results
        Path(record.folder).mkdir(parents=True)
        (Path(record.folder) / "stage_result.json").write_text("{}")

    plan = RetryPlan(str(tmp_path / "runs"), "parent", retry=True)
    assert plan.reusable(prep) == Path(old["prepare"].folder)
    plan.reuse(prep, Path(old["prepare"].folder))
    assert plan.reusable(sft) == Path(old["sft-colar"].folder)
    assert plan.reusable(ev) is None and not plan.forced(ev)  # it did not finish: it runs
    assert read_journal(str(tmp_path / "runs"), "parent").stages["prepare"].reused_from_code == "old-code"

    plan = RetryPlan(str(tmp_path / "runs"), "parent", retry=True, from_stage="sft-colar")
    assert plan.reusable(prep) is not None
    assert plan.reusable(sft) is None and plan.forced(sft)  # --from: it and what follows run again
    assert plan.reusable(ev) is None and plan.forced(ev)

    plan = RetryPlan(str(tmp_path / "runs"), "parent")  # colar run: nothing is reused, ever
    assert plan.reusable(prep) is None and not plan.forced(prep)


def test_a_finished_stage_whose_folder_is_gone_runs_again_and_so_does_what_follows(tmp_path):
    prep, sft = _spec(tmp_path, "prepare", code="prepare"), _spec(tmp_path)
    _journal(tmp_path, prepare=_record(prep, key="0" * 64), **{"sft-colar": _record(sft, key="2" * 64)})
    Path(_record(sft, key="2" * 64).folder).mkdir(parents=True)
    (Path(_record(sft, key="2" * 64).folder) / "stage_result.json").write_text("{}")
    plan = RetryPlan(str(tmp_path / "runs"), "parent", retry=True)
    assert plan.reusable(prep) is None  # its folder is gone
    assert plan.reusable(sft) is None  # after a stage that runs again, nothing is reused


def _checkpoint(folder: Path, step: int) -> None:
    ck = folder / "checkpoints" / f"step_{step:08d}"
    ck.mkdir(parents=True)
    (ck / "rank_00000.pt").write_bytes(b"state")
    (ck / "COMPLETE").write_text(json.dumps({"step": step}))


def test_the_failed_stage_takes_its_checkpoints_across_a_code_change_only_when_nothing_else_changed(tmp_path):
    sft = _spec(tmp_path)
    failed = _record(sft, "started", key="3" * 64)
    _checkpoint(Path(failed.folder), 2)
    _journal(tmp_path, **{"sft-colar": failed})
    note = RetryPlan(str(tmp_path / "runs"), "parent", retry=True).carry_over(sft)
    assert note and "only its code changed" in note and "step_00000002" in note
    carried = sft.folder / "checkpoints" / "step_00000002"
    assert (carried / "rank_00000.pt").read_bytes() == b"state"
    assert (carried / "rank_00000.pt").stat().st_ino == (Path(failed.folder) / "checkpoints" / "step_00000002"
                                                        / "rank_00000.pt").stat().st_ino  # a hard link
    assert json.loads((sft.folder / "checkpoints" / "CARRIED_FROM.json").read_text())["from"] == failed.folder

    other = _spec(tmp_path / "b")
    moved = _record(other, "started", key="4" * 64, spec_digest="another config section")
    _checkpoint(Path(moved.folder), 2)
    _journal(tmp_path / "b", **{"sft-colar": moved})
    note = RetryPlan(str(tmp_path / "b" / "runs"), "parent", retry=True).carry_over(other)
    assert note and "starts again: its config section or inputs changed" in note
    assert not (other.folder / "checkpoints").exists()
    # a plain run never carries anything
    assert RetryPlan(str(tmp_path / "runs"), "parent").carry_over(sft) is None


def test_from_must_name_a_stage_of_the_pipeline(tmp_path):
    from flows.pipeline import check_from_stage, stage_names

    cfg = _config(tmp_path / "runs", *RL)
    assert stage_names(cfg) == ["prepare", "sft-colar", "rl", "evaluate", "report"]
    check_from_stage(cfg, "rl")
    with pytest.raises(ValueError, match=r"--from sft-cot: this pipeline has no stage 'sft-cot'; its stages: "
                                         r"prepare, sft-colar, rl, evaluate, report"):
        check_from_stage(cfg, "sft-cot")


# ---------------------------------------------------------------------------------------------
# the pipeline against real servers


@pytest.mark.slow
def test_colar_run_reruns_only_the_stages_whose_code_changed(tmp_path, monkeypatch, mlflow_server, prefect_server):
    cfg = _config(tmp_path / "runs", "name=test-code-keys", *RL)
    first = _run(cfg)
    assert first.is_completed(), first.message
    assert first.result()["stages"] == {"prepare": "Completed", "sft-colar": "Completed", "rl": "Completed",
                                        "evaluate": "Completed"}

    _edit(monkeypatch, "tasks.report", "flows.cli", "flows.pipeline", "colar_infra.servers")
    assert set(_run(cfg).result()["stages"].values()) == {"Cached"}  # report always runs; nothing else

    _edit(monkeypatch, "colar_core.scoring")
    stages = _run(cfg).result()["stages"]
    assert stages == {"prepare": "Cached", "sft-colar": "Cached", "rl": "Completed", "evaluate": "Completed"}

    _edit(monkeypatch, "colar_core.training.loop")
    stages = _run(cfg).result()["stages"]
    # every training stage trains again; its model comes out bit-identical (seeded), so evaluate,
    # keyed on the models' content, comes back Cached
    assert stages == {"prepare": "Cached", "sft-colar": "Completed", "rl": "Completed", "evaluate": "Cached"}


@pytest.mark.slow
def test_colar_retry_reuses_what_finished_and_from_reruns_the_rest(tmp_path, monkeypatch, mlflow_server,
                                                                 prefect_server):
    from mlflow.tracking import MlflowClient

    from tasks import evaluate

    real_suite, fixed = evaluate.evaluate_suite, []

    def buggy_until_fixed(*args, **kwargs):  # fails every try (Prefect's retry too) until the fix
        if not fixed:
            raise RuntimeError("a bug in the evaluation")
        return real_suite(*args, **kwargs)

    monkeypatch.setattr(evaluate, "evaluate_suite", buggy_until_fixed)
    cfg = _config(tmp_path / "runs", "name=test-retry-reuse", *RL)
    failed = _run(cfg)
    assert failed.is_failed()
    parent = _parent("test-retry-reuse").info.run_id
    journal = read_journal(cfg.for_run().output_dir, parent)
    assert {n: r.status for n, r in journal.stages.items()} == {"prepare": "finished", "sft-colar": "finished",
                                                                "rl": "finished", "evaluate": "started"}

    # the fix touches the scoring code, which RL's key holds too: RL finished in this run, so it is reused
    fixed.append(True)
    _edit(monkeypatch, "colar_core.scoring")
    retried = _run(cfg, parent_run_id=parent)
    assert retried.is_completed(), retried.message
    assert retried.result()["stages"] == {"prepare": "Cached", "sft-colar": "Cached", "rl": "Reused",
                                          "evaluate": "Completed"}
    tag = MlflowClient().get_run(parent).data.tags["colar.reused.rl"]
    rl_record = journal.stages["rl"]
    assert rl_record.code[:16] in tag and keys.stage_code("rl").digest()[:16] in tag and "code changed" in tag
    # colar run, strict, would have trained RL again
    assert keys.stage_code("rl").digest() != rl_record.code

    again = _run(cfg, parent_run_id=parent, from_stage="rl")
    assert again.is_completed(), again.message
    assert again.result()["stages"] == {"prepare": "Cached", "sft-colar": "Cached", "rl": "Completed",
                                        "evaluate": "Completed"}


@pytest.mark.slow
def test_a_failed_stage_resumes_across_a_code_change_or_starts_again_when_its_checkpoints_do_not_load(
        tmp_path, monkeypatch, mlflow_server, prefect_server, fail_stage_once):
    from colar_core.training.checkpoint import CheckpointManager
    from colar_core.training.sft import SFTResult

    cfg = _config(tmp_path / "runs", "name=test-retry-carry", "training_retries=0")
    fail_stage_once("sft-colar", 3)  # after its step-2 checkpoint
    assert _run(cfg).is_failed()
    parent = _parent("test-retry-carry").info.run_id
    old_folder = Path(read_journal(cfg.for_run().output_dir, parent).stages["sft-colar"].folder)

    _edit(monkeypatch, "colar_core.training.loop")  # a fix in the training loop: a new key, a new folder
    retried = _run(cfg, parent_run_id=parent)
    assert retried.is_completed(), retried.message
    new_folder = Path(read_journal(cfg.for_run().output_dir, parent).stages["sft-colar"].folder)
    assert new_folder != old_folder
    result = SFTResult.load(new_folder)
    assert result.resumed_from == 2 and result.final_step == 6

    # the same, where the carried checkpoints do not load with today's code: it starts again from 0
    cfg = _config(tmp_path / "runs2", "name=test-retry-carry-2", "training_retries=0")
    fail_stage_once("sft-colar", 3)
    assert _run(cfg).is_failed()
    parent = _parent("test-retry-carry-2").info.run_id
    _edit(monkeypatch, "colar_core.training.loop", "colar_core.model")
    real_load = CheckpointManager._load

    def load(self, engine, path):
        if (Path(path).parent / "CARRIED_FROM.json").is_file():
            raise RuntimeError("size mismatch for latent_head.weight")
        return real_load(self, engine, path)

    monkeypatch.setattr(CheckpointManager, "_load", load)
    retried = _run(cfg, parent_run_id=parent)
    assert retried.is_completed(), retried.message
    new_folder = Path(read_journal(cfg.for_run().output_dir, parent).stages["sft-colar"].folder)
    result = SFTResult.load(new_folder)
    assert result.resumed_from is None and result.final_step == 6
    assert not (new_folder / "checkpoints" / "CARRIED_FROM.json").exists()


def test_a_reused_result_that_todays_code_cannot_read_stops_naming_the_stage_and_from(tmp_path):
    from flows.pipeline import _reuse_stage
    from tasks.training import TrainResult

    sft = _spec(tmp_path)
    record = _record(sft, key="5" * 64)
    _journal(tmp_path, **{"sft-colar": record})
    folder = Path(record.folder)
    folder.mkdir(parents=True)
    (folder / "stage_result.json").write_text(json.dumps({"model_dir": "m", "renamed_field": 1}))
    plan = RetryPlan(str(tmp_path / "runs"), "parent", retry=True)
    assert plan.reusable(sft) == folder
    with pytest.raises(RuntimeError, match=r"(?s)stage sft-colar: cannot reuse .*colar retry <run> --from sft-colar"):
        _reuse_stage(sft, folder, TrainResult, {}, plan, "parent")
