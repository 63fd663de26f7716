"""The registered model served over HTTP by MLflow's own server (issue 16, part 6).

A tiny untrained CoLaR model is saved and logged exactly as the report stage logs the pipeline's
final model (:func:`tasks.report.log_colar_model`: the pyfunc from code, its signature and
input example), registered, given the alias ``candidate``, and served with
``mlflow models serve -m models:/NAME@candidate --env-manager local`` (this environment, no
conda/virtualenv) on a free loopback port. ``POST /invocations`` then answers each question with
``answer``, ``n_latents`` and ``text``; ``compression_factor`` (and ``max_latents``) are chosen per
request through ``params``. No pipeline runs: only the session MLflow server, the model and the
serving process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from colar_core.net import free_port

pytestmark = pytest.mark.slow

MODEL_NAME = "colar-serve-test"  # not the pipeline's colar-tiny: other tests register that one
START_TIMEOUT_S = 240.0  # the server imports torch/transformers and loads the model before /ping answers


def _post(url: str, payload: dict, timeout: float = 60.0) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 (loopback)
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def _wait_ping(base: str, proc: subprocess.Popen, log: Path) -> float:
    started = time.monotonic()
    while time.monotonic() - started < START_TIMEOUT_S:
        if proc.poll() is not None:
            pytest.fail(f"mlflow models serve exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(base + "/ping", timeout=2) as resp:  # noqa: S310
                if resp.status == 200:
                    return time.monotonic() - started
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    pytest.fail(f"mlflow models serve did not answer /ping within {START_TIMEOUT_S:.0f} s:\n{log.read_text()[-3000:]}")


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group (uvicorn and its worker), SIGKILL what is left."""
    for sig, wait_s in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait_s)
            break
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture
def candidate_model(tmp_path, mlflow_server, one_thread):
    """``models:/colar-serve-test@candidate``: a tiny model logged by the report stage's code path."""
    import torch
    from mlflow import MlflowClient

    from bench.tiny import PROBLEMS, tiny_model, tiny_tokenizer
    from tasks.report import log_colar_model

    torch.manual_seed(0)
    tok = tiny_tokenizer()
    model_dir = tmp_path / "model"
    model = tiny_model(tok)
    model.state.trained_compression_factors = [1, 2, 3]  # as the CoLaR SFT stage records it
    model.save_pretrained(model_dir, tok)

    client = MlflowClient()
    experiment = client.get_experiment_by_name("colar-serving-test")
    experiment_id = experiment.experiment_id if experiment else client.create_experiment("colar-serving-test")
    run = client.create_run(experiment_id, run_name="serving-test")
    info = log_colar_model(run.info.run_id, str(model_dir), PROBLEMS[0].question, MODEL_NAME)
    client.set_registered_model_alias(MODEL_NAME, "candidate", str(info.registered_model_version))
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
    return f"models:/{MODEL_NAME}@candidate", info


def test_mlflow_models_serve_answers_invocations_with_answer_and_latents_per_compression_factor(
        candidate_model, mlflow_server, tmp_path):
    import mlflow

    from bench.tiny import PROBLEMS

    uri, info = candidate_model
    # the logged model carries the serving payload MLflow derives from the input example
    example_path = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(tmp_path / "logged"))) / \
        "serving_input_example.json"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server,
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # a tiny model: one thread, the machine stays quiet
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "models", "serve", "-m", uri, "--env-manager", "local",
             "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=str(tmp_path),
            start_new_session=True)  # its own process group: stopped as one with uvicorn's worker
    try:
        startup_s = _wait_ping(base, proc, log)

        question = PROBLEMS[1].question
        t0 = time.monotonic()
        status, body = _post(base + "/invocations", {"dataframe_split": {"columns": ["question"], "data": [[question]]},
                                                     "params": {"compression_factor": 2}})
        first_s = time.monotonic() - t0
        assert status == 200, body
        rows = body["predictions"]
        assert len(rows) == 1 and set(rows[0]) == {"answer", "n_latents", "text"}
        assert isinstance(rows[0]["answer"], str) and isinstance(rows[0]["text"], str)
        assert 1 <= rows[0]["n_latents"] <= 64  # the signature's default max_latents

        # the speed and the latent budget are chosen per request: two questions at c=1, at most 3 latents
        status, body = _post(base + "/invocations", {
            "dataframe_split": {"columns": ["question"], "data": [[question], [PROBLEMS[2].question]]},
            "params": {"compression_factor": 1, "max_latents": 3}})
        assert status == 200, body
        assert len(body["predictions"]) == 2
        assert all(1 <= row["n_latents"] <= 3 for row in body["predictions"])

        # the payload MLflow saved from the input example is a valid request as it stands
        example = json.loads(Path(example_path).read_text())
        assert example["params"] == {"compression_factor": 2}
        status, body = _post(base + "/invocations", example)
        assert status == 200, body
        assert len(body["predictions"]) == 1

        # a factor outside what the model was trained with, or no latents at all: HTTP 400, one line, no trace
        # (issue 22, items 13 and 14)
        for bad, word in (({"compression_factor": 0}, "compression_factor"), ({"compression_factor": 1000}, "trained"),
                          ({"max_latents": 0}, "max_latents"), ({"max_latents": -1}, "max_latents")):
            status, body = _post(base + "/invocations", {"dataframe_split": {"columns": ["question"],
                                                                             "data": [[question]]}, "params": bad})
            assert status == 400 and word in body.get("message", ""), (bad, body)
            assert "Traceback" not in json.dumps(body) and "stack_trace" not in body, body

        # a request without the signature's column is refused with a message, not a stack trace
        status, body = _post(base + "/invocations", {"dataframe_split": {"columns": ["prompt"], "data": [["1+1"]]}})
        assert status == 400 and "question" in json.dumps(body), body
        print(f"\nmlflow models serve: /ping after {startup_s:.1f} s, first /invocations {first_s:.2f} s")
    finally:
        _stop_group(proc)
    assert proc.poll() is not None

