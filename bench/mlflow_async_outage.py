"""What MLflow's own asynchronous logging does when the tracking server is lost mid-training,
next to colar's metrics sender (:class:`colar_infra.tracking.metrics_sender.MlflowMetricsCallback`).

A local ``mlflow server`` (SQLite, started with :func:`colar_infra.servers.ensure_mlflow`) runs in a
temporary folder. Each scenario runs in a process of its own (the way a pipeline process would log)
and logs one metric (``loss``) per step, every ``--interval-s`` seconds, to a fresh run:

1. ``--before`` steps with the server up;
2. the server is killed (SIGKILL of its process group) and logging goes on;
3. for the *outage* scenarios the server is started again on the same port (same store) after
   ``--down-s`` seconds, logging going on meanwhile, and ``--after`` more steps are logged once it
   answers; for the *ends-during-outage* scenarios ``--during`` steps are logged with the server
   away and the "stage" ends while it still is (MLflow: flush the async queue, then let the process
   exit; colar: ``close()``). The server comes back only after that process has ended.

Then the points the server holds are counted (``get_metric_history``): how many of the steps
arrived, how many twice. For each scenario it records how long each logging call took (did the
training loop wait?), whether calls raised, how many MLflow async batches failed (dropped, with an
``ERROR`` log line), how long the final flush / ``close()`` and the process exit took, and what was
left on disk (colar's pending file, then sent with ``replay_pending``).

Scenarios: ``mlflow-async-default`` (``log_batch(..., synchronous=False)`` with MLflow's default
HTTP retries: ``MLFLOW_HTTP_REQUEST_MAX_RETRIES=7``, backoff factor 2, up to ~4 min per call),
``mlflow-async-short-retries`` (``MLFLOW_HTTP_REQUEST_MAX_RETRIES=1``,
``MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR=1``, ``MLFLOW_HTTP_REQUEST_TIMEOUT=5``: what one would set so
that nothing waits for minutes), ``colar-sender``; each also as ``...-ends-during-outage``; and
``mlflow-sync-default-one-call``: one plain ``log_batch`` while the server is away (how long MLflow's
default client retries hold a caller).

::

    python -m bench.mlflow_async_outage                      # -> bench/results/mlflow_async_outage.json
    python -m bench.mlflow_async_outage --scenarios colar-sender mlflow-async-default --down-s 5

Light on the CPU: one tiny metric per step, a sleep between steps; the cost is the server restarts
(one per scenario) and the Python start of each scenario process.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import logging
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

from bench.common import RESULTS_DIR, command_line, utc_now, write_json

SHORT_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
#: scenario -> (logger, environment added to the scenario process, does the server come back mid-run)
SCENARIOS = {
    "mlflow-async-default": ("mlflow-async", {}, True),
    "mlflow-async-short-retries": ("mlflow-async", SHORT_RETRIES, True),
    "colar-sender": ("colar", {}, True),
    "mlflow-async-default-ends-during-outage": ("mlflow-async", {}, False),
    "mlflow-async-short-retries-ends-during-outage": ("mlflow-async", SHORT_RETRIES, False),
    "colar-sender-ends-during-outage": ("colar", {}, False),
    # one plain (synchronous) log_batch while the server is away: how long MLflow's client retries block
    "mlflow-sync-default-one-call": ("mlflow-sync", {}, False),
}
METRIC = "loss"


# ----------------------------------------------------------------------------------------------
# the server


def _record(state_dir: Path) -> dict:
    return json.loads((state_dir / "servers.json").read_text())["mlflow"]


def _health(uri: str, timeout: float = 1.0) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(uri + "/health", timeout=timeout) as resp:  # noqa: S310 (loopback)
            return resp.status == 200
    except OSError:
        return False


def kill_server(state_dir: Path, uri: str) -> float:
    """SIGKILL the recorded server's process group; returns when it no longer answers."""
    rec = _record(state_dir)
    try:
        os.killpg(rec.get("pgid", rec["pid"]), signal.SIGKILL)
    except ProcessLookupError:
        pass
    t0 = time.monotonic()
    while _health(uri, 0.3) and time.monotonic() - t0 < 10:
        time.sleep(0.1)
    return time.monotonic()


def start_server(state_dir: Path, port: Optional[int] = None) -> str:
    """Start (or reuse) the server recorded in ``state_dir``, on ``port`` when given."""
    from colar_infra.servers import ensure_mlflow

    saved = os.environ.pop("MLFLOW_TRACKING_URI", None)  # ensure_mlflow would defer to it
    try:
        return ensure_mlflow(state_dir, port=port)
    finally:
        if saved is not None:
            os.environ["MLFLOW_TRACKING_URI"] = saved


# ----------------------------------------------------------------------------------------------
# one scenario, in its own process


