"""The kill-anywhere soak: SIGKILL a pipeline run at random moments, ``colar retry`` it, and check
that nothing was lost.

One uninterrupted ``colar run`` of a small pipeline (SFT CoT, SFT CoLaR and RL, checkpoints every
few steps, evaluation, report) in output folder A is the reference. The same config then runs in
folder B; at ``--kills`` random moments (``random.Random(seed)``, each drawn uniformly within the
expected remaining run time, estimated from the reference's progress timeline, or with several
kills left within this kill's share of it: :meth:`Timeline.kill_window_s`) the whole process
tree of the current ``colar run`` / ``colar retry`` is SIGKILLed and ``colar retry <parent run>``
is started once nothing of it is alive. After the last kill the retry runs to the end. Then:

* the evaluation metrics (the evaluate stage's ``metrics.json`` and the parent run's metrics, less the
  decoding wall times ``sec_per_question/*``, which no two runs share) and
  the weights of every stage's final model (sha256 of its safetensors files) equal the reference's,
  bit for bit (training on the CPU of one machine is deterministic, and resume is exact);
* no process of the soak is left (``/proc`` scanned for the soak's marker variable and for command
  lines or environments that mention its work folder, local servers excluded);
* under B's parent run each stage has exactly one FINISHED child run and every other child run is
  FAILED or KILLED (none left RUNNING).

The servers (MLflow on SQLite, Prefect) are started once for the soak in its work folder::

    python -m bench.chaos --kills 20 --seed 0            # -> bench/results/chaos.json
    python -m bench.chaos --kills 3 --seed 1 --size ci   # the short version tests/test_chaos.py runs
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from bench.common import RESULTS_DIR, ROOT, command_line, utc_now, versions, write_json
from bench.pipeline_run import TINY, cli_env, colar_cmd
from colar_core.evaluation import without_timings
from colar_core.files import content_digest
from colar_core.procs import ancestors, marked_processes, session_id
from colar_core.training.checkpoint import COMPLETE

#: Environment variable every process of the soak's runs inherits (value: a fresh id per soak).
MARKER = "COLAR_CHAOS_ID"
#: Run names of the reference and the killed pipeline (also the ``colar.pipeline`` tag).
REF_NAME, KILLED_NAME = "chaos-ref", "chaos-killed"
#: A ``colar retry`` that fails for a reason other than a kill this many times in a row ends the soak.
MAX_FAILURES_IN_A_ROW = 3
#: Kill times are drawn within this fraction of their window, so a run a little faster than the
#: reference is still hit.
KILL_WINDOW = 0.9

_COMMON = ["tracking.registered_model_name=colar-chaos", "training_retries=0",
           "rl.questions_per_step=2", "rl.group_size=2", "rl.compression_factor=2", "rl.lr=0.0001",
           "rl.generation.max_latents=6", "rl.generation.max_answer_tokens=4"]
#: Pipeline sizes (``--set`` overrides on top of bench/pipeline_run.py's TINY). ``default``: about
#: 1-2 minutes uninterrupted on a shared 2-core CPU box; ``ci``: the smallest that still writes SFT
#: and RL checkpoints (tests/test_chaos.py).
SIZES: dict[str, list[str]] = {
    "default": TINY + _COMMON + [
        "data.builtin.n_train=256", "data.builtin.n_val=16", "data.builtin.n_test=16", "eval.n_examples=16",
        "sft_cot.max_steps=500", "sft_cot.checkpoint_every=10",
        "sft_colar.max_steps=1000", "sft_colar.checkpoint_every=10",
        "rl.max_steps=300", "rl.checkpoint_every=5"],
    "ci": TINY + _COMMON + ["rl.max_steps=4", "rl.checkpoint_every=2"],
}

_STAGE_FOLDER = re.compile(r"^(?P<stage>.+)-[0-9a-f]{12}$")


# --------------------------------------------------------------------------------------------
# progress of a run, read from its output folder


def _stage_of(folder: Path) -> str:
    """The stage a folder (or a stage lock file) of an output dir belongs to (``sft-colar-0123456789ab``
    and ``.sft-colar-0123456789ab.lock`` -> ``sft-colar``)."""
    name = folder.name.removeprefix(".").removesuffix(".lock")
    m = _STAGE_FOLDER.match(name)
    return m.group("stage") if m else name


def milestones(root: Path) -> set[str]:
    """What a run has reached, by stage and not by folder (folder names differ between output
    dirs): ``<stage>:start``, ``<stage>:step_<n>`` (a complete checkpoint), ``<stage>:done``."""
    found: set[str] = set()
    if not root.is_dir():
        return found
    for folder in root.iterdir():
        if not folder.is_dir():
            continue
        stage = _stage_of(folder)
        found.add(f"{stage}:start")
        found.update(f"{stage}:{c.parent.name}" for c in folder.glob(f"checkpoints/step_*/{COMPLETE}"))
        if (folder / "stage_result.json").is_file() or (stage == "reports" and any(folder.glob("*/metrics.json"))):
            found.add(f"{stage}:done")
    return found


def newest_file(root: Path) -> Optional[tuple[float, Path]]:
    """``(mtime, path)`` of the most recently written file under ``root``, or None."""
    best: Optional[tuple[float, Path]] = None
    for path in root.rglob("*"):
        try:
            if path.is_file() and (best is None or path.stat().st_mtime > best[0]):
                best = (path.stat().st_mtime, path)
        except OSError:  # removed meanwhile (checkpoint rotation)
            continue
    return best


@dataclass
class Timeline:
    """When the reference run reached each milestone (seconds since it started) and its wall time."""

    wall_s: float
    reached: dict[str, float] = field(default_factory=dict)

    def startup_s(self) -> float:
        """Seconds before the reference wrote anything: the start-up every attempt pays again."""
        return min(self.reached.values(), default=0.0)

    def remaining_s(self, root: Path) -> float:
        """Expected seconds for an attempt started now on ``root`` to finish: start-up plus what the
        reference still did after the furthest milestone ``root`` has reached."""
        done = [self.reached[m] for m in milestones(root) if m in self.reached]
        if not done:
            return self.wall_s
        return self.startup_s() + max(self.wall_s - max(done), 0.0)

    def kill_window_s(self, remaining_s: float, kills_left: int) -> float:
        """Where the next kill is drawn (uniformly): start-up plus this kill's share of the work left,
        ``2 / (kills_left + 1)`` of it, so the expected kills spread over the run instead of piling
        up at its end; the last kill is drawn within the whole expected remaining time."""
        startup = min(self.startup_s(), remaining_s)
        return startup + (remaining_s - startup) * min(1.0, 2.0 / (kills_left + 1))


# --------------------------------------------------------------------------------------------
# processes


def _mentions(pid: int, needle: bytes) -> bool:
    for name in ("cmdline", "environ"):
        try:
            if needle in Path(f"/proc/{pid}/{name}").read_bytes():
                return True
        except OSError:
            pass
    return False


def soak_processes(marker: str, work_dir: Path, server_sessions: set[int]) -> list[int]:
    """Live processes of the soak's runs: those carrying the marker, and any other whose command line
    or environment mentions the work folder, except the local servers' sessions, this process and its
    ancestors (their command lines may name the work folder: ``timeout``, pytest)."""
    found, skip = set(marked_processes(MARKER, marker)), ancestors()
    needle = str(work_dir).encode()
    for proc in Path("/proc").glob("[0-9]*"):
        pid = int(proc.name)
        if pid in skip or pid in found:
            continue
        sid = session_id(pid)
        if sid is not None and sid not in server_sessions and _mentions(pid, needle):
            found.add(pid)
    return sorted(found)


def describe(pids: Sequence[int]) -> list[str]:
    """``"<pid> (session <sid>): <command line>"`` of each pid still there."""
    out = []
    for pid in pids:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        out.append(f"{pid} (session {session_id(pid)}): {cmd[:300]}")
    return out


def kill_tree(proc: subprocess.Popen, marker: str) -> None:
    """SIGKILL the session of ``proc`` (started with ``start_new_session``) and every process that
    carries the soak's marker (launcher workers sit in sessions of their own); reap ``proc``."""
    pids = marked_processes(MARKER, marker)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    proc.wait()


