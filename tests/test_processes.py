"""Processes that must not outlive their run (colar_core/training/launch.py, colar_core/procs.py),
and a single-process DeepSpeed run that opens no port to the network.

* A parent interrupted (Ctrl-C) or failing while a 2-process torchrun job runs stops the whole
  launcher group: no worker is left, and the ``launcher.json`` record is gone.
* A launcher group whose parent was SIGKILLed lives on: its record names it, and the retry check
  (``still_running``) and the stage lock refuse, naming the pid, until the group is gone.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from bench.common import ROOT
from bench.pipeline_run import clean_env
from colar_core.procs import (
    ancestors,
    group_processes,
    identity_alive,
    marked_processes,
    process_identity,
    session_id,
    stop_processes,
)
from colar_core.training.config import LauncherConfig
from colar_core.training.launch import LAUNCHER_RECORD, LauncherAliveError, launch, launch_processes, live_launcher

TWO = LauncherConfig(num_gpus=2, launcher="torchrun")


def long_job(tmp_path: Path, out: Path) -> Path:
    """A 2-process SFT job file that trains for minutes (it is stopped long before)."""
    spec = {"output_dir": str(out),
            "model": {"tiny": {"arch": "llama", "hidden_size": 64, "num_layers": 2, "num_heads": 4}},
            "data": {"builtin_train": 48, "builtin_val": 6},
            "train": {"objective": {"mode": "colar", "compression_factors": [1, 2]}, "batch_size": 8,
                      "max_steps": 100000, "checkpoint_every": 0, "eval_every": 0, "zero_stage": 2}}
    path = tmp_path / "job.json"
    path.write_text(json.dumps(spec))
    return path


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_for(cond, timeout_s: float, what: str) -> None:
    deadline = time.time() + timeout_s
    while not cond():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def recorded_processes(out: Path) -> list[int]:
    """The live processes of the launch recorded in ``out`` (none without a record)."""
    try:
        launch_id = json.loads((out / LAUNCHER_RECORD).read_text())["launch_id"]
    except (OSError, ValueError):
        return []
    return launch_processes(launch_id)


def workers_up(out: Path) -> list[int]:
    """The live processes of the recorded launch once torchrun and both workers run, else []."""
    found = recorded_processes(out)
    return found if len(found) >= 3 else []


def kernel_start_ticks(pid: int) -> str:
    """The start time of ``pid`` in clock ticks, as the kernel reports it (field 22 of /proc/<pid>/stat)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]


def test_a_process_identity_is_host_pid_and_the_kernels_start_time():
    """The identity format stays what launcher.json files and run tags already hold (start in ticks), and
    it tells a live process from a dead one and from another process with the same pid."""
    proc = subprocess.Popen(["sleep", "60"])
    try:
        identity = process_identity(proc.pid)
        assert identity == f"{socket.gethostname()}:{proc.pid}:{kernel_start_ticks(proc.pid)}"
        assert process_identity() == f"{socket.gethostname()}:{os.getpid()}:{kernel_start_ticks(os.getpid())}"
        assert identity_alive(identity)
        host, pid, start = identity.split(":")
        assert not identity_alive(f"{host}:{pid}:{int(start) + 1}")  # the pid of another process
        assert not identity_alive(f"other-{host}:{pid}:{start}")
        proc.kill()
        wait_for(lambda: not alive(proc.pid), 10, "the process to die")
        assert not identity_alive(identity)  # a zombie is dead
        assert process_identity(proc.pid).endswith(":?")
    finally:
        proc.kill()
        proc.wait()
    assert not identity_alive(identity) and process_identity(proc.pid).endswith(":?")


def test_processes_are_found_by_marker_and_by_group_and_stopped_with_sigkill_when_they_ignore_sigterm():
    marker = os.urandom(8).hex()
    env = {**os.environ, "COLAR_TEST_MARK": marker}
    # the shell and its child both ignore SIGTERM: only SIGKILL stops them
    group = subprocess.Popen(["sh", "-c", "trap '' TERM; sleep 60 & wait"], env=env, start_new_session=True)
    other = subprocess.Popen(["sleep", "60"])
    try:
        wait_for(lambda: len(group_processes(group.pid)) == 2, 10, "the shell's child")
        members = group_processes(group.pid)
        assert group.pid in members and other.pid not in members
        assert sorted(marked_processes("COLAR_TEST_MARK", marker)) == sorted(members)
        assert marked_processes("COLAR_TEST_MARK", "another") == []
        assert session_id(group.pid) == group.pid and session_id(other.pid) == os.getsid(0)
        assert os.getpid() in ancestors() and os.getppid() in ancestors() and group.pid not in ancestors()
        t0 = time.monotonic()
        assert stop_processes(lambda: group_processes(group.pid), grace_s=0.5, reap=group.poll)
        assert time.monotonic() - t0 >= 0.5  # SIGTERM was ignored for the grace period
        assert group.returncode == -signal.SIGKILL and not [pid for pid in members if alive(pid)]
        assert marked_processes("COLAR_TEST_MARK", marker) == [] and session_id(group.pid) is None
        assert alive(other.pid)  # not in the group: untouched
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group.pid, signal.SIGKILL)
        for proc in (group, other):
            proc.kill()
            proc.wait()


