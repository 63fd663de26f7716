"""Resumable checkpoints (written atomically) and exported model directories.

Layout under a run's output directory::

    checkpoints/
      step_00000200/            one complete checkpoint
        engine/                 the engine's own files (DeepSpeed shards of every rank, or
                                model.safetensors + optimizer.pt for the torch engine)
        rank_00000.pt ...       per process: RNG states (python, numpy, torch, cuda) and the
                                ``stateful`` objects (data position, r-sampling generator, ...)
        trainer_state.json      the loop state (step, best scores, ...), human-readable
        COMPLETE                written last: the manifest (every file above, its size and CRC-32)
      .tmp-step_00000300/       a checkpoint being written (never picked; removed on restart)
      .corrupt-step_00000400/   a complete checkpoint that failed verification or loading (never picked)
    best/step_00000200/         best-k exported models (``ColarModel.from_pretrained`` loadable)
    model/                      the final exported model

A checkpoint is written into ``.tmp-step_N`` by every process, then rank 0 fsyncs every file and
directory in it, writes ``COMPLETE`` (the manifest) and renames the directory to ``step_N`` (an
atomic rename), so a run killed at any moment, power loss included, leaves either a complete
checkpoint or an ignored temp directory. Restarting the same stage with the same output directory
resumes from the newest complete one whose files match its manifest and that loads; a newest one
that does not (a truncated file, a full disk the filesystem did not report) is renamed to
``.corrupt-step_N`` with a warning and the previous one is used. Multi-node runs need the output
directory on a filesystem every node sees.

Our checkpoint files are read with ``torch.load(weights_only=True)``; DeepSpeed reads its own
shards with ``torch.load``, which is acceptable for files this code wrote. Exported models use
safetensors only.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import shutil
import time
import zlib
from pathlib import Path
from typing import Mapping, Optional, Sequence, TypedDict

import torch
from safetensors import SafetensorError

from colar_core.files import atomic_write_json, fsync_dir
from colar_core.training.engines import Engine
from colar_core.training.loop import LoopState, Stateful

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
BEST_DIR = "best"
COMPLETE = "COMPLETE"
STATE_FILE = "trainer_state.json"
_PREFIX = "step_"
_TMP = ".tmp-"
_CORRUPT = ".corrupt-"
_CHUNK = 1 << 20
# what a failed write raises: OSError; torch.save (and so DeepSpeed) a RuntimeError ("unexpected pos ..."),
# safetensors its own error ("No space left on device")
_WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)


class CheckpointError(OSError):
    """A checkpoint could not be written (unwritable directory, disk full...). The previous complete
    checkpoint, if any, is untouched: fix the cause and run the stage again to resume from it."""


class RankState(TypedDict):
    """One process's ``rank_NNNNN.pt`` in a checkpoint: its random streams and its stateful objects."""

    step: int
    rank: int
    world_size: int
    rng: dict  # capture_rng()
    stateful: dict[str, dict]  # each stateful object's state_dict()


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


def _file_digest(path: Path, sync: bool = False) -> dict:
    """``{"size", "crc32"}`` of a file (fsynced first with ``sync``)."""
    crc = 0
    with open(path, "rb") as fh:
        if sync:
            os.fsync(fh.fileno())
        while chunk := fh.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return {"size": path.stat().st_size, "crc32": crc}


def sync_tree(directory: Path) -> dict:
    """fsync every file and directory under ``directory`` (deepest first); returns the manifest
    ``{relative path: {"size", "crc32"}}`` of its files."""
    manifest = {}
    for dirpath, _, filenames in os.walk(directory, topdown=False):
        for name in sorted(filenames):
            path = Path(dirpath) / name
            manifest[path.relative_to(directory).as_posix()] = _file_digest(path, sync=True)
        fsync_dir(Path(dirpath))
    return dict(sorted(manifest.items()))


def verify_checkpoint(path: Path) -> Optional[str]:
    """What is wrong with the complete checkpoint ``path`` compared with its manifest, or None if
    nothing is (checkpoints written before manifests existed are not checked)."""
    try:
        manifest = json.loads((path / COMPLETE).read_text())
    except (OSError, ValueError) as err:
        return f"unreadable {COMPLETE}: {err}"
    if not isinstance(manifest, dict):
        return None  # an older checkpoint: COMPLETE holds only the step
    for rel, want in manifest.get("files", {}).items():
        try:
            got = _file_digest(path / rel)
        except OSError as err:
            return f"{rel}: {err.strerror or err}"
        if got != want:
            return f"{rel}: size {got['size']} crc32 {got['crc32']}, manifest says size {want['size']} crc32 {want['crc32']}"
    return None


