"""Processes this code starts and records: an identity that survives pid reuse, and process groups.

Every process lookup of colar goes through here (on psutil). A process is recorded as ``host:pid:start``
(:func:`process_identity`; ``start`` is its start time in clock ticks since boot), so a pid recycled by
another process no longer matches the record. The processes of one launch are found by a marker in their
environment, which every descendant inherits (``torchrun`` starts each worker in a session of its own, so
the launcher's process group alone misses them): :func:`marked_processes`; those of a process group (a
local server and its workers) by :func:`group_processes`. :func:`stop_processes` stops what either finds:
SIGTERM, then SIGKILL after a grace period.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from typing import Callable, Optional

import psutil

#: Clock ticks per second: the unit of the start time in an identity (what ``/proc/<pid>/stat`` counts).
_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def _live(pid: int) -> Optional[psutil.Process]:
    """The process ``pid`` if it runs and is not a zombie, else None."""
    try:
        proc = psutil.Process(pid)
        return proc if proc.status() != psutil.STATUS_ZOMBIE else None
    except (psutil.Error, ValueError):
        return None


def alive(pid: int) -> bool:
    """True if ``pid`` runs on this host and is not a zombie."""
    return _live(pid) is not None


def process_identity(pid: Optional[int] = None) -> str:
    """``host:pid:start`` of a process (start = its start time in clock ticks since boot, so a recycled pid
    differs; ``?`` when the process is gone or a zombie).

    psutil gives the start time in seconds since the epoch (ticks / ticks per second + the boot time);
    the boot time moves when the clock is set, so the ticks are taken back out of it: an identity recorded
    before a clock change still matches the same process after it."""
    pid = os.getpid() if pid is None else pid
    proc = _live(pid)
    start = "?"
    if proc is not None:
        with contextlib.suppress(psutil.Error):
            start = str(round((proc.create_time() - psutil.boot_time()) * _TICKS_PER_S))
    return f"{socket.gethostname()}:{pid}:{start}"


def identity_alive(recorded: str) -> bool:
    """True if the process recorded as ``host:pid:start`` runs on this host (not a zombie, pid not reused)."""
    host, _, rest = recorded.partition(":")
    pid, _, _ = rest.partition(":")
    if host != socket.gethostname() or not pid.isdigit() or recorded.endswith(":?"):
        return False
    return process_identity(int(pid)) == recorded


def start_time(pid: int) -> Optional[float]:
    """When the live (non-zombie) process ``pid`` started, in seconds since the epoch (to about a second:
    the boot time it is counted from is whole seconds); None if it is gone."""
    proc = _live(pid)
    try:
        return proc.create_time() if proc is not None else None
    except psutil.Error:
        return None


def session_id(pid: int) -> Optional[int]:
    """The session id of the live (non-zombie) process ``pid``, else None."""
    if not alive(pid):
        return None
    try:
        return os.getsid(pid)
    except OSError:
        return None


def ancestors(pid: Optional[int] = None) -> set[int]:
    """``pid`` (default: this process) and the pids of its parent, grandparent, ... up to init."""
    pid = os.getpid() if pid is None else pid
    try:
        return {pid, *(p.pid for p in psutil.Process(pid).parents())}
    except psutil.Error:
        return {pid}


def marked_processes(var: str, value: str) -> list[int]:
    """Pids of the live (non-zombie) processes on this host, this one excluded, started with ``var=value`` in
    their environment (processes whose environment cannot be read are left out)."""
    return [proc.pid for proc in psutil.process_iter(["environ"])
            if (proc.info["environ"] or {}).get(var) == value and proc.pid != os.getpid() and alive(proc.pid)]


def group_processes(pgid: int) -> list[int]:
    """Pids of the live (non-zombie) processes in the process group ``pgid``."""
    found = []
    for pid in psutil.pids():
        with contextlib.suppress(OSError):
            if os.getpgid(pid) == pgid and alive(pid):
                found.append(pid)
    return found


def stop_processes(find: Callable[[], list[int]], grace_s: float = 10.0,
                   reap: Optional[Callable[[], object]] = None) -> bool:
    """SIGTERM every process ``find()`` lists, SIGKILL what is left after ``grace_s``; True once none is
    left (checked for 5 s more after SIGKILL). ``reap`` (e.g. ``Popen.poll`` of a child among them) is
    called while waiting so that child does not linger as a zombie."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        for pid in find():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait_s
        while True:
            if reap is not None:
                reap()
            if not find():
                return True
            if time.monotonic() >= deadline:
                break
            time.sleep(0.1)
    return False
