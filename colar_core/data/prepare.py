"""Turning any supported input into validated ``train/val/test.jsonl`` plus a lineage manifest.

``prepare_data`` is the one way data enters training: it reads (see :mod:`.readers`) or
generates (see :mod:`.synthetic`) records, splits them reproducibly, and writes

* ``out_dir/{train,val,test}.jsonl`` — one ``Record.to_dict()`` per line, keys sorted;
* ``out_dir/manifest.json`` — source, resolved format, counts, skipped records, and sha256
  digests per split plus one overall digest (what a run logs as its data lineage).

Same input and seed give byte-identical files and digests. Files are written atomically
(:func:`colar_core.files.atomic_write_bytes`: temp file, fsync, rename) so an interrupted run never
leaves a half-written split behind.
"""
from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Iterable

from colar_core.files import atomic_write_bytes
from colar_core.hub import is_saved_dataset

from .bundled import resolve_bundled
from .readers import ReadResult, hf_split_names, read_records, resolve_format
from .records import DataError, Record
from .synthetic import builtin_splits

__all__ = ["prepare_data", "write_split", "load_split", "file_digest", "SPLITS"]

SPLITS = ("train", "val", "test")
_SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "dev": "val", "test": "test"}
_BUILTIN_DEFAULTS = {"n_train": 8000, "n_val": 500, "n_test": 500, "difficulty": "easy"}


# --------------------------------------------------------------------------- file helpers


def write_split(records: Iterable[Record], path: str | Path) -> str:
    """Write records as JSONL (sorted keys, UTF-8) atomically; return the sha256 of the bytes."""
    lines = [json.dumps(r.to_dict(), sort_keys=True, ensure_ascii=False) + "\n" for r in records]
    data = "".join(lines).encode("utf-8")
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def load_split(path: str | Path) -> list[Record]:
    """Records from a split written by :func:`write_split` (already validated, so only parsed)."""
    out: list[Record] = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                out.append(Record.from_dict(json.loads(line)))
            except json.JSONDecodeError as err:
                raise DataError(str(path), number, "json", f"invalid JSON: {err.msg}") from None
            except KeyError as err:
                raise DataError(str(path), number, err.args[0], f"missing field '{err.args[0]}'") from None
    return out


