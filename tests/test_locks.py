"""A held lock says who holds it and gives up after a time (colar_core.files, the stage lock)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from colar_core.files import LockTimeout, exclusive_lock
from flows.config import PipelineConfig

HOLD = """
import sys, time
from colar_core.files import exclusive_lock
with exclusive_lock(sys.argv[1], holder="stage sft-colar-abc"):
    print("held", flush=True)
    time.sleep(60)
"""


@pytest.fixture
def held_lock(tmp_path):
    """A lock file held by another process; yields (path, that process)."""
    path = tmp_path / ".sft-colar-abc.lock"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        yield path, proc
    finally:
        proc.kill()
        proc.wait()


def test_a_held_lock_names_its_holder_and_gives_up_after_the_timeout(held_lock):
    path, holder = held_lock
    said: list[str] = []
    t0 = time.monotonic()
    with pytest.raises(LockTimeout) as info:
        with exclusive_lock(path, timeout_s=1.5, on_wait=said.append, poll_s=0.1):
            pytest.fail("acquired a held lock")
    waited = time.monotonic() - t0
    assert 1.5 <= waited < 10
    who = f"{socket.gethostname()}:{holder.pid}"
    assert said and who in said[0] and "stage sft-colar-abc" in said[0]  # told at once, naming the holder
    assert who in str(info.value) and "stage sft-colar-abc" in str(info.value) and "gave up after" in str(info.value)


def test_the_lock_is_taken_once_the_holder_is_gone(held_lock):
    path, holder = held_lock
    holder.kill()
    holder.wait()
    with exclusive_lock(path, timeout_s=5, holder="me"):
        assert f"\"pid\": {os.getpid()}" in path.read_text()  # the new holder is recorded
    assert path.read_text() == ""  # released: no stale holder left for the next waiter


def test_stage_lock_uses_the_configured_timeout(held_lock, tmp_path):
    from flows.pipeline import _stage_lock

    path, holder = held_lock
    with pytest.raises(LockTimeout, match=str(holder.pid)):
        with _stage_lock(Path(tmp_path / "sft-colar-abc"), timeout_s=0.5):
            pytest.fail("acquired a held lock")
    assert PipelineConfig().stage_lock_timeout_s == 6 * 3600
    with pytest.raises(ValueError):
        PipelineConfig(stage_lock_timeout_s=0)