def wait_until_gone(find, timeout_s: float = 60.0) -> list[int]:
    """Poll ``find()`` until it lists nothing or ``timeout_s`` passes; return what is left."""
    deadline = time.monotonic() + timeout_s
    while (left := find()) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


# --------------------------------------------------------------------------------------------
# one soak


@dataclass
class Soak:
    """The soak's work folder, servers, environment and MLflow client."""

    work_dir: Path
    overrides: list[str]
    marker: str = field(default_factory=lambda: uuid.uuid4().hex)

    def __post_init__(self) -> None:
        from mlflow import MlflowClient

        from colar_infra.servers import ensure_mlflow, ensure_prefect

        state = self.work_dir / "servers"
        home = self.work_dir / "home"
        saved = {k: os.environ.pop(k, None) for k in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL")}
        try:  # ensure_* would defer to these
            self.mlflow_uri, self.prefect_url = ensure_mlflow(state), ensure_prefect(state)
        finally:
            os.environ.update({k: v for k, v in saved.items() if v is not None})
        self.server_sessions = {rec["pid"] for rec in json.loads((state / "servers.json").read_text()).values()}
        self.env = cli_env(MLFLOW_TRACKING_URI=self.mlflow_uri, PREFECT_API_URL=self.prefect_url,
                           COLAR_HOME=str(home), PREFECT_HOME=str(home / "prefect"), DO_NOT_TRACK="1",
                           MLFLOW_DISABLE_TELEMETRY="true", PREFECT_SERVER_ANALYTICS_ENABLED="false",
                           HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                           **{MARKER: self.marker})
        self.client = MlflowClient(self.mlflow_uri)
        self.logs = self.work_dir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)

    def close(self) -> None:
        from colar_infra.servers import stop_servers

        stop_servers(self.work_dir / "servers")

    def start(self, args: list[str], log_name: str) -> subprocess.Popen:
        """``colar <args>`` in a session of its own, output to ``logs/<log_name>.log``."""
        with open(self.logs / f"{log_name}.log", "w") as log:
            return subprocess.Popen(args, env=self.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)

    def run_cmd(self, name: str, out: Path) -> list[str]:
        return colar_cmd("run", overrides=self.overrides + [f"name={name}", f"output_dir={out}"])

    def orphans(self) -> list[int]:
        return soak_processes(self.marker, self.work_dir, self.server_sessions)

    def parent_run(self, name: str):
        """The pipeline's MLflow parent run (tag ``colar.pipeline`` = ``name``, no parent), or None."""
        exp = self.client.get_experiment_by_name("colar")
        if exp is None:
            return None
        runs = [r for r in self.client.search_runs([exp.experiment_id], f"tags.`colar.pipeline` = '{name}'")
                if "mlflow.parentRunId" not in r.data.tags]
        return runs[0] if runs else None

    def children(self, parent_id: str) -> list:
        exp = self.client.get_run(parent_id).info.experiment_id
        return self.client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent_id}'")

    def log_tail(self, log_name: str, chars: int = 1500) -> str:
        return (self.logs / f"{log_name}.log").read_text(errors="replace")[-chars:]


