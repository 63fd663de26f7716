"""The registered model served over HTTP by MLflow's own server (issue 16, part 6).

A tiny untrained CoLaR model is saved and logged exactly as the report stage logs the pipeline's
final model (:func:`tasks.report.log_colar_model`: the pyfunc from code, its signature and
input example), registered, given the alias ``candidate``, and served with
``mlflow models serve -m models:/NAME@candidate --env-manager local`` (this environment, no
conda/virtualenv) on a free loopback port. ``POST /invocations`` then answers each question with
``answer``, ``n_latents`` and ``text``; ``compression_factor`` (and ``max_latents``) are chosen per
request through ``params``. No pipeline runs: only the session MLflow server, the model and the
serving process.

What one request may cost (issue 22, item 15): ``max_latents`` and the rows of a request are capped
(HTTP 400 above a cap), a request that runs past the server's request timeout stops its generation
instead of running on behind the 504, and SIGTERM ends the server even while it generates.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from colar_core.net import free_port
from colar_core.procs import alive, group_processes, stop_processes

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
    """SIGTERM the server's process group (mlflow's CLI, uvicorn and its workers), SIGKILL what is left
    after 15 s. The group, not the CLI: the CLI ends at once on SIGTERM, and a uvicorn that did not
    would be left running on its own."""
    stop_processes(lambda: group_processes(proc.pid), grace_s=15.0, reap=proc.poll)
    proc.poll()


def _tiny_model_dir(tmp_path: Path) -> Path:
    """A tiny untrained CoLaR model folder, trained factors 1-3 as the CoLaR SFT stage records them."""
    import torch

    from bench.tiny import tiny_model, tiny_tokenizer

    torch.manual_seed(0)
    tok = tiny_tokenizer()
    model_dir = tmp_path / "model"
    model = tiny_model(tok)
    model.state.trained_compression_factors = [1, 2, 3]  # as the CoLaR SFT stage records it
    model.save_pretrained(model_dir, tok)
    return model_dir


def _serving_run() -> str:
    from mlflow import MlflowClient

    client = MlflowClient()
    experiment = client.get_experiment_by_name("colar-serving-test")
    experiment_id = experiment.experiment_id if experiment else client.create_experiment("colar-serving-test")
    return client.create_run(experiment_id, run_name="serving-test").info.run_id


@pytest.fixture
def candidate_model(tmp_path, mlflow_server, one_thread):
    """``models:/colar-serve-test@candidate``: a tiny model logged by the report stage's code path (no
    frontier, as a model logged before issue 26 or from metrics without times)."""
    from mlflow import MlflowClient

    from bench.tiny import PROBLEMS
    from tasks.report import log_colar_model

    model_dir = _tiny_model_dir(tmp_path)
    client = MlflowClient()
    run_id = _serving_run()
    info = log_colar_model(run_id, str(model_dir), PROBLEMS[0].question, MODEL_NAME)
    client.set_registered_model_alias(MODEL_NAME, "candidate", str(info.registered_model_version))
    assert client.get_run(run_id).info.status == "FINISHED"
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
        assert len(rows) == 1 and set(rows[0]) == {"answer", "n_latents", "text", "compression_factor", "why",
                                                   "warning"}
        assert (rows[0]["compression_factor"], rows[0]["why"], rows[0]["warning"]) == \
            (2, "compression_factor 2 as asked", "")
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
        # (issue 22, item 15: max_latents above the server's cap, 1024 by default, is refused the same way;
        # it used to run on behind the server's 504)
        for bad, word in (({"compression_factor": 0}, "compression_factor"), ({"compression_factor": 1000}, "trained"),
                          ({"max_latents": 0}, "max_latents"), ({"max_latents": -1}, "max_latents"),
                          ({"max_latents": 10_000_000}, "max_latents: at most 1024"),
                          # issue 26, item 4: this model was logged without a frontier
                          ({"latency_budget_ms": 50.0}, "latency_budget_ms: this model was logged without a frontier"),
                          ({"min_accuracy": 0.5}, "min_accuracy: this model was logged without a frontier")):
            status, body = _post(base + "/invocations", {"dataframe_split": {"columns": ["question"],
                                                                             "data": [[question]]}, "params": bad})
            assert status == 400 and word in body.get("message", ""), (bad, body)
            assert "Traceback" not in json.dumps(body) and "stack_trace" not in body, body

        # more questions in one request than the server's cap (1024 by default): 400 naming the cap
        status, body = _post(base + "/invocations", {"dataframe_split": {"columns": ["question"],
                                                                         "data": [[question]] * 1025}})
        assert status == 400 and "questions: at most 1024 rows per request" in body.get("message", ""), body

        # a request without the signature's column is refused with a message, not a stack trace
        status, body = _post(base + "/invocations", {"dataframe_split": {"columns": ["prompt"], "data": [["1+1"]]}})
        assert status == 400 and "question" in json.dumps(body), body
        print(f"\nmlflow models serve: /ping after {startup_s:.1f} s, first /invocations {first_s:.2f} s")
    finally:
        _stop_group(proc)
    assert proc.poll() is not None



def test_a_served_model_chooses_its_factor_for_a_latency_budget_or_a_minimum_accuracy(mlflow_server, tmp_path,
                                                                                      one_thread):
    """Issue 26, item 4: the model logged with its frontier (here made by hand: c=1 80 % at 30 ms, c=2
    70 % at 20 ms, c=3 50 % at 10 ms per question) picks the factor for ``latency_budget_ms`` or
    ``min_accuracy``; each answer says which and why; a budget nothing meets gets the fastest and a
    warning; a budget that means nothing is a 400."""
    import mlflow

    from bench.tiny import PROBLEMS
    from colar_core.frontier import Frontier, FrontierPoint
    from tasks.report import log_colar_model

    frontier = Frontier(set_name="gsm8k", points=tuple(
        FrontierPoint(compression_factor=c, accuracy=acc, accuracy_ci95=0.0, accuracy_qci95=0.04,
                      mean_latents=12.0 / c, ms_per_question=ms, n_questions=500)
        for c, acc, ms in ((1, 0.8, 30.0), (2, 0.7, 20.0), (3, 0.5, 10.0))))
    name = "colar-serve-frontier-test"
    info = log_colar_model(_serving_run(), str(_tiny_model_dir(tmp_path)), PROBLEMS[0].question, name,
                           frontier=frontier)
    uri = f"models:/{name}/{info.registered_model_version}"
    logged = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(tmp_path / "logged")))
    assert Frontier.from_json((logged / "artifacts" / "frontier.json").read_text()) == frontier

    with _serving(uri, tmp_path, mlflow_server) as (base, _, _, _):
        def ask(params: dict, n: int = 1) -> tuple[int, dict]:
            return _post(base + "/invocations", {"dataframe_split": {
                "columns": ["question"], "data": [[PROBLEMS[i + 1].question] for i in range(n)]},
                "params": {"max_latents": 3, **params}})

        for params, c, why in (({"latency_budget_ms": 25}, 2, "latency_budget_ms 25: the most accurate of the 2"),
                               ({"latency_budget_ms": 30.0}, 1, "latency_budget_ms 30: the most accurate of the 3"),
                               ({"min_accuracy": 0.75}, 1, "min_accuracy 0.75: the fastest of the 1 of 3"),
                               ({"min_accuracy": 0.6}, 2, "min_accuracy 0.6: the fastest of the 2 of 3"),
                               ({"compression_factor": 3}, 3, "compression_factor 3 as asked (c=3: accuracy 50.0 %"),
                               ({}, 2, "compression_factor 2 (the default")):
            status, body = ask(params, n=2)
            assert status == 200, (params, body)
            rows = body["predictions"]
            assert [r["compression_factor"] for r in rows] == [c, c], (params, rows)
            assert all(r["why"].startswith(why) and r["warning"] == "" for r in rows), (params, rows)
            assert all(1 <= r["n_latents"] <= 3 for r in rows)
        assert "measured at evaluation on gsm8k, 500 questions" in rows[0]["why"]

        # a budget nothing meets: the fastest factor, and a warning that says so
        for params, warning in (({"latency_budget_ms": 1}, "no compression factor meets latency_budget_ms 1: the "
                                 "fastest, c=3, took 10 ms per question at evaluation"),
                                ({"min_accuracy": 0.95}, "no compression factor meets min_accuracy 0.95: the most "
                                 "accurate, c=1, had 80.0 %")):
            status, body = ask(params)
            assert status == 200, body
            row = body["predictions"][0]
            assert row["compression_factor"] == 3 and row["warning"].startswith(warning), row

        # two of the three, or a budget that means nothing: HTTP 400, one line, no trace
        for bad, word in (({"latency_budget_ms": 50, "min_accuracy": 0.5}, "give at most one of"),
                          ({"compression_factor": 2, "latency_budget_ms": 50}, "give at most one of"),
                          ({"latency_budget_ms": 0}, "latency_budget_ms: must be a number of milliseconds > 0"),
                          ({"latency_budget_ms": -5}, "latency_budget_ms: must be a number of milliseconds > 0"),
                          ({"min_accuracy": 2}, "min_accuracy: a fraction from 0 to 1"),
                          ({"latency_budget_ms": "fast"}, "latency_budget_ms")):
            status, body = ask(bad)
            assert status == 400 and word in body.get("message", ""), (bad, body)
            assert "Traceback" not in json.dumps(body) and "stack_trace" not in body, body


def test_the_report_stage_logs_the_model_with_the_frontier_of_its_metrics(mlflow_server, tmp_path, monkeypatch,
                                                                          one_thread):
    """What the pipeline logs: the frontier of the evaluate stage's metrics (the primary set's, named by
    the first set digest) goes with the model as the artifact ``frontier`` and into the report folder."""
    import logging

    import mlflow

    import tasks.report as report
    from bench.tiny import PROBLEMS
    from colar_core.frontier import Frontier

    metrics: dict[str, float] = {}
    for c, acc, sec in ((1, 0.8, 0.03), (2, 0.7, 0.02)):
        for prefix, scale in (("", 1.0), ("svamp/", 0.5)):
            metrics.update({f"accuracy/{prefix}c{c}": acc * scale, f"accuracy_ci95/{prefix}c{c}": 0.0,
                            f"accuracy_qci95/{prefix}c{c}": 0.05, f"n_questions/{prefix}c{c}": 40.0,
                            f"mean_latents/{prefix}c{c}": 10.0 / c, f"sec_per_question/{prefix}c{c}": sec / scale})
    monkeypatch.setattr(report, "get_run_logger", lambda: logging.getLogger("test-report"))
    for quiet in ("table1_artifact", "links_artifact"):  # Prefect artifacts: no Prefect server here
        monkeypatch.setattr(report, quiet, lambda *a, **k: None)
    result = report.report_stage.fn(_serving_run(), metrics, str(_tiny_model_dir(tmp_path)), str(tmp_path / "report"),
                                    None, PROBLEMS[0].question, set_digests={"gsm8k": "a" * 64, "svamp": "b" * 64})
    expected = Frontier.from_metrics(metrics, set_name="gsm8k")
    assert expected is not None and [p.accuracy for p in expected.points] == [0.8, 0.7]
    assert Frontier.from_json((tmp_path / "report" / "frontier.json").read_text()) == expected
    logged = Path(mlflow.artifacts.download_artifacts(result["model_uri"], dst_path=str(tmp_path / "logged")))
    assert Frontier.from_json((logged / "artifacts" / "frontier.json").read_text()) == expected


@contextlib.contextmanager
def _serving(uri: str, tmp_path: Path, mlflow_server: str, **env: str):
    """``mlflow models serve`` of ``uri`` (one worker, its own process group, ``env`` added) until /ping
    answers; yields (base URL, the mlflow process, the uvicorn process that predicts, the log file). The
    group is stopped afterwards, SIGKILL for what SIGTERM leaves."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    full_env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                **env}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "models", "serve", "-m", uri, "--env-manager", "local",
             "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=full_env, cwd=str(tmp_path),
            start_new_session=True)
    try:
        _wait_ping(base, proc, log)
        servers = [child for child in psutil.Process(proc.pid).children(recursive=True)
                   if "mlflow.pyfunc.scoring_server.app:app" in " ".join(child.cmdline())]
        assert len(servers) == 1, [c.cmdline() for c in psutil.Process(proc.pid).children(recursive=True)]
        yield base, proc, servers[0], log
    finally:
        _stop_group(proc)


