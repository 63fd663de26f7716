"""An exclusive lock between processes, on a lock file (``flock``: the kernel releases it if the
holder dies). Used around server start-up (``colar.flows.servers``) and around each stage folder
(``colar.flows.pipeline``)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Union

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None


@contextlib.contextmanager
def exclusive_lock(path: Union[str, os.PathLike]) -> Iterator[None]:
    """Hold an exclusive lock on the file ``path`` (created if missing) for the block; wait for it
    if another process holds it. Where ``fcntl`` is missing (not POSIX) no lock is taken."""
    if fcntl is None:
        yield
        return
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