def run_reference(soak: Soak, out: Path) -> tuple[Timeline, int]:
    """The uninterrupted run in ``out``, its progress timeline polled from its folder, and its exit code."""
    t0 = time.monotonic()
    proc = soak.start(soak.run_cmd(REF_NAME, out), "reference")
    reached: dict[str, float] = {}
    while proc.poll() is None:
        now = time.monotonic() - t0
        for m in milestones(out) - reached.keys():
            reached[m] = now
        time.sleep(0.2)
    wall = time.monotonic() - t0
    for m in milestones(out) - reached.keys():
        reached[m] = wall
    return Timeline(wall, dict(sorted(reached.items(), key=lambda kv: kv[1]))), proc.returncode


def landing(root: Path, since: float, timeline: Timeline) -> dict:
    """Where a kill landed: the stage whose folder (or lock) was written last, or ``startup`` when this
    attempt had written nothing yet; the newest file; checkpoints it left half-written
    (``.tmp-step_*``); the furthest milestone reached so far (in the reference's order)."""
    newest = newest_file(root)
    reached = [m for m in milestones(root) if m in timeline.reached]
    partial = sorted(str(p.relative_to(root)) for p in root.glob("*/checkpoints/.tmp-*")
                     if p.stat().st_mtime >= since)  # not one a previous attempt left behind
    if newest is None or newest[0] < since:
        where = "startup"
    else:
        where = _stage_of(root / newest[1].relative_to(root).parts[0])
    return {"stage": where, "newest_file": str(newest[1].relative_to(root)) if newest else None,
            "checkpoint_being_written": partial,
            "furthest_milestone": max(reached, key=timeline.reached.__getitem__, default=None)}