class _ErrorCount(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.count, self.first = 0, None

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1
        if self.first is None:
            self.first = record.getMessage()[:300]


def _ms_stats(xs: list[float]) -> dict:
    """Call times in ms: median, 99th percentile (nearest rank), max."""
    xs = sorted(xs)
    return {"n": len(xs), "median_ms": round(1000 * statistics.median(xs), 3),
            "p99_ms": round(1000 * xs[max(0, math.ceil(0.99 * len(xs)) - 1)], 3), "max_ms": round(1000 * xs[-1], 3)}


def child(args) -> None:
    """Log the steps of one scenario; write what happened to ``args.result`` (JSON)."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    from colar_infra.tracking.metrics_sender import MlflowMetricsCallback

    kind, _, comes_back = SCENARIOS[args.child]
    state_dir, uri = Path(args.state_dir), args.uri
    port = int(uri.rsplit(":", 1)[1])
    result_path = Path(args.result)
    errors = _ErrorCount()
    logging.getLogger("mlflow").addHandler(errors)

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("outage-bench")
    exp_id = exp.experiment_id if exp else client.create_experiment("outage-bench")
    run_id = client.create_run(exp_id, run_name=args.child).info.run_id
    fallback = Path(os.environ["COLAR_HOME"]) / "unflushed" / f"{run_id}.jsonl"
    cb = MlflowMetricsCallback(client, run_id, fallback_path=fallback) if kind == "colar" else None
    futures: list[concurrent.futures.Future] = []
    out: dict = {"scenario": args.child, "run_id": run_id, "fallback_path": str(fallback),
                 "env": {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_HTTP") or k.startswith("MLFLOW_ASYNC")}}
    times = {"up": [], "down": [], "back": []}
    raised: list[str] = []
    phase = {"name": "up"}
    timeline: dict = {}
    t_start = time.monotonic()

    def log(step: int) -> None:
        t0 = time.perf_counter()
        try:
            if cb is not None:
                cb.on_step(step, {METRIC: 1.0 / (step + 1)})
            elif kind == "mlflow-sync":
                client.log_batch(run_id, metrics=[Metric(METRIC, 1.0 / (step + 1), int(time.time() * 1000), step)])
            else:
                op = client.log_batch(run_id, metrics=[Metric(METRIC, 1.0 / (step + 1), int(time.time() * 1000), step)],
                                      synchronous=False)
                futures.extend(op._operation_futures)
        except Exception as e:  # noqa: BLE001 - what we measure
            raised.append(repr(e)[:300])
        times[phase["name"]].append(time.perf_counter() - t0)

    def restart_later(killed_at: float) -> None:
        time.sleep(max(0.0, killed_at + args.down_s - time.monotonic()))
        timeline["restart_begun_s"] = round(time.monotonic() - t_start, 2)
        start_server(state_dir, port)
        timeline["server_back_s"] = round(time.monotonic() - t_start, 2)
        phase["name"] = "back"

    step = 0
    for _ in range(args.before):
        log(step)
        step += 1
        time.sleep(args.interval_s)
    killed_at = kill_server(state_dir, uri)
    timeline["killed_s"] = round(killed_at - t_start, 2)
    phase["name"] = "down"
    if comes_back:
        restarter = threading.Thread(target=restart_later, args=(killed_at,), daemon=True)
        restarter.start()
        while phase["name"] == "down":  # log while it is away, then --after steps once it is back
            log(step)
            step += 1
            time.sleep(args.interval_s)
        for _ in range(args.after):
            log(step)
            step += 1
            time.sleep(args.interval_s)
        restarter.join()
    else:
        for _ in range(1 if kind == "mlflow-sync" else args.during):
            log(step)
            step += 1
            time.sleep(args.interval_s)
    out["steps_logged"] = step
    out["steps_per_phase"] = {k: len(v) for k, v in times.items()}
    out["call_latency"] = {k: _ms_stats(v) for k, v in times.items() if v}
    out["calls_raised"] = len(raised)
    out["first_raise"] = raised[0] if raised else None

    # the stage ends: flush (MLflow) / close (colar)
    timeline["end_s"] = round(time.monotonic() - t_start, 2)
    t0 = time.monotonic()
    if cb is not None:
        cb.close()
        out["end_call"] = "MlflowMetricsCallback.close()"
        out["end_returned"] = True
    elif kind == "mlflow-sync":
        out["end_call"] = None
        out["end_returned"] = True
    else:
        out["end_call"] = "wait for every async batch (their futures), at most --flush-cap-s"
        done, not_done = concurrent.futures.wait(futures, timeout=args.flush_cap_s)
        out["end_returned"] = not not_done
        out["batches"] = len(futures)
        out["batches_done_at_end"] = len(done)
        out["batches_failed"] = sum(1 for f in done if f.exception() is not None)
        first = next((f.exception() for f in done if f.exception() is not None), None)
        out["first_batch_error"] = repr(first)[:300] if first else None
    out["end_s"] = round(time.monotonic() - t0, 2)
    out["error_log_lines"] = errors.count
    out["first_error_log_line"] = errors.first
    out["fallback_lines"] = sum(1 for _ in open(fallback)) if fallback.exists() else 0
    out["timeline_s"] = timeline
    result_path.write_text(json.dumps(out, indent=2))
    # Now the process exits as a pipeline process would: MLflow's atexit hook drains its queue.


# ----------------------------------------------------------------------------------------------
# the driver


def _arrived(uri: str, run_id: str) -> dict:
    from mlflow import MlflowClient

    history = MlflowClient(tracking_uri=uri).get_metric_history(run_id, METRIC)
    steps = [m.step for m in history]
    return {"points": len(steps), "distinct_steps": len(set(steps)), "duplicates": len(steps) - len(set(steps))}


def run_scenario(name: str, args, state_dir: Path, work: Path) -> dict:
    uri = start_server(state_dir)  # the server is up at the start of each scenario
    port = int(uri.rsplit(":", 1)[1])
    result = work / f"{name}.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_HTTP_", "MLFLOW_ASYNC_"))}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.update({"DO_NOT_TRACK": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "COLAR_HOME": str(work / f"home-{name}"),
                "OMP_NUM_THREADS": "1", **SCENARIOS[name][1]})
    cmd = [sys.executable, "-m", "bench.mlflow_async_outage", "--child", name, "--state-dir", str(state_dir),
           "--uri", uri, "--result", str(result), "--before", str(args.before), "--after", str(args.after),
           "--during", str(args.during), "--interval-s", str(args.interval_s), "--down-s", str(args.down_s),
           "--flush-cap-s", str(args.flush_cap_s)]
    log = open(work / f"{name}.log", "wb")
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=Path(__file__).resolve().parents[1], env=env, stdout=log, stderr=subprocess.STDOUT)
    # wait for the scenario's result, then for the process to exit (at most --exit-cap-s)
    while not result.exists() and proc.poll() is None:
        time.sleep(0.2)
    wrote_at = time.monotonic()
    try:
        proc.wait(timeout=args.exit_cap_s)
        exit_info = {"exited": True, "exit_after_result_s": round(time.monotonic() - wrote_at, 2), "rc": proc.returncode}
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        exit_info = {"exited": False, "killed_after_s": args.exit_cap_s,
                     "note": "the process did not exit (MLflow's atexit hook drains the async queue, retrying a dead "
                             "server) and was SIGKILLed"}
    log.close()
    if not result.exists():
        raise RuntimeError(f"scenario {name} wrote no result; log: {work / f'{name}.log'}")
    out = json.loads(result.read_text())
    out["process_exit"] = exit_info
    out["wall_s"] = round(time.monotonic() - t0, 2)
    t_back = time.monotonic()
    start_server(state_dir, port)  # back (if the scenario left it away), same port and store
    out["server_down_after_process_s"] = round(time.monotonic() - t_back, 2)
    out["arrived"] = _arrived(uri, out["run_id"])
    fallback = Path(out["fallback_path"])
    if fallback.exists():
        from mlflow import MlflowClient

        from colar_infra.tracking.pending import replay_pending

        replay_pending(fallback, MlflowClient(tracking_uri=uri))
        out["arrived_after_replay_pending"] = _arrived(uri, out["run_id"])
    final = out.get("arrived_after_replay_pending", out["arrived"])
    out["lost"] = out["steps_logged"] - final["distinct_steps"]
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenarios", nargs="+", choices=list(SCENARIOS), default=list(SCENARIOS))
    p.add_argument("--before", type=int, default=50, help="steps logged before the server is killed")
    p.add_argument("--after", type=int, default=50, help="steps logged once it is back (outage scenarios)")
    p.add_argument("--during", type=int, default=300, help="steps logged while it is away (ends-during-outage)")
    p.add_argument("--interval-s", type=float, default=0.05, help="seconds between two steps")
    p.add_argument("--down-s", type=float, default=10.0, help="seconds before the restart begins (outage scenarios)")
    p.add_argument("--flush-cap-s", type=float, default=60.0, help="most seconds the end of a stage waits for MLflow's batches")
    p.add_argument("--exit-cap-s", type=float, default=60.0, help="most seconds a scenario process may take to exit")
    p.add_argument("--out", default=str(RESULTS_DIR / "mlflow_async_outage.json"))
    # the scenario process
    p.add_argument("--child", choices=list(SCENARIOS), help=argparse.SUPPRESS)
    p.add_argument("--state-dir", help=argparse.SUPPRESS)
    p.add_argument("--uri", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args)
        return

    import mlflow

    from colar_infra.servers import stop_servers

    work = Path(tempfile.mkdtemp(prefix="colar-outage-bench-"))
    state_dir = work / "server"
    report = {"bench": "mlflow_async_outage", "command": command_line("bench.mlflow_async_outage", argv),
              "date": utc_now(), "versions": {"python": platform.python_version(), "mlflow": mlflow.__version__},
              "host": {"cpus": os.cpu_count(), "platform": platform.platform()},
              "config": {k: v for k, v in vars(args).items() if k not in ("child", "state_dir", "uri", "result")},
              "scenarios": {}}
    try:
        for name in args.scenarios:
            print(f"--- {name}", flush=True)
            report["scenarios"][name] = res = run_scenario(name, args, state_dir, work)
            print(json.dumps({k: res[k] for k in ("steps_logged", "calls_raised", "end_s", "lost", "arrived",
                                                 "process_exit", "timeline_s")}), flush=True)
    finally:
        stop_servers(state_dir)
        shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {write_json(args.out, report)}")


if __name__ == "__main__":
    main()
