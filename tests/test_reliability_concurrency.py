"""Reliability, concurrency: two `colar run` processes with different configs at once, on one MLflow
and one Prefect server and one output_dir, keep their runs, checkpoints, artifacts and metrics apart.

The two configs differ in name and CoLaR seed, so their prepare and CoT stages have the same key
(the same work, the same folder) and their CoLaR and evaluate stages differ: the shared stages are
done once (a per-folder lock serialises them; the second run finds them finished), the others in
separate folders.
"""

from __future__ import annotations

import subprocess
import time

import pytest

from tests.test_pipeline import TINY
from tests.test_reliability_faults import ROOT, cli_env, colar_cmd

pytestmark = pytest.mark.slow


def test_two_pipelines_at_once_keep_runs_checkpoints_and_metrics_apart(tmp_path, mlflow_server, prefect_server):
    from mlflow import MlflowClient

    from colar_core.training.callbacks import read_metrics

    runs_dir = tmp_path / "runs"
    common = TINY + ["tracking.registered_model_name=null", f"output_dir={runs_dir}", "sft_colar.max_steps=8"]
    configs = {"rel-conc-a": 11, "rel-conc-b": 22}
    env = cli_env(MLFLOW_TRACKING_URI=mlflow_server, PREFECT_API_URL=prefect_server)
    procs = {}
    for name, seed in configs.items():
        log = open(tmp_path / f"{name}.log", "w")
        procs[name] = (subprocess.Popen(colar_cmd("run", overrides=common + [f"name={name}", f"sft_colar.seed={seed}"]),
                                        env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT), log)
    deadline = time.time() + 420
    for name, (proc, log) in procs.items():
        try:
            proc.wait(timeout=max(1, deadline - time.time()))
        finally:
            if proc.poll() is None:
                proc.kill()
            log.close()
        assert proc.returncode == 0, (tmp_path / f"{name}.log").read_text()[-4000:]

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
