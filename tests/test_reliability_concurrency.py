"""Reliability, concurrency: two `colar run` processes with different configs at once, on one MLflow
and one Prefect server and one output_dir, keep their runs, checkpoints, artifacts and metrics apart.

The two configs differ in name and CoLaR seed, so their prepare and CoT stages have the same key
(the same work, the same folder) and their CoLaR and evaluate stages differ: the shared stages are
done once (a per-folder lock serialises them; the second run finds them finished), the others in
separate folders.

Two `colar run` processes with the same config but different output folders at once share nothing:
the absolute output folder is part of every stage key, so each runs every stage in its own folder
under its own parent run, and neither waits for the other's locks.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from bench.common import ROOT
from bench.pipeline_run import TINY, cli_env, colar_cmd

pytestmark = pytest.mark.slow


def run_at_once(tmp_path: Path, overrides: dict[str, list[str]], env: dict, timeout_s: float = 420) -> dict[str, str]:
    """Start one ``colar run`` per entry of ``overrides`` at the same time, wait for all (killing any
    still running after ``timeout_s``), assert each exited 0, and return each one's log text."""
    procs = {}
    for name, sets in overrides.items():
        log = open(tmp_path / f"{name}.log", "w")
        procs[name] = (subprocess.Popen(colar_cmd("run", overrides=sets), env=env, cwd=ROOT, stdout=log,
                                        stderr=subprocess.STDOUT), log)
    deadline, logs = time.time() + timeout_s, {}
    for name, (proc, log) in procs.items():
        try:
            proc.wait(timeout=max(1, deadline - time.time()))
        finally:
            if proc.poll() is None:
                proc.kill()
            log.close()
        logs[name] = (tmp_path / f"{name}.log").read_text()
        assert proc.returncode == 0, logs[name][-4000:]
    return logs


def test_two_pipelines_at_once_keep_runs_checkpoints_and_metrics_apart(tmp_path, mlflow_server, prefect_server):
    from mlflow import MlflowClient

    from colar_core.training.callbacks import read_metrics

    runs_dir = tmp_path / "runs"
    common = TINY + ["tracking.registered_model_name=null", f"output_dir={runs_dir}", "sft_colar.max_steps=8"]
    configs = {"rel-conc-a": 11, "rel-conc-b": 22}
    run_at_once(tmp_path, {name: common + [f"name={name}", f"sft_colar.seed={seed}"] for name, seed in configs.items()},
                cli_env(MLFLOW_TRACKING_URI=mlflow_server, PREFECT_API_URL=prefect_server))

    client = MlflowClient()
    exp = client.get_experiment_by_name("colar").experiment_id
    parents, children = {}, {}
    for name in configs:
        hits = client.search_runs([exp], filter_string=f"attributes.run_name = '{name}'")
        assert len(hits) == 1 and hits[0].info.status == "FINISHED"  # one parent each
        parents[name] = hits[0]
        kids = client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{hits[0].info.run_id}'")
        assert all(k.info.status == "FINISHED" for k in kids)
        children[name] = {k.data.tags["colar.stage"]: k for k in kids}
    assert parents["rel-conc-a"].info.run_id != parents["rel-conc-b"].info.run_id
    flow_runs = {p.data.tags["prefect.flow_run_id"] for p in parents.values()}
    assert len(flow_runs) == 2

    # Shared stages (same key): one folder each, trained once, run once or found finished by the other.
    for stage in ("prepare", "sft-cot"):
        assert len(list(runs_dir.glob(f"{stage}-*"))) == 1
        assert any(stage in children[n] for n in configs)
    cot_dir = next(runs_dir.glob("sft-cot-*"))
    assert len(read_metrics(cot_dir / "metrics.jsonl", "start")) == 1  # never trained twice at once

    # Own stages: separate folders, each child run tied to its parent's config and its own folder.
    colar_dirs = {}
    for name, seed in configs.items():
        colar = children[name]["sft-colar"]
        assert colar.data.params["train.seed"] == str(seed)
        folder = colar.data.tags["colar.checkpoint.latest"].split("/checkpoints/")[0]
        colar_dirs[name] = folder
        losses = [r["loss"] for r in read_metrics(f"{folder}/metrics.jsonl", "step")]
        history = sorted(client.get_metric_history(colar.info.run_id, "loss"), key=lambda m: m.step)
        assert [m.value for m in history] == pytest.approx(losses, rel=1e-6) and len(losses) == 8

        evaluate = children[name]["evaluate"]
        eval_metrics = {k: v for k, v in evaluate.data.metrics.items() if "/" in k}
        assert eval_metrics and all(parents[name].data.metrics[k] == v for k, v in eval_metrics.items())
        assert evaluate.data.tags["mlflow.parentRunId"] == parents[name].info.run_id
    assert colar_dirs["rel-conc-a"] != colar_dirs["rel-conc-b"]
    assert len(list(runs_dir.glob("sft-colar-*"))) == 2 and len(list(runs_dir.glob("evaluate-*"))) == 2
    for folder in colar_dirs.values():
        assert list((runs_dir / folder.rsplit("/", 1)[1] / "checkpoints").glob("step_*/COMPLETE"))
    loss_a, loss_b = ([m.value for m in client.get_metric_history(children[n]["sft-colar"].info.run_id, "loss")]
                      for n in configs)
    assert loss_a != loss_b  # different seeds, different training: nothing was mixed up


