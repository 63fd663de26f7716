"""Several tiny pipelines started at once against one MLflow and one Prefect server: do they all
finish, each under its own runs, and what does it cost?

The servers are started for the bench by ``colar_infra.servers`` (the code ``colar servers start``
runs) in a fresh colar home, on the chosen backend: ``sqlite`` (the default files) or ``postgres``
(fresh databases ``<prefix>_mlflow`` / ``<prefix>_prefect`` on ``--db-url``, dropped at the end).
Then ``-n`` ``colar run`` processes of the tests' tiny pipeline start together, each with its own
name, output folder and CoLaR seed, one torch thread each (``OMP_NUM_THREADS=1``).

Recorded per pipeline: exit code and wall time; for the whole: server start time, total wall time,
and the signs of contention: retries in the pipelines' output (Prefect task retries, MLflow's HTTP
retries, metrics the sender could not deliver), "database is locked" anywhere (pipelines' output and
server logs), and the HTTP 5xx answers in the MLflow server's access log. Then the runs are checked
apart (:func:`check_runs_apart`): one FINISHED parent run per pipeline with exactly its four stage
runs, metrics equal to its own evaluate stage's, its own output folder and seed, its own COMPLETED
Prefect flow run.

::

    python -m bench.concurrent_pipelines --backend postgres --db-url postgresql://postgres@127.0.0.1:5432 -n 3
    python -m bench.concurrent_pipelines --backend sqlite -n 3
    # -> bench/results/concurrent_pipelines_<backend>.json

tests/test_concurrent_pipelines.py runs :func:`run_bench` on both backends and asserts the checks.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Iterator, Optional, Sequence

from bench.common import RESULTS_DIR, ROOT, command_line, utc_now, versions, write_json
from bench.pipeline_run import TINY, cli_env, colar_cmd
from colar_infra import servers
from colar_infra.backends import ServerSettings, drop_database

#: The stage runs every tiny pipeline has under its parent run (RL and the No-CoT baseline are off).
STAGES = {"prepare", "sft-cot", "sft-colar", "evaluate"}
#: Output lines that mean something was retried (Prefect task retries, urllib3 retries under MLflow's
#: client, the metrics sender's fallback file, colar's second call after MLflow's dataset insert race).
RETRY_PATTERNS = {
    "prefect_task_retry": re.compile(r"Retry \d+/\d+ will start|AwaitingRetry"),
    "http_retry": re.compile(r"Retrying \(Retry\("),
    "metrics_unflushed": re.compile(r"unflushed", re.IGNORECASE),
    "dataset_insert_race": re.compile(r"dataset insert race"),
}
LOCKED = re.compile(r"database is locked", re.IGNORECASE)
MLFLOW_5XX = re.compile(r'HTTP/1\.[01]" 5\d\d')
SERVER_ENV = ("MLFLOW_TRACKING_URI", "PREFECT_API_URL")


@contextlib.contextmanager
def without_server_env() -> Iterator[None]:
    """Without ``MLFLOW_TRACKING_URI`` / ``PREFECT_API_URL`` for a while: ``ensure_*`` would use them
    instead of starting the servers asked for (a test session sets them)."""
    saved = {k: os.environ.pop(k) for k in SERVER_ENV if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


@contextlib.contextmanager
def bench_servers(home: Path, settings: ServerSettings) -> Iterator[dict]:
    """MLflow and Prefect servers in ``home`` on ``settings``' backend; stopped (and, for postgres,
    their databases dropped) on exit. Yields ``{"mlflow": uri, "prefect": api_url, "start_s": s}``."""
    t0 = time.monotonic()
    try:
        with without_server_env():
            urls = servers.ensure_servers(home, apply_env=False, settings=settings)
        yield {**urls, "start_s": round(time.monotonic() - t0, 1)}
    finally:
        servers.stop_servers(home)
        if settings.pg is not None:
            for role in ("mlflow", "prefect", "mlflow_auth"):
                drop_database(settings.pg, settings.database(role))


def pipeline_overrides(name: str, runs_dir: Path, seed: int, extra: Sequence[str] = ()) -> list[str]:
    return [*TINY, f"name={name}", f"output_dir={runs_dir}", f"sft_colar.seed={seed}",
            "tracking.registered_model_name=null", *extra]


def launch_at_once(work: Path, pipelines: dict[str, list[str]], env: dict, timeout_s: float) -> dict[str, dict]:
    """Start one ``colar run`` per entry at the same moment; wait for all (killing what runs past
    ``timeout_s``). Returns per pipeline ``{rc, wall_s, log}``."""
    procs, started = {}, {}
    for name, sets in pipelines.items():
        log = open(work / f"{name}.log", "w")
        started[name] = time.monotonic()
        procs[name] = (subprocess.Popen(colar_cmd("run", overrides=sets), env=env, cwd=ROOT, stdout=log,
                                        stderr=subprocess.STDOUT), log)
    deadline, results = time.monotonic() + timeout_s, {}
    while len(results) < len(procs):
        for name, (proc, log) in procs.items():
            if name in results:
                continue
            if proc.poll() is not None or time.monotonic() > deadline:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                log.close()
                results[name] = {"rc": proc.returncode, "wall_s": round(time.monotonic() - started[name], 1),
                                 "log": str(work / f"{name}.log")}
        time.sleep(0.2)
    return results


def contention(texts: dict[str, str]) -> dict[str, dict[str, int]]:
    """Per text: how many lines match each retry pattern and "database is locked"."""
    out = {}
    for name, text in texts.items():
        counts = {key: len(pattern.findall(text)) for key, pattern in RETRY_PATTERNS.items()}
        counts["database_locked"] = len(LOCKED.findall(text))
        out[name] = counts
    return out


def _flow_run(api_url: str, flow_run_id: str) -> dict:
    with urllib.request.urlopen(f"{api_url}/flow_runs/{flow_run_id}", timeout=10) as resp:  # noqa: S310 (loopback)
        return json.loads(resp.read())


def check_runs_apart(tracking_uri: str, api_url: str, seeds: dict[str, int], runs_dirs: dict[str, Path]) -> list[str]:
    """What is mixed up or missing between the pipelines (empty: nothing): one FINISHED parent per
    name with exactly the four stage runs, each FINISHED; the parent's evaluation metrics are its own
    evaluate stage's; its output folder, its CoLaR seed and checkpoints are its own; one COMPLETED
    Prefect flow run per parent, none shared."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name("colar")
    if exp is None:
        return ["no experiment 'colar'"]
    problems, flow_runs, parent_ids = [], {}, set()
    for name, seed in seeds.items():
        parents = client.search_runs([exp.experiment_id], filter_string=f"attributes.run_name = '{name}'")
        if len(parents) != 1:
            problems.append(f"{name}: {len(parents)} parent runs")
            continue
        parent = parents[0]
        parent_ids.add(parent.info.run_id)
        if parent.info.status != "FINISHED":
            problems.append(f"{name}: parent {parent.info.status}")
        if parent.data.params.get("output_dir") != str(runs_dirs[name]):
            problems.append(f"{name}: parent's output_dir {parent.data.params.get('output_dir')}")
        kids = client.search_runs([exp.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
        stages = sorted(k.data.tags.get("colar.stage", "?") for k in kids)
        if stages != sorted(STAGES):
            problems.append(f"{name}: stage runs {stages}")
        by_stage = {k.data.tags.get("colar.stage"): k for k in kids}
        problems += [f"{name}: {s} {k.info.status}" for s, k in by_stage.items() if k.info.status != "FINISHED"]
        colar = by_stage.get("sft-colar")
        if colar is not None:
            if colar.data.params.get("train.seed") != str(seed):
                problems.append(f"{name}: sft-colar seed {colar.data.params.get('train.seed')}")
            if not colar.data.tags.get("colar.checkpoint.latest", "").startswith(str(runs_dirs[name]) + "/"):
                problems.append(f"{name}: sft-colar checkpoint {colar.data.tags.get('colar.checkpoint.latest')}")
            if not client.get_metric_history(colar.info.run_id, "loss"):
                problems.append(f"{name}: sft-colar has no loss history")
        evaluate = by_stage.get("evaluate")
        if evaluate is not None:
            own = {k: v for k, v in evaluate.data.metrics.items() if k.startswith("accuracy/")}
            if not own or any(parent.data.metrics.get(k) != v for k, v in own.items()):
                problems.append(f"{name}: parent metrics are not its evaluate stage's")
        flow_run_id = parent.data.tags.get("prefect.flow_run_id", "")
        flow_runs[name] = flow_run_id
        state = _flow_run(api_url, flow_run_id).get("state_type") if flow_run_id else None
        if state != "COMPLETED":
            problems.append(f"{name}: Prefect flow run {flow_run_id or '(none)'} {state}")
    if len(set(flow_runs.values())) != len(flow_runs):
        problems.append(f"flow runs shared: {flow_runs}")
    return problems


def run_bench(backend: str, n: int, work: Path, db_url: Optional[str] = None, timeout_s: float = 900,
              extra: Sequence[str] = ()) -> dict:
    """Start servers on ``backend``, run ``n`` tiny pipelines at once, check them apart; the report."""
    work.mkdir(parents=True, exist_ok=True)
    prefix = f"colar_bench_{uuid.uuid4().hex[:10]}"
    settings = ServerSettings(backend=backend, db_url=db_url if backend == "postgres" else None, db_prefix=prefix)
    names = {f"conc-{backend}-{i}": 100 + i for i in range(n)}
    runs_dirs = {name: work / name / "runs" for name in names}
    with bench_servers(work / "home", settings) as urls:
        env = cli_env(MLFLOW_TRACKING_URI=urls["mlflow"], PREFECT_API_URL=urls["prefect"])
        t0 = time.monotonic()
        results = launch_at_once(
            work, {name: pipeline_overrides(name, runs_dirs[name], seed, extra) for name, seed in names.items()},
            env, timeout_s)
        total_s = round(time.monotonic() - t0, 1)
        problems = check_runs_apart(urls["mlflow"], urls["prefect"], names, runs_dirs)
        server_logs = {name: (work / "home" / f"{name}.log").read_text(errors="replace") for name in ("mlflow", "prefect")}
    texts = {name: Path(r["log"]).read_text(errors="replace") for name, r in results.items()}
    return {
        "bench": "concurrent_pipelines",
        "backend": backend,
        "database": settings.pg.url(prefix + "_*") if settings.pg else "sqlite files in the colar home",
        "pipelines": n,
        "server_start_s": urls["start_s"],
        "total_wall_s": total_s,
        "per_pipeline": {name: {k: r[k] for k in ("rc", "wall_s")} for name, r in results.items()},
        "contention": {**contention(texts), **{f"server:{k}": {"database_locked": len(LOCKED.findall(v))}
                                                for k, v in server_logs.items()}},
        "mlflow_http_5xx": len(MLFLOW_5XX.findall(server_logs["mlflow"])),
        "problems": problems,
        "logs": {name: r["log"] for name, r in results.items()},
        "ok": all(r["rc"] == 0 for r in results.values()) and not problems,
    }


def summary(report: dict) -> str:
    walls = ", ".join(f"{v['wall_s']:.0f}" for v in report["per_pipeline"].values())
    retries = sum(sum(c.get(k, 0) for k in RETRY_PATTERNS) for c in report["contention"].values())
    locked = sum(c["database_locked"] for c in report["contention"].values())
    return (f"{report['backend']}: {report['pipelines']} pipelines, exit codes "
            f"{[v['rc'] for v in report['per_pipeline'].values()]}, wall per pipeline {walls} s, total "
            f"{report['total_wall_s']:.0f} s (servers started in {report['server_start_s']:.0f} s); retries {retries}, "
            f"'database is locked' {locked}, MLflow 5xx {report['mlflow_http_5xx']}; "
            f"{'runs apart' if not report['problems'] else 'PROBLEMS: ' + '; '.join(report['problems'])}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", choices=["sqlite", "postgres"], default="sqlite")
    p.add_argument("--db-url", default=os.environ.get("COLAR_DB_URL", "postgresql://postgres@127.0.0.1:5432"),
                   help="PostgreSQL server for --backend postgres (default $COLAR_DB_URL or local postgres)")
    p.add_argument("-n", type=int, default=3, help="pipelines at once")
    p.add_argument("--work", help="work folder (default: a temporary one, removed unless --keep)")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--out", help="result file (default bench/results/concurrent_pipelines_<backend>.json)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra override for every pipeline")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="colar-conc-"))
    try:
        report = run_bench(args.backend, args.n, work, args.db_url, extra=args.set)
    finally:
        if not args.work and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    report.update(command=command_line("bench.concurrent_pipelines", argv), date=utc_now(), versions=versions(),
                  cpus=os.cpu_count(), torch_threads_per_pipeline=1)
    out = Path(args.out) if args.out else RESULTS_DIR / f"concurrent_pipelines_{args.backend}.json"
    print(summary(report))
    print(f"wrote {write_json(out, report)}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
