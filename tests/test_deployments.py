"""deployments/prefect.yaml on a real Prefect server: the deployments are created, and one run of
the pipeline deployment executes the tiny config on a process worker."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.pipeline_run import TINY

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def _prefect(args, env, timeout=300):
    out = subprocess.run([sys.executable, "-m", "prefect", *args], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=timeout)
    assert out.returncode == 0, f"prefect {' '.join(args)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


def test_prefect_yaml_deploys_and_a_run_executes_on_a_worker(tmp_path, mlflow_server, prefect_server):
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    from flows.config import load_config

    # Not the launcher variables an in-process training run of this pytest process set for itself
    # (its MASTER_PORT is taken: the worker's flow would fail with EADDRINUSE).
    launch_vars = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")
    env = {**{k: v for k, v in os.environ.items() if k not in launch_vars}, "COLAR_REPO": str(REPO),
           "PREFECT_API_URL": prefect_server, "MLFLOW_TRACKING_URI": mlflow_server, "CI": "1"}
    _prefect(["work-pool", "create", "colar-process", "--type", "process", "--overwrite"], env)
    _prefect(["--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml"], env)

    with get_client(sync_client=True) as client:
        names = {d.name for d in client.read_deployments()}
        assert {"colar-pipeline", "colar-pipeline-nightly", "colar-evaluate"} <= names
        nightly = client.read_deployment_by_name("colar-pipeline/colar-pipeline-nightly")
        assert [s.schedule.cron for s in nightly.schedules] == ["0 2 * * *"]

    config = load_config(None, TINY + [f"output_dir={tmp_path / 'runs'}", "name=test-deployment",
                                       "tracking.registered_model_name=null"]).model_dump(mode="json")
    flow_run = run_deployment("colar-pipeline/colar-pipeline", parameters={"config": config}, timeout=0)
    worker = subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", "colar-process",
                               "--run-once"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    try:
        output, _ = worker.communicate(timeout=900)
    finally:
        if worker.poll() is None:
            worker.kill()
    deadline = time.time() + 60
    with get_client(sync_client=True) as client:
        while True:
            state = client.read_flow_run(flow_run.id).state
            if state.is_final() or time.time() > deadline:
                break
            time.sleep(2)
    assert state.is_completed(), f"{state.name}: {state.message}\n{output[-4000:]}"
    assert any((tmp_path / "runs").glob("sft-colar-*/model/colar_config.json"))