def _cpu_s(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def _runaway_request(base: str, question: str, timeout: float = 120.0) -> tuple[int, dict]:
    """The request of issue 22, item 15: one question, max_latents ten million (the tiny untrained
    model never stops on its own). Returns (status, body: the JSON, or {"text": ...} as MLflow's 504 is plain
    text); status 0 when the connection broke."""
    payload = {"dataframe_split": {"columns": ["question"], "data": [[question]]}, "params": {"max_latents": 10_000_000}}
    req = urllib.request.Request(base + "/invocations", data=json.dumps(payload).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 (loopback)
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    except (urllib.error.URLError, OSError) as err:
        return 0, {"error": repr(err)}
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, {"text": raw.decode(errors="replace")}


def test_a_request_past_the_servers_timeout_stops_its_generation(candidate_model, mlflow_server, tmp_path):
    """The server answers 504 after MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT; the generation behind it used to
    keep a core busy (and its KV cache growing) until max_latents. Here the cap is raised to let the
    runaway request in, and the timeout is 3 s."""
    from bench.tiny import PROBLEMS

    uri, _ = candidate_model
    with _serving(uri, tmp_path, mlflow_server, MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT="3",
                  COLAR_SERVE_MAX_LATENTS="10000000") as (base, _, server, log):
        t0 = time.monotonic()
        status, body = _runaway_request(base, PROBLEMS[1].question)
        assert status == 504, body
        assert 2.5 < time.monotonic() - t0 < 30, time.monotonic() - t0
        time.sleep(1.5)  # the generation's next step sees the deadline
        before = _cpu_s(server)
        time.sleep(2.0)
        busy = _cpu_s(server) - before
        assert busy < 0.3, f"the server still used {busy:.2f} s of CPU in 2 s after its 504:\n{log.read_text()[-2000:]}"
        assert "colar: stopped a request of 1 question(s), max_latents 10000000" in log.read_text()

        # and it serves the next request
        status, body = _post(base + "/invocations", {"dataframe_split": {"columns": ["question"],
                                                                         "data": [[PROBLEMS[2].question]]},
                                                     "params": {"max_latents": 3}})
        assert status == 200 and body["predictions"][0]["n_latents"] <= 3, body


def test_sigterm_stops_the_server_while_it_generates(candidate_model, mlflow_server, tmp_path):
    """uvicorn's graceful shutdown waited for the request in progress and asyncio.run for the thread that
    generates: SIGTERM did not end the server (with this 60 s request timeout, not even after the 504).
    Now the generation stops at once and the server exits within seconds; the client gets a 503."""
    from bench.tiny import PROBLEMS

    uri, _ = candidate_model
    with _serving(uri, tmp_path, mlflow_server, MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT="60",
                  COLAR_SERVE_MAX_LATENTS="10000000") as (base, proc, server, log):
        answer: list[tuple[int, dict]] = []
        client = threading.Thread(target=lambda: answer.append(_runaway_request(base, PROBLEMS[1].question)))
        client.start()
        before = _cpu_s(server)
        deadline = time.monotonic() + 20
        while _cpu_s(server) - before < 0.5:  # generating
            assert time.monotonic() < deadline, "the request never started generating"
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGTERM)
        t0 = time.monotonic()
        while alive(server.pid):  # a zombie counts as ended (its parent, mlflow's CLI, got SIGTERM too)
            if time.monotonic() - t0 > 15:
                pytest.fail(f"the server was still running 15 s after SIGTERM (CPU {_cpu_s(server):.1f} s):\n"
                            f"{log.read_text()[-2000:]}")
            time.sleep(0.1)
        stopped_s = time.monotonic() - t0
        client.join(timeout=30)
        assert answer and answer[0][0] == 503 and "shutting down" in answer[0][1].get("message", ""), answer
        print(f"\nuvicorn exited {stopped_s:.1f} s after SIGTERM")
