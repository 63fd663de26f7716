"""Starting a stage on many processes: the ``deepspeed`` launcher or ``torchrun``.

A stage's ``run_*_stage`` (:func:`colar_core.training.sft.run_sft_stage`,
:func:`colar_core.rl.trainer.run_rl_stage`) decides through :func:`run_job` with
``LauncherConfig.multi_process``: one process trains in-process (e.g.
:func:`colar_core.training.sft.run_sft_job`); more are started as a subprocess running
``python -m colar_core.training.sft_main --config job.json`` (RL: ``colar_core.rl.rl_main``) under
a launcher::

    deepspeed [--hostfile H] [--num_nodes N] --num_gpus G [--master_addr A] [--master_port P] \\
        --module colar_core.training.sft_main --config job.json
    python -m torch.distributed.run --nnodes N --node_rank K --nproc_per_node G \\
        --master_addr A --master_port P -m colar_core.training.sft_main --config job.json

Both work on CPU too (gloo): measured with DeepSpeed 0.19.8, ``deepspeed --num_gpus 2`` starts two
CPU processes (it only sets ``CUDA_VISIBLE_DEVICES``), and ``torchrun --nproc_per_node 2`` does
the same. ``auto`` picks the deepspeed launcher when it is installed, else torchrun. Multi-node:
the deepspeed launcher starts every node from a hostfile over ssh/pdsh; torchrun needs one command
per node (same ``master_addr``/``master_port``, its own ``node_rank``).

Every node must see the stage folder at the same path (shared storage, such as NFS): each rank reads
the job file there and writes its checkpoint shards there. Before a multi-node deepspeed launch,
:func:`check_nodes_see` asks each host of the hostfile over ssh (as the launcher reaches them) whether
it sees the folder, and a host that does not stops the stage with :class:`FolderNotSharedError` naming
the folder and the host (otherwise that host's rank would fail and the others wait for it to join).
A rank whose host cannot read its job file (torchrun, one command per node) ends at once naming both.

The launcher runs in its own process group (session), and it and every process it starts carry
``COLAR_LAUNCH_ID=<id>`` in their environment (torchrun puts each worker in a session of its own, so
the group alone would miss them). Any exception in the caller (Ctrl-C, a cancelled task, a failed
callback) stops all of them: SIGTERM, then SIGKILL after a grace period, so no worker outlives its
run. While they run, ``launcher.json`` in the stage's output folder records the launch (pid, pgid,
launch id, host, start time, the caller); :func:`live_launcher` reads it, so processes whose caller
was SIGKILLed (and which therefore live on) are found, and nothing starts a second trainer on the
same checkpoints while they live.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, Optional, Protocol, Sequence, Union

from colar_core.files import atomic_write_json, atomic_write_text
from colar_core.net import free_port
from colar_core.procs import identity_alive, marked_processes, process_identity, stop_processes
from colar_core.training.callbacks import PROGRESS_ENV
from colar_core.training.config import LauncherConfig

ENTRY_MODULE = "colar_core.training.sft_main"
LAUNCHER_RECORD = "launcher.json"
LAUNCH_ID_ENV = "COLAR_LAUNCH_ID"  # inherited by every process of a launch: how they are found
MLFLOW_ENV_PREFIX = "MLFLOW_"  # variables a launched job does not get (see launch)
STOP_GRACE_S = 10.0  # SIGTERM -> SIGKILL grace when a launch is stopped


class LaunchError(RuntimeError):
    """The launched job exited non-zero; ``returncode`` and the tail of its output are attached."""

    def __init__(self, cmd: Sequence[str], returncode: int, tail: str):
        self.cmd, self.returncode, self.tail = list(cmd), returncode, tail
        short = "\n".join(tail.splitlines()[-40:])
        super().__init__(f"{' '.join(cmd)} exited with {returncode}\n--- last output ---\n{short}")


class FolderNotSharedError(RuntimeError):
    """A node of a multi-node launch cannot see the stage folder (it is not on storage every node sees)."""


#: Seconds one host has to answer the folder check over ssh.
SSH_CHECK_TIMEOUT_S = 30.0
_SHARED_HINT = "every node must see the stage folders at the same path (shared storage such as NFS)"


def hostfile_hosts(hostfile: Union[str, Path]) -> list[str]:
    """The hosts of a DeepSpeed hostfile, in order: the first word of each ``HOST slots=N`` line (blank
    lines and ``#`` comments skipped)."""
    hosts = []
    for line in Path(hostfile).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            hosts.append(line.split()[0])
    return hosts


def check_nodes_see(folder: Union[str, Path], launcher: LauncherConfig,
                    timeout_s: float = SSH_CHECK_TIMEOUT_S) -> None:
    """Each of the first ``launcher.num_nodes`` hosts of ``launcher.hostfile`` sees ``folder`` at the same
    path, asked over ssh (``ssh HOST test -d FOLDER``, as the deepspeed launcher's pdsh reaches them);
    else :class:`FolderNotSharedError` naming the folder and every host that does not (or that ssh
    cannot reach). Nothing to check without a hostfile."""
    if launcher.hostfile is None:
        return
    problems = []
    for host in hostfile_hosts(launcher.hostfile)[:launcher.num_nodes]:
        cmd = ["ssh", "-o", "BatchMode=yes", *ssh_keepalive_options(launcher), host,
               f"hostname; test -d {shlex.quote(str(folder))}"]
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL)
        except FileNotFoundError:
            raise RuntimeError("the deepspeed launcher starts the nodes of a hostfile over ssh, and ssh is not "
                               "installed here") from None
        except subprocess.TimeoutExpired:
            problems.append(f"host {host} did not answer over ssh within {timeout_s:.0f} s")
            continue
        if out.returncode == 0:
            continue
        name = (out.stdout.strip().splitlines() or [host])[0]
        if out.returncode == 255:  # ssh's own failure
            last = (out.stderr.strip().splitlines() or ["no message"])[-1]
            problems.append(f"host {host} cannot be reached over ssh ({last})")
        else:
            problems.append(f"host {host}{f' ({name})' if name != host else ''} cannot see it")
    if problems:
        raise FolderNotSharedError(f"stage folder {folder}: {'; '.join(problems)}; {_SHARED_HINT} "
                                   f"(hostfile {launcher.hostfile})")