def _raise_runtime_error(signum, frame):
    raise RuntimeError("stop")


@pytest.mark.slow
@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, RuntimeError])
def test_an_interrupted_parent_leaves_no_worker_alive(tmp_path, interrupt):
    """Once torchrun and both workers run, the main thread (blocked in ``launch``) gets Ctrl-C (a real
    SIGINT) or an exception (raised by a SIGUSR1 handler): either way nothing of the group is left."""
    out = tmp_path / "run"
    seen: list[int] = []
    previous = signal.signal(signal.SIGUSR1, _raise_runtime_error)
    # Python raises KeyboardInterrupt on SIGINT only if SIGINT was not ignored when it started, and a
    # background job of a non-interactive shell (`bash .ci/run &`) starts with it ignored: the test would
    # wait for the job to end instead. What a terminal's Ctrl-C does is Python's default handler.
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    sig = signal.SIGINT if interrupt is KeyboardInterrupt else signal.SIGUSR1

    def interrupt_once_up() -> None:
        with contextlib.suppress(AssertionError):  # no workers: interrupt anyway; the test fails below
            wait_for(lambda: workers_up(out), 240, "the workers")
        seen.extend(workers_up(out))
        os.kill(os.getpid(), sig)

    watcher = threading.Thread(target=interrupt_once_up, daemon=True)
    watcher.start()
    try:
        with pytest.raises(interrupt):
            launch(long_job(tmp_path, out), TWO, env=clean_env(), on_line=lambda line: None, record_dir=out,
                   grace_s=5)
    finally:
        signal.signal(signal.SIGUSR1, previous)
        signal.signal(signal.SIGINT, previous_int)
    watcher.join(5)
    assert len(seen) >= 3, "the workers never started"
    assert not [pid for pid in seen if alive(pid)]  # torchrun and both workers are gone
    assert not (out / LAUNCHER_RECORD).exists()  # the record goes with the group


PARENT = """
import json, sys
from colar_core.training.config import LauncherConfig
from colar_core.training.launch import launch
launch(sys.argv[1], LauncherConfig(num_gpus=2, launcher="torchrun"), record_dir=sys.argv[2])
"""


@pytest.mark.slow
def test_a_launcher_left_by_a_killed_parent_blocks_retry_until_it_is_gone(tmp_path):
    from flows.pipeline import PROCESS_TAG, _stage_lock, still_running

    root = tmp_path / "runs"
    out = root / "sft-colar-0123456789ab"
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(long_job(tmp_path, out)), str(out)],
                              env=clean_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: workers_up(out) or parent.poll() is not None, 240, "the workers")
        members = workers_up(out)
        assert members, f"the launch ended early ({parent.returncode})"
        parent.send_signal(signal.SIGKILL)  # the flow's process dies; its launcher group lives on
        parent.wait()
        rec = live_launcher(out)
        assert rec is not None and rec["pid"] == rec["pgid"] and alive(rec["pid"])
        run = SimpleNamespace(info=SimpleNamespace(status="RUNNING"),  # its flow process is dead
                              data=SimpleNamespace(tags={PROCESS_TAG: process_identity(parent.pid)},
                                                   params={"output_dir": str(root)}))
        reason = still_running(run)  # what `colar retry` checks (exit 2 with this reason)
        assert reason is not None and f"launcher pid {rec['pid']}" in reason and out.name in reason
        with pytest.raises(LauncherAliveError, match=f"launcher pid {rec['pid']}"):
            with _stage_lock(out, timeout_s=5):  # the flow does not start the stage either
                pytest.fail("started a stage whose launcher is alive")
        assert stop_processes(lambda: launch_processes(rec["launch_id"]), grace_s=5)
        assert not [pid for pid in members if alive(pid)]
        assert still_running(run) is None and live_launcher(out) is None
    finally:
        parent.kill()
        parent.wait()
        stop_processes(lambda: recorded_processes(out), grace_s=1)


NO_LAUNCHER = """
import ipaddress, psutil, torch
from colar_core.training.config import TrainConfig
from colar_core.training.engines import DeepSpeedEngine
engine = DeepSpeedEngine(torch.nn.Linear(4, 1), TrainConfig(backend="deepspeed", zero_stage=2))
listening = [c.laddr for c in psutil.Process().net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
print("LISTEN", [(a.ip, a.port) for a in listening if not ipaddress.ip_address(a.ip).is_loopback])
"""


@pytest.mark.slow
def test_single_process_deepspeed_listens_on_no_network_interface():
    got = subprocess.run([sys.executable, "-c", NO_LAUNCHER], env=clean_env(), cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert got.returncode == 0, got.stderr[-3000:]
    assert "LISTEN []" in got.stdout, got.stdout  # no TCPStore on MASTER_PORT (formerly bound to '::')
