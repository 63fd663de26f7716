"""Checkpoints that survive power loss and full disks (colar_core/training/checkpoint.py).

* Every file of a checkpoint is fsynced and listed (size, CRC-32) in ``COMPLETE`` before the rename.
* A newest checkpoint whose file was truncated is quarantined (``.corrupt-step_N``) and the run
  resumes from the previous one, with a warning, and finishes at the same step.
* A full disk while saving, through the torch engine and the DeepSpeed engine, is a
  ``CheckpointError`` naming the directory and the previous intact checkpoint. The disk is a real
  full one: a small tmpfs (``mount -t tmpfs``, needs root) filled up after the first checkpoint; where
  mounting is not allowed the test falls back to making ``torch.save`` raise the ``RuntimeError`` it
  raises on a full disk.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import uuid
from pathlib import Path

import pytest
import torch

from bench.pipeline_run import LAUNCH_VARS
from colar_core.training.checkpoint import (
    COMPLETE,
    CheckpointError,
    CheckpointManager,
    complete_checkpoints,
    latest_checkpoint,
    verify_checkpoint,
)
from colar_core.training.config import TrainConfig
from colar_core.training.engines import build_engine
from colar_core.training.loop import LoopState
from tests.helpers import Toy, toy_loop  # a real loop (torch engine, checkpoints every 10 steps)


def test_complete_lists_every_file_with_size_and_checksum(tmp_path):
    toy_loop(tmp_path, max_steps=10)
    ckpt = latest_checkpoint(tmp_path)
    manifest = json.loads((ckpt / COMPLETE).read_text())
    on_disk = sorted(p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file() and p.name != COMPLETE)
    assert manifest["step"] == 10 and sorted(manifest["files"]) == on_disk
    assert {"engine/model.safetensors", "engine/optimizer.pt", "rank_00000.pt", "trainer_state.json"} <= set(on_disk)
    assert all(v["size"] == (ckpt / k).stat().st_size for k, v in manifest["files"].items())
    assert verify_checkpoint(ckpt) is None


def test_every_file_and_directory_is_fsynced_before_complete(tmp_path, monkeypatch):
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    toy_loop(tmp_path, max_steps=10)
    tmp = str(tmp_path / "checkpoints" / ".tmp-step_00000010")
    before_complete = synced[:synced.index(f"{tmp}/{COMPLETE}")]
    for rel in ("engine/model.safetensors", "engine/optimizer.pt", "rank_00000.pt", "trainer_state.json",
                "engine"):
        assert f"{tmp}/{rel}" in before_complete, rel
    assert str(tmp_path / "checkpoints") in synced  # the rename is made durable too


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_truncated_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog, damage):
    finished = toy_loop(tmp_path / "clean")
    out = tmp_path / "run"
    toy_loop(out, max_steps=20)
    newest = latest_checkpoint(out)
    assert newest.name == "step_00000020"
    victim = newest / "engine" / "model.safetensors"
    if damage == "truncate":  # power loss: the rename reached the disk, the data did not
        with open(victim, "r+b") as fh:
            fh.truncate(victim.stat().st_size // 2)
    else:
        victim.unlink()
    with caplog.at_level(logging.WARNING, logger="colar_core.training.checkpoint"):
        state = toy_loop(out)
    assert state.resumed_from == 10 and state.step == finished.step == 30
    warning = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert "step_00000020 is unusable" in warning and "model.safetensors" in warning
    assert (out / "checkpoints" / ".corrupt-step_00000020").is_dir()  # quarantined: never picked again
    assert [s for s, _ in complete_checkpoints(out / "checkpoints")] == [20, 30]


def test_checkpoint_that_verifies_but_fails_to_load_falls_back(tmp_path, caplog):
    out = tmp_path / "run"
    toy_loop(out, max_steps=20)
    newest = latest_checkpoint(out)
    manifest = json.loads((newest / COMPLETE).read_text())
    manifest.pop("files")  # as if written before manifests existed: only loading can tell
    (newest / COMPLETE).write_text(json.dumps(manifest))
    (newest / "rank_00000.pt").write_bytes(b"not a torch file")
    with caplog.at_level(logging.WARNING, logger="colar_core.training.checkpoint"):
        state = toy_loop(out)
    assert state.resumed_from == 10 and state.step == 30
    assert "failed to load" in caplog.text
    assert (out / "checkpoints" / ".corrupt-step_00000020").is_dir()


# ----------------------------------------------------------------------------------------------
# full disk
# ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def small_disk(tmp_path: Path, size: str = "8m"):
    """A small tmpfs mounted in ``tmp_path`` (yields it), or None where mounting is not allowed."""
    mnt = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        yield None
        return
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(disk: Path) -> None:
    """Write a file until the disk is full."""
    with open(disk / "filler", "wb") as fh, contextlib.suppress(OSError):
        while True:
            fh.write(b"\0" * 65536)
            fh.flush()


def _raise_like_a_full_disk(*args, **kwargs):
    raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534 "
                       "(simulated: No space left on device)")


@pytest.mark.parametrize("backend", ["torch", pytest.param("deepspeed", marks=pytest.mark.slow)])
def test_full_disk_is_a_checkpoint_error_naming_the_directory_and_the_intact_checkpoint(tmp_path, monkeypatch,
                                                                                        backend):
    if backend == "deepspeed":
        for var in LAUNCH_VARS:
            monkeypatch.delenv(var, raising=False)
    with small_disk(tmp_path) as disk:
        out = (disk or tmp_path) / "run"
        torch.manual_seed(0)
        cfg = TrainConfig(backend=backend, lr=0.1, max_steps=20, zero_stage=2)
        engine = build_engine(Toy(), cfg)
        loss = ((engine.forward(lambda m, x: m.lin(x), torch.randn(8, 4))) ** 2).mean()
        engine.backward(loss)
        engine.step()
        manager = CheckpointManager(out, keep=2)
        first = manager.save(engine, LoopState(step=10))
        if disk is not None:
            _fill(disk)  # a real full disk
        else:
            monkeypatch.setattr(torch, "save", _raise_like_a_full_disk)
        with pytest.raises(CheckpointError) as info:
            manager.save(engine, LoopState(step=20))
        msg = str(info.value)
        assert f"cannot write checkpoint step 20 under {out / 'checkpoints'}" in msg
        assert f"the previous checkpoint {first} is intact" in msg
        assert manager.latest() == first and verify_checkpoint(first) is None
        assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".tmp-")]
        if disk is not None:
            assert "0 bytes free" in msg or "No space left" in msg
            (disk / "filler").unlink()  # space again: the next save works
            assert manager.save(engine, LoopState(step=20)).name == "step_00000020"