def run_with_kills(soak: Soak, out: Path, timeline: Timeline, kills: int, rng: random.Random) -> dict:
    """Run the pipeline in ``out``, SIGKILLing it ``kills`` times and retrying it; see the module doc."""
    t0 = time.monotonic()
    attempts: list[dict] = []
    kills_done = failures_in_a_row = 0
    parent_id: Optional[str] = None
    while True:
        n = len(attempts)
        parent = soak.parent_run(KILLED_NAME)
        parent_id = parent.info.run_id if parent else None
        args = colar_cmd("retry", parent_id) if parent_id else soak.run_cmd(KILLED_NAME, out)
        remaining = timeline.remaining_s(out)
        kill_at = rng.uniform(0, KILL_WINDOW * timeline.kill_window_s(remaining, kills - kills_done)) \
            if kills_done < kills else None
        started = time.time()
        a_start = time.monotonic()
        proc = soak.start(args, f"attempt-{n:02d}")
        record: dict = {"attempt": n, "command": args[3], "parent_run_id": parent_id,
                        "expected_remaining_s": round(remaining, 2),
                        "kill_at_s": None if kill_at is None else round(kill_at, 2)}
        while proc.poll() is None and (kill_at is None or time.monotonic() - a_start < kill_at):
            time.sleep(0.05)
        if proc.poll() is None:
            kill_tree(proc, soak.marker)
            kills_done, failures_in_a_row = kills_done + 1, 0
            record.update(outcome="killed", wall_s=round(time.monotonic() - a_start, 2),
                          landed=landing(out, started, timeline))
            record["left_alive_after_kill"] = describe(wait_until_gone(soak.orphans))
            attempts.append(record)
            continue
        record.update(wall_s=round(time.monotonic() - a_start, 2), rc=proc.returncode)
        attempts.append(record)
        if proc.returncode == 0:
            record.update(outcome="completed", finished_before_its_kill=kill_at is not None)
            break
        record.update(outcome="failed", log_tail=soak.log_tail(f"attempt-{n:02d}"))
        failures_in_a_row += 1
        if failures_in_a_row >= MAX_FAILURES_IN_A_ROW:
            break
    return {"wall_s": round(time.monotonic() - t0, 2), "attempts": attempts, "kills": kills_done,
            "parent_run_id": parent_id or (p.info.run_id if (p := soak.parent_run(KILLED_NAME)) else None)}


# --------------------------------------------------------------------------------------------
# comparison with the reference


def model_digests(root: Path) -> dict[str, dict[str, str]]:
    """sha256 of every safetensors file of every stage's final model: ``{stage: {file: digest}}``."""
    return {_stage_of(folder): {str(p.relative_to(folder / "model")): content_digest(p)
                                for p in sorted((folder / "model").rglob("*.safetensors"))}
            for folder in sorted(root.glob("*-*")) if (folder / "model").is_dir()}