class LauncherAliveError(RuntimeError):
    """A launcher process group recorded in a stage folder is still alive: starting another trainer
    there would write the same checkpoints twice."""


def launch_processes(launch_id: str) -> list[int]:
    """The live processes of the launch ``launch_id`` on this host (the launcher and its workers)."""
    return marked_processes(LAUNCH_ID_ENV, launch_id)


def live_launcher(folder: Union[str, Path]) -> Optional[dict]:
    """The launcher record in ``folder`` if a process of that launch still lives on this host (the
    recorded launcher itself, pid reuse excluded, or any process carrying its launch id), else None."""
    try:
        rec = json.loads((Path(folder) / LAUNCHER_RECORD).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(rec, dict) or not isinstance(rec.get("launch_id"), str):
        return None
    if identity_alive(str(rec.get("identity", ""))):
        return rec
    if rec.get("host") == process_identity().split(":")[0] and launch_processes(rec["launch_id"]):
        return rec
    return None


def describe_launcher(rec: dict) -> str:
    """One line naming a launcher record: pid, group, host, start time."""
    return (f"launcher pid {rec.get('pid')} (process group {rec.get('pgid')}) on {rec.get('host')}, "
            f"started {rec.get('started_at')}")


def check_no_live_launcher(folder: Union[str, Path]) -> None:
    """Raise :class:`LauncherAliveError` naming the pid if ``folder`` has a live launcher record."""
    if (rec := live_launcher(folder)) is not None:
        raise LauncherAliveError(f"{folder} is still being trained by {describe_launcher(rec)}; stop its "
                                 f"processes first (those with {LAUNCH_ID_ENV}={rec['launch_id']} in "
                                 "/proc/PID/environ) or wait for them")


_ACTIVE: dict[str, subprocess.Popen] = {}  # launch id -> launcher, for the launches running in this process


def _stop_launch(launch_id: str, proc: subprocess.Popen, grace_s: float) -> bool:
    """Stop every process of a launch (SIGTERM, SIGKILL after ``grace_s``); True once none is left."""
    return stop_processes(lambda: launch_processes(launch_id), grace_s, proc.poll)


def _stop_active_launches() -> None:
    """Stop every launch still running when the interpreter shuts down (e.g. the main thread was
    cancelled while a worker thread waits in :func:`launch`)."""
    for launch_id, proc in list(_ACTIVE.items()):
        _stop_launch(launch_id, proc, STOP_GRACE_S)


if hasattr(threading, "_register_atexit"):  # runs before non-daemon threads are joined
    threading._register_atexit(_stop_active_launches)


class _SigtermAsInterrupt:
    """In the main thread, turn SIGTERM (default action: die at once, leaving the group alive) into
    ``KeyboardInterrupt`` for the duration of a launch, so the group is stopped first."""

    def __enter__(self):
        self.previous = None
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            self.previous = signal.signal(signal.SIGTERM, self._raise)
        return self

    @staticmethod
    def _raise(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
        return False


def resolve_launcher(launcher: LauncherConfig) -> str:
    """'deepspeed' or 'torchrun' for ``launcher.launcher == 'auto'``."""
    if launcher.launcher != "auto":
        return launcher.launcher
    if launcher.hostfile is not None:
        return "deepspeed"
    return "deepspeed" if _deepspeed_launcher() is not None else "torchrun"


def _deepspeed_launcher() -> Optional[list[str]]:
    exe = shutil.which("deepspeed")
    if exe:
        return [exe]
    try:
        import deepspeed.launcher.runner  # noqa: F401  (heavy: only to learn whether it is installed)
    except ImportError:
        return None
    return [sys.executable, "-m", "deepspeed.launcher.runner"]


def build_launch_command(config_path: Union[str, Path], launcher: LauncherConfig,
                         module: str = ENTRY_MODULE, python: Optional[str] = None,
                         extra_args: Sequence[str] = ()) -> list[str]:
    """The command line that runs ``python -m <module> --config <config_path>`` on
    ``launcher.world_size`` processes."""
    kind = resolve_launcher(launcher)
    python = python or sys.executable
    script = ["--config", str(config_path), *extra_args]
    if kind == "deepspeed":
        base = _deepspeed_launcher()
        if base is None:
            raise RuntimeError("the deepspeed launcher is not installed; use launcher 'torchrun'")
        cmd = list(base)
        if launcher.hostfile is not None:
            cmd += ["--hostfile", str(launcher.hostfile), "--num_nodes", str(launcher.num_nodes)]
        cmd += ["--num_gpus", str(launcher.num_gpus)]
        if launcher.master_addr:
            cmd += ["--master_addr", launcher.master_addr]
        if launcher.master_port or launcher.num_nodes == 1:
            cmd += ["--master_port", str(launcher.master_port or free_port())]
        return cmd + ["--module", module, *script]
    if kind == "torchrun":
        cmd = [python, "-m", "torch.distributed.run", "--nnodes", str(launcher.num_nodes),
               "--nproc_per_node", str(launcher.num_gpus)]
        if launcher.num_nodes > 1:
            cmd += ["--node_rank", str(launcher.node_rank)]
        if launcher.num_nodes > 1 and not (launcher.master_addr and launcher.master_port):
            raise ValueError("torchrun on several nodes needs launcher.master_addr and master_port")
        cmd += ["--master_addr", launcher.master_addr or "127.0.0.1",
                "--master_port", str(launcher.master_port or free_port()),
                # the static rendezvous waits this long for the other nodes (torchrun's default: 600 s)
                "--rdzv-conf", f"timeout={math.ceil(launcher.collective_timeout_s)}"]
        return cmd + ["-m", module, *script]
    raise ValueError(f"unknown launcher {kind!r}")


def ssh_keepalive_options(launcher: LauncherConfig) -> list[str]:
    """The ssh options a multi-node launch adds to every session it opens (pdsh's ``PDSH_SSH_ARGS_APPEND``):
    a keep-alive every sixth of ``collective_timeout_s`` (at least 1 s), three unanswered ending the
    session, and a connect timeout of the same size. Without them a session to a node whose link went
    down waits for TCP to give up (many minutes), and so does the launcher, after the ranks have failed."""
    interval = max(1, math.ceil(launcher.collective_timeout_s / 6))
    return ["-o", f"ServerAliveInterval={interval}", "-o", "ServerAliveCountMax=3",
            "-o", f"ConnectTimeout={min(30, 3 * interval)}"]


def launch(config_path: Union[str, Path], launcher: LauncherConfig, *, module: str = ENTRY_MODULE,
           env: Optional[dict] = None, cwd: Optional[Union[str, Path]] = None,
           on_line: Optional[Callable[[str], None]] = None, tail_lines: int = 200,
           record_dir: Optional[Union[str, Path]] = None, grace_s: float = STOP_GRACE_S) -> int:
    """Run the launcher as a subprocess in its own process group, streaming its output line by line
    (to ``on_line``, default stdout); raise :class:`LaunchError` if it exits non-zero. Returns 0.

    Any exception in this process while it runs (``KeyboardInterrupt``, an error in ``on_line``, a
    cancellation; SIGTERM in the main thread) stops the launcher and all its workers (SIGTERM,
    SIGKILL after ``grace_s``) before it propagates; so does its end (no straggler is left). With
    ``record_dir`` the group is recorded in ``record_dir/launcher.json`` while it lives
    (:func:`live_launcher`); a live record already there raises :class:`LauncherAliveError`. With
    ``on_line`` the job prints its progress lines although its output is a pipe (``COLAR_PROGRESS=1``
    unless set)."""
    cmd = build_launch_command(config_path, launcher, module)
    run_env = dict(os.environ if env is None else env)
    # the job's processes must import this checkout of colar_core
    root = str(Path(__file__).resolve().parents[2])
    run_env["PYTHONPATH"] = os.pathsep.join(p for p in (root, run_env.get("PYTHONPATH", "")) if p)
    run_env.setdefault("PYTHONUNBUFFERED", "1")
    if on_line is not None:  # the caller keeps the lines (e.g. in a Prefect log): print progress into them
        run_env.setdefault(PROGRESS_ENV, "1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        run_env.pop(var, None)  # set by the launcher, not inherited from an in-process run
    # A launched job never talks to MLflow (colar_core does not import it; its metrics go to metrics.jsonl),
    # and DeepSpeed's multi-node launcher writes every MLFLOW_* variable onto the pdsh command line
    # (`ps`, its own log): MLFLOW_TRACKING_PASSWORD would be shown there. None is passed on.
    for var in [k for k in run_env if k.startswith(MLFLOW_ENV_PREFIX)]:
        del run_env[var]
    if record_dir is not None:
        check_no_live_launcher(record_dir)
    if launcher.num_nodes > 1 and resolve_launcher(launcher) == "deepspeed":
        alive = " ".join(ssh_keepalive_options(launcher))
        run_env["PDSH_SSH_ARGS_APPEND"] = f"{run_env.get('PDSH_SSH_ARGS_APPEND', '')} {alive}".strip()
        check_nodes_see(record_dir if record_dir is not None else Path(config_path).resolve().parent, launcher)
    launch_id = run_env[LAUNCH_ID_ENV] = uuid.uuid4().hex
    emit = on_line or (lambda line: print(line, flush=True))
    tail: list[str] = []
    with _SigtermAsInterrupt():
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                env=run_env, cwd=str(cwd) if cwd else None, start_new_session=True)
        _ACTIVE[launch_id] = proc
        record = None
        try:
            record = _write_record(record_dir, proc, launch_id, cmd) if record_dir is not None else None
            assert proc.stdout is not None
            for line in proc.stdout:
                line = line.rstrip("\n")
                emit(line)
                tail.append(line)
                if len(tail) > tail_lines:
                    del tail[0]
            rc = proc.wait()
        finally:  # normal exit too: no straggler may outlive the launcher
            gone = _stop_launch(launch_id, proc, grace_s)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=1.0)
            _ACTIVE.pop(launch_id, None)
            if record is not None and gone:
                record.unlink(missing_ok=True)
    if rc != 0:
        raise LaunchError(cmd, rc, "\n".join(tail))
    return 0


def _write_record(folder: Union[str, Path], proc: subprocess.Popen, launch_id: str, cmd: Sequence[str]) -> Path:
    """Write ``folder/launcher.json`` for the launcher ``proc`` (leader of its own group) of ``launch_id``."""
    path = Path(folder) / LAUNCHER_RECORD
    identity = process_identity(proc.pid)
    rec = {"pid": proc.pid, "pgid": proc.pid, "launch_id": launch_id, "host": identity.split(":")[0],
           "identity": identity,
           "started_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "caller": process_identity(), "cmd": list(cmd)}
    atomic_write_json(path, rec)
    return path


def run_job(job, launcher: LauncherConfig, run_in_process: Callable, result_cls, *, module: str = ENTRY_MODULE,
            config_path: Optional[Union[str, Path]] = None, callbacks: Sequence = (),
            on_line: Optional[Callable[[str], None]] = None):
    """Run a stage's job (anything with ``output_dir`` and ``model_dump_json``): ``run_in_process(job,
    callbacks)`` when ``launcher`` asks for one process, else through :func:`launch` of ``module``
    (the job is written to ``config_path``, default ``output_dir/job.json``; the launcher is recorded
    in ``output_dir/launcher.json`` while it runs) and ``result_cls.load`` of the output directory.
    ``callbacks`` only run in-process; a launched job's metrics are in ``metrics.jsonl``."""
    if not launcher.multi_process:
        return run_in_process(job, callbacks)
    out = Path(job.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = Path(config_path) if config_path else out / "job.json"
    atomic_write_text(path, job.model_dump_json(indent=2))
    launch(path, launcher, module=module, on_line=on_line, record_dir=out)
    return result_cls.load(out)


class JobResult(Protocol):
    """What an entry point prints of a finished job (e.g. :class:`~colar_core.training.sft.SFTResult`)."""

    def to_dict(self) -> dict: ...


def job_entry_main(argv, *, prog: str, description: str, job_name: str, run_file: Callable[[str], JobResult]) -> int:
    """The body of a launcher entry point (``sft_main``, ``rl_main``): parse ``--config`` (and the
    ``--local_rank`` the deepspeed launcher adds), run the job file in this process, and print the
    result as one JSON line on rank 0."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", required=True, help=f"{job_name} file (JSON or YAML)")
    # the deepspeed launcher passes --local_rank; the environment carries the same value
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not os.path.isfile(args.config):  # a node that does not see the stage folder: say which, at once
        print(f"{prog}: host {socket.gethostname()} cannot see the job file {args.config} (stage folder "
              f"{os.path.dirname(os.path.abspath(args.config))}): {_SHARED_HINT}", file=sys.stderr, flush=True)
        return 2
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    logging.basicConfig(level=os.environ.get("COLAR_LOG_LEVEL", "WARNING"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    result = run_file(args.config)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"result": result.to_dict()}), flush=True)
    return 0
