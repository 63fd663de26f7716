"""Resumable checkpoints (written atomically) and exported model directories.

Layout under a run's output directory::

    checkpoints/
      step_00000200/            one complete checkpoint
        engine/                 the engine's own files (DeepSpeed shards of every rank, or
                                model.safetensors + optimizer.pt for the torch engine)
        rank_00000.pt ...       per process: RNG states (python, numpy, torch, cuda) and the
                                ``stateful`` objects (data position, r-sampling generator, ...)
        trainer_state.json      the loop state (step, best scores, ...), human-readable
        COMPLETE                written last
      .tmp-step_00000300/       a checkpoint being written (never picked; removed on restart)
    best/step_00000200/         best-k exported models (``ColarModel.from_pretrained`` loadable)
    model/                      the final exported model

A checkpoint is written into ``.tmp-step_N`` by every process, then rank 0 writes ``COMPLETE``
and renames the directory to ``step_N`` (an atomic rename), so a run killed at any moment leaves
either a complete checkpoint or an ignored temp directory. Restarting the same stage with the
same output directory resumes from the newest complete one. Multi-node runs need the output
directory on a filesystem every node sees.

Our checkpoint files are read with ``torch.load(weights_only=True)``; DeepSpeed reads its own
shards with ``torch.load``, which is acceptable for files this code wrote. Exported models use
safetensors only.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from pathlib import Path
from typing import Mapping, Optional, Sequence

import torch

from colar_core.training.engines import Engine
from colar_core.training.loop import LoopState, Stateful

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
BEST_DIR = "best"
COMPLETE = "COMPLETE"
STATE_FILE = "trainer_state.json"
_PREFIX = "step_"
_TMP = ".tmp-"


class CheckpointError(OSError):
    """A checkpoint could not be written (unwritable directory, disk full...). The previous complete
    checkpoint, if any, is untouched: fix the cause and run the stage again to resume from it."""


def step_dir_name(step: int) -> str:
    return f"{_PREFIX}{step:08d}"


def _step_of(path: Path) -> Optional[int]:
    name = path.name
    if not name.startswith(_PREFIX):
        return None
    try:
        return int(name[len(_PREFIX):])
    except ValueError:
        return None


def complete_checkpoints(checkpoint_root: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every complete checkpoint under ``checkpoint_root``, oldest first."""
    root = Path(checkpoint_root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        step = _step_of(p)
        if step is not None and p.is_dir() and (p / COMPLETE).is_file():
            found.append((step, p))
    return sorted(found)


def latest_checkpoint(output_dir) -> Optional[Path]:
    """The newest complete checkpoint of the run in ``output_dir`` (None if there is none)."""
    found = complete_checkpoints(Path(output_dir) / CHECKPOINT_DIR)
    return found[-1][1] if found else None


# ----------------------------------------------------------------------------------------------
# RNG states
# ----------------------------------------------------------------------------------------------
def capture_rng() -> dict:
    """Python, numpy, torch and CUDA RNG states, in a form ``torch.load(weights_only=True)`` reads."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np  # optional: its RNG is saved only where numpy is installed

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = {"kind": kind, "keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
                          "has_gauss": int(has_gauss), "cached": float(cached)}
    except ImportError:  # pragma: no cover
        pass
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    """Set the RNG states :func:`capture_rng` took (CUDA only with the same number of devices)."""
    random.setstate(as_tuple(state["python"]))
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        try:
            import numpy as np  # optional, as in capture_rng

            n = state["numpy"]
            np.random.set_state((n["kind"], n["keys"].numpy().astype("uint32"), n["pos"], n["has_gauss"], n["cached"]))
        except ImportError:  # pragma: no cover
            pass
    if "cuda" in state and torch.cuda.is_available():
        if len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])
        else:
            log.warning("checkpoint has CUDA RNG states for %d devices, this process sees %d: not restored",
                        len(state["cuda"]), torch.cuda.device_count())


def as_tuple(x):
    """Lists back to tuples, recursively: a saved ``random.getstate()`` as ``setstate`` wants it."""
    return tuple(as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


# ----------------------------------------------------------------------------------------------
# The manager
# ----------------------------------------------------------------------------------------------
class CheckpointManager:
    """Saves, rotates and restores the checkpoints of one run (see the module docstring).

    Every method that takes ``engine`` is collective: all processes call it.
    """

    def __init__(self, output_dir, keep: int = 2):
        if keep < 1:
            raise ValueError("keep must be >= 1")
        self.output_dir = Path(output_dir)
        self.root = self.output_dir / CHECKPOINT_DIR
        self.best_root = self.output_dir / BEST_DIR
        self.keep = keep

    def latest(self) -> Optional[Path]:
        found = complete_checkpoints(self.root)
        return found[-1][1] if found else None

    # ----- save ---------------------------------------------------------------------------------
    def save(self, engine: Engine, state: LoopState, stateful: Optional[Mapping[str, Stateful]] = None) -> Path:
        """Write a checkpoint of step ``state.step``; returns its final path.

        An OS error while writing (permissions, disk full) raises :class:`CheckpointError` naming the
        directory and the previous complete checkpoint, which stays valid (everything is written into
        a temp directory that is renamed into place only when complete).
        """
        try:
            return self._save(engine, state, stateful)
        except CheckpointError:
            raise
        except OSError as err:
            tmp = self.root / f"{_TMP}{step_dir_name(state.step)}"
            if engine.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            previous = self.latest()
            kept = (f"the previous checkpoint {previous} is intact and a rerun resumes from it" if previous
                    else "there is no earlier checkpoint")
            error = CheckpointError(f"cannot write checkpoint step {state.step} under {self.root}: "
                                    f"{err.strerror or err} ({getattr(err, 'filename', None) or tmp}); {kept}. "
                                    "Make the directory writable or free space, then run the stage again")
            error.errno = err.errno
            raise error from err

    def _save(self, engine: Engine, state: LoopState, stateful: Optional[Mapping[str, Stateful]] = None) -> Path:
        stateful = stateful or {}
        name = step_dir_name(state.step)
        final, tmp = self.root / name, self.root / f"{_TMP}{name}"
        if engine.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        engine.barrier()
        engine.save_checkpoint(tmp / "engine")
        rank_state = {
            "step": state.step,
            "rank": engine.rank,
            "world_size": engine.world_size,
            "rng": capture_rng(),
            "stateful": {k: obj.state_dict() for k, obj in stateful.items()},
        }
        torch.save(rank_state, tmp / f"rank_{engine.rank:05d}.pt")
        engine.barrier()
        if engine.is_main:
            trainer_state = {
                "step": state.step,
                "loop": state.to_dict(),
                "world_size": engine.world_size,
                "engine": type(engine).__name__,
                "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "stateful_main_rank": _jsonable({k: v for k, v in rank_state["stateful"].items()}),
            }
            (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=2))
            _write_synced(tmp / COMPLETE, f"{state.step}\n")
            _fsync_dir(tmp)
            if final.exists():  # the same step saved again (e.g. the end of a resumed, finished run)
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.root)
            self._rotate()
        engine.barrier()
        return final

    def _rotate(self) -> None:
        found = complete_checkpoints(self.root)
        for _, path in found[: max(0, len(found) - self.keep)]:
            shutil.rmtree(path, ignore_errors=True)

    # ----- restore ------------------------------------------------------------------------------
    def restore(self, engine: Engine, stateful: Optional[Mapping[str, Stateful]] = None) -> Optional[LoopState]:
        """Load the newest complete checkpoint into ``engine`` and ``stateful``; None when none exists.

        Leftover temp directories (a run killed while saving) are removed first.
        """
        stateful = stateful or {}
        if engine.is_main:
            self.cleanup_partial()
        latest = self.latest() if engine.is_main else None
        latest = engine.broadcast_object(str(latest) if latest is not None else None)
        if latest is None:
            engine.barrier()
            return None
        path = Path(latest)
        engine.load_checkpoint(path / "engine")
        own = path / f"rank_{engine.rank:05d}.pt"
        if not own.is_file():
            log.warning("%s has no state for rank %d (saved with another world size): using rank 0's data "
                        "position; this rank's random streams restart from rank 0's", path, engine.rank)
            own = path / "rank_00000.pt"
        rank_state = torch.load(own, map_location="cpu", weights_only=True)
        restore_rng(rank_state["rng"])
        for key, obj in stateful.items():
            if key in rank_state["stateful"]:
                obj.load_state_dict(rank_state["stateful"][key])
            else:
                log.warning("%s holds no state for %r; it starts fresh", path, key)
        trainer_state = json.loads((path / STATE_FILE).read_text())
        state = LoopState.from_dict(trainer_state["loop"])
        if engine.is_main:
            self._prune_orphan_exports(state)
        engine.barrier()
        log.info("resumed from %s (step %d)", path, state.step)
        return state

    def cleanup_partial(self) -> None:
        """Remove temp directories of checkpoints and exports that were never completed."""
        for root in (self.root, self.best_root, self.output_dir):
            if root.is_dir():
                for p in root.iterdir():
                    if p.name.startswith(_TMP) and p.is_dir():
                        shutil.rmtree(p, ignore_errors=True)

    def _prune_orphan_exports(self, state: LoopState) -> None:
        """Best-k exports written after the restored checkpoint (the run died before saving the
        next one) are not in its state: remove them so best-k stays consistent."""
        keep = {Path(b["path"]).name for b in state.best if b.get("path")}
        if self.best_root.is_dir():
            for p in self.best_root.iterdir():
                if p.is_dir() and p.name not in keep:
                    shutil.rmtree(p, ignore_errors=True)

    # ----- exports ------------------------------------------------------------------------------
    def best_path(self, step: int) -> Path:
        return self.best_root / step_dir_name(step)

    def remove_exports(self, paths: Sequence[str], engine: Engine) -> None:
        """Delete best-k exports that left the best-k (rank 0; collective)."""
        if engine.is_main:
            for p in paths:
                if p:
                    shutil.rmtree(p, ignore_errors=True)
        engine.barrier()


def export_model(engine: Engine, out_dir, tokenizer=None, extra_files: Optional[dict] = None) -> Path:
    """``ColarModel.save_pretrained`` of the engine's model into ``out_dir`` (collective).

    Under ZeRO-3 the full parameters are gathered first. Written into a temp directory by rank 0
    and renamed into place, so ``out_dir`` is either the previous complete export or the new one.
    ``extra_files`` maps file names to JSON-able contents written next to the model.
    """
    out = Path(out_dir)
    tmp = out.with_name(f"{_TMP}{out.name}")
    with engine.full_model() as model:
        if engine.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            model.save_pretrained(tmp, tokenizer)
            for name, content in (extra_files or {}).items():
                (tmp / name).write_text(json.dumps(content, indent=2))
    engine.barrier()
    if engine.is_main:
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    engine.barrier()
    return out


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items() if not isinstance(v, torch.Tensor)}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x] if len(x) < 50 else f"<{len(x)} items>"
    if isinstance(x, (int, float, str, bool)) or x is None:
        return x
    return repr(x)


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)