def latest_checkpoint(output_dir) -> Optional[Path]:
    """The newest complete checkpoint of the run in ``output_dir`` (None if there is none)."""
    found = complete_checkpoints(Path(output_dir) / CHECKPOINT_DIR)
    return found[-1][1] if found else None


#: Beside checkpoints carried over from another folder of the same stage (:func:`carry_checkpoints`).
CARRIED_FILE = "CARRIED_FROM.json"


def link_or_copy(src: str, dst: str) -> None:
    """``dst`` as a hard link to ``src`` (no second copy of GBs of weights on disk), else a copy (another
    file system). For files that are written once, by a temp name and a rename, never in place."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def carry_checkpoints(src_output_dir, dst_output_dir, reason: str) -> list[Path]:
    """Give the stage folder ``dst_output_dir`` the complete checkpoints of ``src_output_dir`` (an
    earlier attempt of the same stage, e.g. under older code), so that the stage resumes from them;
    ``reason`` is recorded in ``checkpoints/CARRIED_FROM.json``. Files are hard links where the file
    system allows (a checkpoint file is never written again once complete), copies otherwise.
    Nothing is carried into a folder that has checkpoints of its own. Returns the carried folders."""
    src, dst = Path(src_output_dir) / CHECKPOINT_DIR, Path(dst_output_dir) / CHECKPOINT_DIR
    found = complete_checkpoints(src)
    if not found or complete_checkpoints(dst):
        return []
    dst.mkdir(parents=True, exist_ok=True)

    carried = []
    for _, path in found:
        tmp = dst / f"{_TMP}{path.name}"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(path, tmp, copy_function=link_or_copy)
        fsync_dir(tmp)
        tmp.rename(dst / path.name)
        carried.append(dst / path.name)
    fsync_dir(dst)
    atomic_write_json(dst / CARRIED_FILE, {"from": str(Path(src_output_dir)), "reason": reason,
                                           "steps": [step for step, _ in found]})
    return carried


def carried_checkpoints_failed(output_dir) -> Optional[str]:
    """Where the checkpoints of ``output_dir`` came from, when they were carried over
    (:func:`carry_checkpoints`) and none of them is left intact: resume quarantined them all because
    none loads with this code. None otherwise (nothing carried, or one still loads)."""
    root = Path(output_dir) / CHECKPOINT_DIR
    if not (root / CARRIED_FILE).is_file() or complete_checkpoints(root):
        return None
    try:
        return str(json.loads((root / CARRIED_FILE).read_text()).get("from", "?"))
    except (OSError, ValueError):
        return "?"


def drop_carried_marker(output_dir) -> None:
    """Forget that the checkpoints of ``output_dir`` were carried over (the stage starts again)."""
    (Path(output_dir) / CHECKPOINT_DIR / CARRIED_FILE).unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------
# RNG states
# ----------------------------------------------------------------------------------------------
def capture_rng() -> dict:
    """Python, numpy, torch and CUDA RNG states, in a form ``torch.load(weights_only=True)`` reads."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np  # optional: its RNG is saved only where numpy is installed

        legacy = np.random.get_state(legacy=True)  # (the default; numpy's stub types the default call as a dict)
        assert isinstance(legacy, tuple)  # the global generator is MT19937, which has the legacy form
        kind, keys, pos, has_gauss, cached = legacy
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

        An OS error while writing (permissions, disk full), or the ``RuntimeError`` / ``SafetensorError``
        that ``torch.save`` (so DeepSpeed) / safetensors raise on a full disk, raises :class:`CheckpointError` naming the directory and
        the previous complete checkpoint, which stays valid (everything is written into a temp
        directory that is renamed into place only when complete).
        """
        try:
            return self._save(engine, state, stateful)
        except CheckpointError:
            raise
        except _WRITE_ERRORS as err:
            tmp = self.root / f"{_TMP}{step_dir_name(state.step)}"
            if engine.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            previous = self.latest()
            kept = (f"the previous checkpoint {previous} is intact and a rerun resumes from it" if previous
                    else "there is no earlier checkpoint")
            free = _free_bytes(self.root)
            error = CheckpointError(f"cannot write checkpoint step {state.step} under {self.root}: "
                                    f"{getattr(err, 'strerror', None) or err} "
                                    f"({getattr(err, 'filename', None) or tmp}; {free} bytes free there); {kept}. "
                                    "Make the directory writable or free space, then run the stage again")
            error.errno = getattr(err, "errno", None) or (errno.ENOSPC if free == 0 else None)
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
        rank_state: RankState = {
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
            manifest = {"step": state.step, "files": sync_tree(tmp)}  # every rank's files are on disk now
            _write_synced(tmp / COMPLETE, json.dumps(manifest, indent=1) + "\n")
            fsync_dir(tmp)
            if final.exists():  # the same step saved again (e.g. the end of a resumed, finished run)
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_dir(self.root)
            self._rotate()
        engine.barrier()
        return final

    def _rotate(self) -> None:
        found = complete_checkpoints(self.root)
        for _, path in found[: max(0, len(found) - self.keep)]:
            shutil.rmtree(path, ignore_errors=True)

    # ----- restore ------------------------------------------------------------------------------
    def restore(self, engine: Engine, stateful: Optional[Mapping[str, Stateful]] = None) -> Optional[LoopState]:
        """Load the newest intact complete checkpoint into ``engine`` and ``stateful``; None when none exists.

        Leftover temp directories (a run killed while saving) are removed first. A checkpoint whose
        files do not match its manifest, or that fails to load on any process, is quarantined
        (renamed ``.corrupt-step_N``, with a warning) and the previous complete one is tried.
        """
        stateful = stateful or {}
        if engine.is_main:
            self.cleanup_partial()
        load_failed = False
        while True:
            chosen = self._newest_intact() if engine.is_main else None
            chosen = engine.broadcast_object(str(chosen) if chosen is not None else None)
            if chosen is None:
                if load_failed:  # the engine may hold part of a bad checkpoint: do not train on it
                    raise CheckpointError(f"no checkpoint under {self.root} loads (the bad ones are now "
                                          f"{_CORRUPT}step_*); run the stage again to start it from step 0")
                engine.barrier()
                return None
            path = Path(chosen)
            try:
                loaded, error = self._load(engine, path), None
            except Exception as err:  # noqa: BLE001 - any load failure: fall back to the previous checkpoint
                loaded, error = None, err
                log.warning("rank %d could not load %s: %r", engine.rank, path, err)
            if float(engine.all_reduce_sum(torch.tensor([0.0 if error is None else 1.0])).sum()) == 0:
                break
            if engine.is_main:
                self._quarantine(path, f"it failed to load ({error!r})" if error else "it failed to load on a rank")
            load_failed = True
            engine.barrier()
        assert loaded is not None  # no process failed to load, this one included
        rank_state, state = loaded
        restore_rng(rank_state["rng"])
        for key, obj in stateful.items():
            if key in rank_state["stateful"]:
                obj.load_state_dict(rank_state["stateful"][key])
            else:
                log.warning("%s holds no state for %r; it starts fresh", path, key)
        if engine.is_main:
            self._prune_orphan_exports(state)
        engine.barrier()
        log.info("resumed from %s (step %d)", path, state.step)
        return state

    def _load(self, engine: Engine, path: Path) -> tuple[RankState, LoopState]:
        """Read this rank's state and the loop state of ``path`` and load the engine from it."""
        own = path / f"rank_{engine.rank:05d}.pt"
        if not own.is_file():
            log.warning("%s has no state for rank %d (saved with another world size): using rank 0's data "
                        "position; this rank's random streams restart from rank 0's", path, engine.rank)
            own = path / "rank_00000.pt"
        rank_state = torch.load(own, map_location="cpu", weights_only=True)
        state = LoopState.from_dict(json.loads((path / STATE_FILE).read_text())["loop"])
        engine.load_checkpoint(path / "engine")
        return rank_state, state

    def _newest_intact(self) -> Optional[Path]:
        """The newest complete checkpoint that matches its manifest; newer ones that do not are quarantined
        (their exports of best-k models newer than the one picked are pruned by :meth:`restore`)."""
        for _, path in reversed(complete_checkpoints(self.root)):
            problem = verify_checkpoint(path)
            if problem is None:
                return path
            self._quarantine(path, f"its files do not match its manifest ({problem})")
        return None

    def _quarantine(self, path: Path, why: str) -> None:
        """Rename a bad checkpoint to ``.corrupt-step_N`` (never picked again), with a warning."""
        target = path.with_name(f"{_CORRUPT}{path.name}")
        if target.exists():
            target = path.with_name(f"{_CORRUPT}{path.name}-{time.strftime('%Y%m%dT%H%M%S')}")
        os.replace(path, target)
        fsync_dir(self.root)
        log.warning("checkpoint %s is unusable: %s; moved to %s, falling back to the previous checkpoint",
                    path, why, target)

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


def _free_bytes(path: Path) -> Optional[int]:
    """Free bytes on the filesystem of ``path`` (or of its nearest existing parent)."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            try:
                return shutil.disk_usage(candidate).free
            except OSError:
                return None
    return None