def file_digest(path: str | Path) -> str:
    """sha256 hex digest of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------- splitting


def _carve(records: list[Record], fractions: dict[str, float], seed: int) -> dict[str, list[Record]]:
    """Split ``records`` by a seeded shuffle of distinct questions, so a question (and its
    augmented copies) never lands in two splits. ``fractions`` maps the carved splits to their
    share; the rest stays ``train``. Each split keeps the input order."""
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        groups.setdefault(r.question, []).append(i)
    keys = list(groups)
    random.Random(seed).shuffle(keys)
    assigned: dict[str, list[int]] = {s: [] for s in SPLITS}
    start = 0
    for split in ("test", "val"):
        if split in fractions:
            count = round(len(keys) * fractions[split])
            for key in keys[start:start + count]:
                assigned[split].extend(groups[key])
            start += count
    for key in keys[start:]:
        assigned["train"].extend(groups[key])
    return {s: [records[i] for i in sorted(idx)] for s, idx in assigned.items()}


def _fill_missing(source: str, splits: dict[str, ReadResult], val_fraction: float, test_fraction: float,
                  seed: int) -> dict[str, list[Record]]:
    """Records per split, carving any missing val/test out of train."""
    if "train" not in splits:
        raise ValueError(f"{source}: no train split found (have: {', '.join(sorted(splits)) or 'none'})")
    missing = {s: f for s, f in (("val", val_fraction), ("test", test_fraction)) if s not in splits}
    out = {s: list(res.records) for s, res in splits.items()}
    if missing:
        carved = _carve(out["train"], missing, seed)
        out["train"] = carved["train"]
        for s in missing:
            out[s] = carved[s]
    return out


def _split_files(directory: Path) -> dict[str, Path]:
    """``train.* / val.*|valid.*|validation.*|dev.* / test.*`` files in a directory."""
    found: dict[str, Path] = {}
    for path in sorted(directory.iterdir()):
        split = _SPLIT_NAMES.get(path.name.split(".", 1)[0].lower())
        if not path.is_file() or split is None or path.name.startswith("."):
            continue
        if split in found:
            raise ValueError(f"two files for split '{split}' in {directory}: {found[split].name}, {path.name}")
        found[split] = path
    if not found:
        raise ValueError(f"{directory} has no train.*/val.*/test.* files and is not a saved dataset")
    return found


def _check_output(source: str, out: Path) -> None:
    """Refuse an ``out_dir`` that is (under) a file, or where a file to be written is an input file
    (``--input d/train.jsonl --out d`` would overwrite the source with its own split)."""
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise ValueError(f"output directory {out}: {existing} is a file, not a directory")
    path = Path(source)
    if (bundled := resolve_bundled(source)) is not None:
        path = Path(bundled[0])  # a bundled set: its file in the package must not be overwritten either
    if path.is_file():
        inputs = [path]
    elif path.is_dir():
        inputs = [p for p in path.iterdir() if p.is_file()]
    else:
        return  # a hub id or 'builtin': nothing local to overwrite
    inputs_by_path = {p.resolve(): p for p in inputs}
    for name in (*(f"{s}.jsonl" for s in SPLITS), "manifest.json"):
        target = out / name
        if target.resolve() in inputs_by_path:
            raise ValueError(f"output directory {out} would overwrite the input {inputs_by_path[target.resolve()]} "
                             f"(input {source}): write the splits to another directory")


# --------------------------------------------------------------------------- entry point


def prepare_data(input: str, out_dir: str | Path, format: str = "auto", policy: str = "fail",
                 val_fraction: float = 0.1, test_fraction: float = 0.1, seed: int = 0,
                 builtin: dict | None = None) -> dict:
    """Read/generate, split, validate and write the data; return (and write) the manifest.

    ``input``: ``"builtin"`` (the synthetic task; ``builtin`` holds n_train, n_val, n_test, seed,
    difficulty), one file (split by a seeded shuffle using the fractions), a bundled set's name
    (:mod:`.bundled`, e.g. ``"gsm8k-train"``: its file, split the same way), a directory of split
    files (missing val/test carved from train), or a Hugging Face dataset id / saved path (its
    splits when it has them). The manifest's ``source`` is ``input`` as given.
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError("val_fraction and test_fraction must be in [0, 1) and sum to less than 1")
    source = str(input)
    out = Path(out_dir)
    _check_output(source, out)
    extra: dict = {}
    fmt: str | dict[str, str]  # one format, or each split file's when a folder's files differ
    if source == "builtin":
        kwargs = {**_BUILTIN_DEFAULTS, "seed": seed, **(builtin or {})}
        unknown = set(kwargs) - {"n_train", "n_val", "n_test", "seed", "difficulty"}
        if unknown:
            raise ValueError(f"unknown builtin options: {', '.join(sorted(unknown))}")
        split_records = builtin_splits(**kwargs)
        fmt, skipped = "builtin", {s: 0 for s in SPLITS}
        errors: list[str] = []
        extra["builtin"] = kwargs
    else:
        results, fmt = _read_source(source, format, policy)
        split_records = _fill_missing(source, results, val_fraction, test_fraction, seed)
        skipped = {s: results[s].skipped if s in results else 0 for s in SPLITS}
        errors = [e for s in SPLITS if s in results for e in results[s].errors]
        extra.update(seed=seed, val_fraction=val_fraction, test_fraction=test_fraction)

    digests = {s: write_split(split_records[s], out / f"{s}.jsonl") for s in SPLITS}
    overall = hashlib.sha256("".join(f"{s}:{digests[s]}\n" for s in SPLITS).encode()).hexdigest()
    manifest = {
        "source": source,
        "format": fmt,
        "policy": policy,
        "counts": {s: len(split_records[s]) for s in SPLITS},
        "skipped": sum(skipped.values()),
        "skipped_by_split": skipped,
        "skipped_examples": errors[:20],
        "digests": digests,
        "digest": overall,
        **extra,
    }
    atomic_write_bytes(out / "manifest.json", (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    return manifest


def _read_source(source: str, format: str, policy: str) -> tuple[dict[str, ReadResult], str | dict[str, str]]:
    """ReadResults keyed by split name (only ``train`` for a single unsplit source) and the format."""
    path = Path(source)
    if path.is_dir() and not is_saved_dataset(path):
        files = _split_files(path)
        results, formats = {}, {}
        for split, file in files.items():
            formats[split] = resolve_format(str(file), format)
            results[split] = read_records(str(file), formats[split], policy)
        distinct = set(formats.values())
        return results, distinct.pop() if len(distinct) == 1 else formats
    fmt = resolve_format(source, format)
    if fmt != "hf":
        return {"train": read_records(source, fmt, policy)}, fmt
    names = hf_split_names(source)
    if names is None:
        return {"train": read_records(source, "hf", policy)}, fmt
    if len(names) == 1:  # one split, whatever its name: treat it as the whole pool
        return {"train": read_records(source, "hf", policy, split=names[0])}, fmt
    results = {}
    for name in names:
        ours = _SPLIT_NAMES.get(name.lower())
        if ours is None:
            continue  # e.g. "train_no_aug": not one of ours
        if ours in results:
            raise ValueError(f"dataset {source} has two splits mapping to '{ours}'")
        results[ours] = read_records(source, "hf", policy, split=name)
    if not results:
        raise ValueError(f"dataset {source} has no train/validation/test splits (has: {', '.join(names)})")
    return results, fmt