def eval_metrics(root: Path) -> Optional[dict]:
    """The evaluate stage's ``metrics.json``, or None when there is none."""
    found = sorted(root.glob("evaluate-*/metrics.json"))
    return without_timings(json.loads(found[0].read_text())) if found else None


def compare(soak: Soak, ref_dir: Path, out: Path, ref_parent: Optional[str], parent_id: Optional[str]) -> dict:
    """Metrics, weights and MLflow child runs of the killed run against the reference."""
    mismatches: list[str] = []
    ref_m, got_m = eval_metrics(ref_dir), eval_metrics(out)
    if ref_m is None or got_m is None or ref_m != got_m:
        mismatches.append(f"evaluate metrics.json: reference {ref_m} vs killed {got_m}")

    def parent_metrics(run_id: Optional[str]) -> dict:
        if run_id is None:
            return {}
        return without_timings({k: v for k, v in soak.client.get_run(run_id).data.metrics.items()
                                if not k.startswith("time/")})

    ref_pm, got_pm = parent_metrics(ref_parent), parent_metrics(parent_id)
    if not ref_pm or ref_pm != got_pm:
        diff = sorted(k for k in ref_pm.keys() | got_pm.keys() if ref_pm.get(k) != got_pm.get(k))
        mismatches.append(f"parent run metrics differ: {diff or 'none logged'}")
    ref_w, got_w = model_digests(ref_dir), model_digests(out)
    for stage in sorted(ref_w.keys() | got_w.keys()):
        if ref_w.get(stage) != got_w.get(stage) or not ref_w.get(stage):
            mismatches.append(f"{stage}/model weights: reference {ref_w.get(stage)} vs killed {got_w.get(stage)}")

    problems: list[str] = []
    children: dict[str, list[str]] = {}
    if parent_id is None:
        problems.append("no parent run")
    else:
        status = soak.client.get_run(parent_id).info.status
        if status != "FINISHED":
            problems.append(f"parent run {parent_id} is {status}")
        for run in soak.children(parent_id):
            children.setdefault(run.data.tags.get("colar.stage", "?"), []).append(run.info.status)
        for stage, statuses in sorted(children.items()):
            if statuses.count("FINISHED") != 1:
                problems.append(f"{stage}: {statuses.count('FINISHED')} FINISHED child runs")
            if bad := [s for s in statuses if s not in ("FINISHED", "FAILED", "KILLED")]:
                problems.append(f"{stage}: child runs left {bad}")
    return {"mismatches": mismatches, "mlflow_problems": problems,
            "child_runs": {k: sorted(v) for k, v in sorted(children.items())},
            "metrics": got_m, "weights": {stage: d for stage, d in got_w.items()},
            "final_model": "rl" if "rl" in got_w else "sft-colar"}


# --------------------------------------------------------------------------------------------
# the command


