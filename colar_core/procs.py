"""Processes this code starts and records: an identity that survives pid reuse, and process groups.

A process is recorded as ``host:pid:start`` (:func:`process_identity`; ``start`` is its start time
in clock ticks from ``/proc/<pid>/stat``), so a pid recycled by another process no longer matches
the record. The processes of one launch are found by a marker in their environment, which every
descendant inherits (``torchrun`` starts each worker in a session of its own, so the launcher's
process group alone misses them): :func:`marked_processes`. :func:`stop_processes` stops them all:
SIGTERM, then SIGKILL after a grace period.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from pathlib import Path
from typing import Callable, Optional


def proc_stat(pid: int) -> Optional[list[str]]:
    """The fields of ``/proc/<pid>/stat`` after the command name (state, ppid, pgrp, session, ...),
    or None when the process is gone or ``/proc`` is missing."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def process_identity(pid: Optional[int] = None) -> str:
    """``host:pid:start`` of a process (start = its start time in clock ticks, so a recycled pid differs;
    ``?`` when the process is gone or a zombie)."""
    pid = os.getpid() if pid is None else pid
    fields = proc_stat(pid)
    start = "?" if fields is None or fields[0] == "Z" or len(fields) < 20 else fields[19]
    return f"{socket.gethostname()}:{pid}:{start}"


def identity_alive(recorded: str) -> bool:
    """True if the process recorded as ``host:pid:start`` runs on this host (not a zombie, pid not reused)."""
    host, _, rest = recorded.partition(":")
    pid, _, _ = rest.partition(":")
    if host != socket.gethostname() or not pid.isdigit() or recorded.endswith(":?"):
        return False
    return process_identity(int(pid)) == recorded


def marked_processes(var: str, value: str) -> list[int]:
    """Pids of the live (non-zombie) processes on this host started with ``var=value`` in their environment."""
    marker = f"{var}={value}".encode()
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if marker not in environ.read_bytes().split(b"\0"):
                continue
        except OSError:
            continue
        pid = int(environ.parent.name)
        if pid != os.getpid() and (fields := proc_stat(pid)) is not None and fields[0] != "Z":
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
