"""An exclusive lock between processes, on a lock file (``flock``: the kernel releases it if the
holder dies). Used around server start-up (``colar.flows.servers``) and around each stage folder
(``colar.flows.pipeline``).

The holder writes who it is into the lock file (host, pid, what it locks, since when); a waiter
polls with a non-blocking ``flock``, logs the holder, and gives up after ``timeout_s`` with
:class:`LockTimeout` naming the holder.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from typing import Callable, Optional, Union

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None

log = logging.getLogger(__name__)

LOG_EVERY_S = 300.0  # how often a waiter repeats who it waits for


class LockTimeout(TimeoutError):
    """The lock stayed held by another process for longer than the allowed wait."""


def _holder(fd: int) -> str:
    """Who holds the lock, as written in the lock file by :func:`exclusive_lock` (or 'unknown')."""
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "null")
    except (OSError, ValueError, UnicodeDecodeError):
        info = None
    if not isinstance(info, dict):
        return "an unknown process (no holder recorded)"
    return f"{info.get('host')}:{info.get('pid')} ({info.get('holder') or 'no description'}, since {info.get('since')})"


@contextlib.contextmanager
def exclusive_lock(path: Union[str, os.PathLike], *, timeout_s: Optional[float] = None, holder: str = "",
                   on_wait: Optional[Callable[[str], None]] = None, poll_s: float = 0.5) -> Iterator[None]:
    """Hold an exclusive lock on the file ``path`` (created if missing) for the block.

    While another process holds it, poll every ``poll_s`` seconds; ``on_wait`` (default: a log
    warning) is told who holds it at once and every few minutes; after ``timeout_s`` (None: no
    limit) raise :class:`LockTimeout` naming the holder. Once acquired, ``host:pid`` and ``holder``
    (what the lock is for) are written into the file for the next waiter. Where ``fcntl`` is missing
    (not POSIX) no lock is taken.
    """
    if fcntl is None:
        yield
        return
    say = on_wait or log.warning
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        start = time.monotonic()
        last_said = None
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                waited = time.monotonic() - start
                if timeout_s is not None and waited >= timeout_s:
                    raise LockTimeout(f"gave up after {waited:.0f} s waiting for lock {os.fspath(path)}: held by "
                                      f"{_holder(fd)}; if that process is stuck, stop it and run again") from None
                if last_said is None or time.monotonic() - last_said >= LOG_EVERY_S:
                    say(f"waiting for lock {os.fspath(path)}, held by {_holder(fd)} (waited {waited:.0f} s"
                        + (f", giving up after {timeout_s:.0f} s)" if timeout_s is not None else ")"))
                    last_said = time.monotonic()
                time.sleep(poll_s)
        try:
            info = {"host": socket.gethostname(), "pid": os.getpid(), "holder": holder,
                    "since": time.strftime("%Y-%m-%dT%H:%M:%S")}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode(), 0)
            yield
        finally:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
