"""Small files written safely, and an exclusive lock between processes.

:func:`atomic_write_bytes` / :func:`atomic_write_text` / :func:`atomic_write_json`: the bytes go to a
temporary file in the same folder, are fsynced, then renamed over the target (and the folder fsynced),
so a reader sees the old content or the new, never half of it, even after a crash or power loss.

:func:`exclusive_lock`: a lock file (``flock``: the kernel releases it if the holder dies). Used around
server start-up (``colar_infra.servers``), around each stage folder (``flows.pipeline``) and around a
GGUF conversion (``colar_core.gguf_import``).

The holder writes who it is into the lock file (host, pid, what it locks, since when); a waiter
polls with a non-blocking ``flock``, logs the holder, and gives up after ``timeout_s`` with
:class:`LockTimeout` naming the holder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Callable, Optional, Union

try:
    import fcntl
    _HAVE_FCNTL = True
except ImportError:  # pragma: no cover - not POSIX
    _HAVE_FCNTL = False

log = logging.getLogger(__name__)

LOG_EVERY_S = 300.0  # how often a waiter repeats who it waits for


def atomic_write_bytes(path: Union[str, os.PathLike], data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` atomically and durably (parent folders created)."""
    path = os.fspath(path)
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)  # mkstemp creates 0600; outputs are ordinary readable files
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(folder)


def atomic_write_text(path: Union[str, os.PathLike], text: str) -> None:
    """:func:`atomic_write_bytes` of ``text`` in UTF-8."""
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Union[str, os.PathLike], obj: object, *, indent: Optional[int] = 2,
                      sort_keys: bool = True) -> None:
    """:func:`atomic_write_text` of ``obj`` as JSON (a trailing newline)."""
    atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=sort_keys) + "\n")


def fsync_dir(path: Union[str, os.PathLike]) -> None:
    """fsync a folder, so a rename or a new file in it survives a power loss (a no-op where folders
    cannot be opened, as on Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_SHA_MEMO: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Union[str, os.PathLike]) -> str:
    """sha256 of a file's bytes (as ``sha256sum``); remembered per process by (path, size, mtime), so a
    large file (a GGUF checkpoint) is read once however often it is asked for."""
    p = Path(path).expanduser().resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    if key not in _SHA_MEMO:
        h = hashlib.sha256()
        with open(p, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        _SHA_MEMO[key] = h.hexdigest()
    return _SHA_MEMO[key]


def content_digest(path: Union[str, os.PathLike]) -> str:
    """sha256 of what ``path`` holds: a file's bytes (:func:`file_sha256`), or for a folder one line
    ``<relative path>\0<file sha256>`` per file in path order (names and bytes; file times and the
    folder's own location do not count). The lineage id of a model, the cache-key digest of an input.
    Raises FileNotFoundError if ``path`` is neither."""
    root = Path(path)
    if root.is_file():
        return file_sha256(root)
    if not root.is_dir():
        raise FileNotFoundError(f"content_digest: {root} is not a file or directory")
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(root).as_posix()}\0{file_sha256(f)}\n".encode())
    return h.hexdigest()


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
    if not _HAVE_FCNTL:
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