def soak(kills: int, seed: int, size: str = "default", work_dir: Optional[Path] = None, keep: bool = False,
         argv: Optional[Sequence[str]] = None) -> dict:
    """Run the whole soak and return its report (see the module doc)."""
    rng = random.Random(seed)
    work = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="colar-chaos-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    s = Soak(work, SIZES[size])
    try:
        timeline, ref_rc = run_reference(s, work / "A")
        if ref_rc != 0:
            raise RuntimeError(f"the reference run failed (exit {ref_rc}):\n{s.log_tail('reference')}")
        ref_parent = s.parent_run(REF_NAME)
        killed = run_with_kills(s, work / "B", timeline, kills, rng)
        result = compare(s, work / "A", work / "B", ref_parent and ref_parent.info.run_id, killed["parent_run_id"])
        orphans = describe(wait_until_gone(s.orphans, timeout_s=10))
    finally:
        s.close()
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    attempts = killed["attempts"]
    failures = [a for a in attempts if a["outcome"] == "failed"]
    completed = bool(attempts) and attempts[-1]["outcome"] == "completed"
    left_after_kills = [a["left_alive_after_kill"] for a in attempts if a.get("left_alive_after_kill")]
    clean = completed and not result["mismatches"] and not result["mlflow_problems"] and not orphans \
        and not left_after_kills
    survived = killed["kills"] - len(failures) if clean else 0
    return {
        "command": command_line("bench.chaos", argv), "when": utc_now(), "seed": seed, "size": size,
        "overrides": SIZES[size], "kills_requested": kills, "kills_attempted": killed["kills"],
        "kills_survived": survived, "ok": clean and survived == killed["kills"] == kills,
        "identical": not result["mismatches"],
        "determinism": "CPU training on one machine is deterministic (seeded data order, sampling and init; "
                       "checkpoints hold model, optimizer, RNG and data position), so metrics and weights are "
                       "compared bit for bit",
        "reference_wall_s": round(timeline.wall_s, 2), "soak_wall_s": killed["wall_s"],
        "extra_wall_per_kill_s": round((killed["wall_s"] - timeline.wall_s) / killed["kills"], 2)
        if killed["kills"] else None,
        "kills": [{"attempt": a["attempt"], "command": a["command"], "at_s": a["wall_s"], **a["landed"]}
                  for a in attempts if a["outcome"] == "killed"],
        "failures": [{"attempt": a["attempt"], "rc": a["rc"], "log_tail": a["log_tail"]} for a in failures],
        "completed": completed, "mismatches": result["mismatches"], "mlflow_problems": result["mlflow_problems"],
        "orphans": orphans, "left_alive_after_kill": left_after_kills, "child_runs": result["child_runs"],
        "final_model": result["final_model"], "metrics": result["metrics"], "weights": result["weights"],
        "reference_timeline": {k: round(v, 2) for k, v in timeline.reached.items()},
        "attempts": attempts, "total_wall_s": round(time.monotonic() - t0, 2),
        "work_dir": str(work) if keep else None, "versions": versions(),
    }


def summary(report: dict) -> str:
    """A few lines for the console."""
    where = ", ".join(f"{k['stage']}" + (" (checkpoint write)" if k["checkpoint_being_written"] else "")
                      for k in report["kills"])
    return "\n".join([
        f"[chaos] kills survived {report['kills_survived']}/{report['kills_attempted']} "
        f"(requested {report['kills_requested']}, seed {report['seed']}, size {report['size']}): "
        f"{'OK' if report['ok'] else 'NOT OK'}",
        f"[chaos] kills landed in: {where or '-'}",
        f"[chaos] reference {report['reference_wall_s']} s, soak {report['soak_wall_s']} s, "
        f"extra wall per kill {report['extra_wall_per_kill_s']} s",
        f"[chaos] metrics and weights {'identical' if report['identical'] else 'DIFFER'}; "
        f"mismatches {len(report['mismatches'])}, failures {len(report['failures'])}, "
        f"orphans {len(report['orphans'])}, MLflow problems {len(report['mlflow_problems'])}",
        *[f"[chaos]   {line}" for line in report["mismatches"] + report["mlflow_problems"]],
    ])


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m bench.chaos --kills N --seed S [--size default|ci] [--out FILE]``; exit 0 when every kill
    was survived with identical results and nothing left behind, 1 otherwise."""
    parser = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=3, help="SIGKILLs to land (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill times (default 0)")
    parser.add_argument("--size", choices=sorted(SIZES), default="default",
                        help="pipeline size: default (~1-2 min uninterrupted on a 2-core CPU) or ci (smallest)")
    parser.add_argument("--out", help=f"report JSON (default {RESULTS_DIR / 'chaos.json'})")
    parser.add_argument("--work-dir", help="work folder (default: a new temporary folder, removed afterwards)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the work folder (output folders, logs, servers' state)")
    args = parser.parse_args(argv)
    if args.kills < 0:
        parser.error("--kills must be >= 0")
    work_dir = Path(args.work_dir) if args.work_dir else None
    report = soak(args.kills, args.seed, args.size, work_dir, args.keep, argv)
    out = write_json(Path(args.out) if args.out else RESULTS_DIR / "chaos.json", report)
    print(summary(report), f"\n[chaos] wrote {out}", sep="", flush=True)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