def _string_values(value):
    """Every string in a (nested) stage result."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _string_values(v)
    elif isinstance(value, list):
        for v in value:
            yield from _string_values(v)


def test_the_same_config_in_two_output_folders_at_once_shares_nothing(tmp_path, mlflow_server, prefect_server):
    from mlflow import MlflowClient

    from colar_core.training.callbacks import read_metrics

    roots = {name: tmp_path / name / "runs" for name in ("a", "b")}
    common = TINY + ["name=rel-conc-folders", "tracking.registered_model_name=null"]
    logs = run_at_once(tmp_path, {name: common + [f"output_dir={root}"] for name, root in roots.items()},
                       cli_env(MLFLOW_TRACKING_URI=mlflow_server, PREFECT_API_URL=prefect_server))
    for text in logs.values():
        assert "LockTimeout" not in text and "waiting for lock" not in text  # neither waited for the other

    client = MlflowClient()
    exp = client.get_experiment_by_name("colar").experiment_id
    parents = {}
    for run in client.search_runs([exp], filter_string="attributes.run_name = 'rel-conc-folders'"):
        parents.setdefault(run.data.params["output_dir"], []).append(run)
    assert sorted(parents) == sorted(str(r) for r in roots.values())  # same config, one parent per folder
    assert all(len(runs) == 1 and runs[0].info.status == "FINISHED" for runs in parents.values())
    assert len({runs[0].data.tags["prefect.flow_run_id"] for runs in parents.values()}) == 2

    stages = ("prepare", "sft-cot", "sft-colar", "evaluate")
    folders = {}
    for name, root in roots.items():
        parent = parents[str(root)][0]
        kids = client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
        assert sorted((k.data.tags["colar.stage"], k.info.status) for k in kids) == sorted(
            (stage, "FINISHED") for stage in stages)  # its own children, one per stage
        kid_ids = {k.info.run_id for k in kids}
        for stage in stages:
            (folder,) = root.glob(f"{stage}-*")  # every stage ran here, in a folder of its own key
            folders.setdefault(stage, set()).add(folder.name)
            result = json.loads((folder / "stage_result.json").read_text())
            assert result["mlflow_run_id"] in kid_ids, (name, stage)  # a result of this run, not the other's
            paths = [v for v in _string_values(result) if v.startswith("/")]
            assert paths and all(Path(p).is_relative_to(root) for p in paths), (name, stage, paths)
            if stage.startswith("sft-"):
                assert len(read_metrics(folder / "metrics.jsonl", "start")) == 1  # trained here, once
        colar = next(k for k in kids if k.data.tags["colar.stage"] == "sft-colar")
        assert Path(colar.data.tags["colar.checkpoint.latest"]).is_relative_to(root)
    assert all(len(names) == 2 for names in folders.values())  # the folder is in the key: two keys per stage
