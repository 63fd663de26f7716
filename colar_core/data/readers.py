"""Reading problems from the formats people actually have, with errors that say where.

Formats (``format=``):

* ``gsm8k-aug`` — the iCoT text release, one problem a line:
  ``question||<<16-3-4=9>> <<9*2=18>> #### 18``. A line may have no equations at all.
* ``jsonl`` — JSON lines (or a ``.json`` file holding a list) with ``question``, ``steps``
  (list of equation strings) and ``answer``; ``id`` is optional.
* ``gsm8k`` — the original GSM8K JSONL: ``question`` plus a free-text ``answer`` with
  ``<<expr=value>>`` calculator annotations and a final ``#### answer``; only the annotations
  are kept as steps (the paper's GSM8k-Aug convention).
* ``hf`` — a Hugging Face dataset: a directory written by ``save_to_disk`` or a hub id. Columns
  are detected per dataset: ``steps``/``cot`` (jsonl style) or an ``answer`` with ``####``.
* ``auto`` — decided from the path (extension, directory contents) and the first record.

Every record is validated the same way (non-empty question, numeric answer, each step an
equation that holds; a line over ``MAX_LINE_BYTES``, JSON nested too deeply, a number too large or
an expression too long to evaluate is a bad record). ``policy="fail"`` raises the first
:class:`DataError`; ``"skip"`` drops bad records, counting them and keeping their messages.
Structural problems (missing or empty file, a DatasetDict without a chosen split, a file whose every
record is bad) always raise.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from .equations import answer_value, check_equation
from .records import DataError, Record

__all__ = ["ReadResult", "read_records", "resolve_format", "hf_split_names", "validate_record", "FORMATS"]

FORMATS = ("auto", "gsm8k-aug", "jsonl", "gsm8k", "hf")
_ALIASES = {"aug": "gsm8k-aug", "icot": "gsm8k-aug", "txt": "gsm8k-aug", "json": "jsonl"}
_EQUATION = re.compile(r"<<(.*?)>>")
#: Files that mark a directory written by ``datasets``' ``save_to_disk``.
HF_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
#: A line (one record) longer than this is refused: a reasoning problem is a few KB, and a runaway
#: line (a binary blob, a file without newlines) would otherwise reach the tokenizer and the GPU.
MAX_LINE_BYTES = 1 << 20
_TOO_DEEP = "invalid JSON: nested too deeply to read"


@dataclass
class ReadResult:
    """Records read, how many were skipped, and the messages explaining each skip."""

    records: list[Record]
    skipped: int = 0
    errors: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- validation


def validate_record(rid: str, question: Any, steps: Any, answer: Any, source: str, loc: int | str | None) -> Record:
    """Build a :class:`Record` from raw field values or raise :class:`DataError` naming the field.

    Accepts ``steps`` as a list of strings (``<<…>>`` wrappers are removed) or one string of
    equations; ``answer`` may be a JSON number. This is the single validation every reader (and
    the synthetic generator's tests) use.
    """
    if not isinstance(question, str) or not question.strip():
        raise DataError(source, loc, "question", "question is empty" if isinstance(question, str) else
                        f"question must be a string, got {type(question).__name__}")
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    if not isinstance(answer, str) or not answer.strip():
        raise DataError(source, loc, "answer", "answer is empty" if isinstance(answer, str) else
                        f"answer must be a string or number, got {type(answer).__name__}")
    answer = answer.strip()
    try:
        answer_value(answer)
    except ValueError as err:
        raise DataError(source, loc, "answer", str(err)) from None
    if isinstance(steps, str):
        steps = _split_steps_text(steps)
    if not isinstance(steps, (list, tuple)):
        raise DataError(source, loc, "steps", f"steps must be a list of strings, got {type(steps).__name__}")
    clean: list[str] = []
    for i, step in enumerate(steps):
        if not isinstance(step, str):
            raise DataError(source, loc, f"steps[{i}]", f"step must be a string, got {type(step).__name__}")
        eq = step.strip()
        if eq.startswith("<<") and eq.endswith(">>"):
            eq = eq[2:-2].strip()
        if not eq:
            raise DataError(source, loc, f"steps[{i}]", "step is empty")
        try:
            check_equation(eq)
        except ValueError as err:
            raise DataError(source, loc, f"steps[{i}]", str(err)) from None
        clean.append(eq)
    return Record(id=str(rid), question=question.strip(), steps=tuple(clean), answer=answer)


def _split_steps_text(text: str) -> list[str]:
    """Equations from a steps string: the ``<<…>>`` spans if any, else whitespace-separated items."""
    found = _EQUATION.findall(text)
    if found:
        return found
    return text.split()


# --------------------------------------------------------------------------- format resolution


def resolve_format(source: str, format: str = "auto") -> str:
    """The concrete format for ``source`` (one of ``gsm8k-aug``, ``jsonl``, ``gsm8k``, ``hf``)."""
    fmt = _ALIASES.get(format, format)
    if fmt not in FORMATS:
        raise ValueError(f"unknown format '{format}'; expected one of {', '.join(FORMATS)}")
    if fmt != "auto":
        return fmt
    path = Path(source)
    if path.is_dir():
        if any((path / m).exists() for m in HF_MARKERS):
            return "hf"
        raise DataError(source, None, None, "directory is not a saved Hugging Face dataset "
                        "(use prepare_data for a directory of split files)")
    if not path.exists():
        if path.suffix.lower() in (".txt", ".jsonl", ".json") or str(source).startswith(("/", ".", "~")):
            raise DataError(source, None, None, "file not found")
        return "hf"  # otherwise it names a Hugging Face hub dataset
    if path.suffix.lower() == ".txt":
        return "gsm8k-aug"
    first = _first_item(source)
    if isinstance(first, dict):
        if "steps" in first or "cot" in first:
            return "jsonl"
        if isinstance(first.get("answer"), str) and "####" in first["answer"]:
            return "gsm8k"
        return "jsonl"
    if isinstance(first, str) and "||" in first:
        return "gsm8k-aug"
    return "jsonl"


def _first_item(source: str) -> Any:
    """The first record-like thing in a file (a dict for JSON, else the first text line)."""
    with open(source, "rb") as fh:
        head = fh.read(1 << 16).decode("utf-8", errors="replace").lstrip("\ufeff")
    stripped = head.lstrip()
    line = next((ln for ln in head.splitlines() if ln.strip()), "")
    if stripped.startswith("{"):
        try:
            return json.loads(line)
        except (json.JSONDecodeError, RecursionError):  # the reader reports it, at its line
            return line
    if stripped.startswith("["):
        try:
            items = json.loads(Path(source).read_text(encoding="utf-8"))
            return items[0] if isinstance(items, list) and items else None
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            return None
    return line


# --------------------------------------------------------------------------- file readers
# Each yields either a Record or a DataError (so the policy decides); structural errors raise.


def _text_lines(source: str) -> Iterator[tuple[int, str | DataError]]:
    """Non-blank lines with 1-based numbers; undecodable lines come back as DataError."""
    try:
        data = Path(source).read_bytes()
    except FileNotFoundError:
        raise DataError(source, None, None, "file not found") from None
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    any_line = False
    for number, raw in enumerate(data.split(b"\n"), start=1):
        raw = raw.rstrip(b"\r")
        if not raw.strip():
            continue
        any_line = True
        if len(raw) > MAX_LINE_BYTES:
            yield number, DataError(source, number, "record",
                                    f"line is {len(raw):,} bytes, over the {MAX_LINE_BYTES:,}-byte limit of one record")
            continue
        try:
            yield number, raw.decode("utf-8")
        except UnicodeDecodeError as err:
            yield number, DataError(source, number, "encoding",
                                    f"invalid UTF-8 byte 0x{raw[err.start]:02x} at column {err.start + 1}")
    if not any_line:
        raise DataError(source, None, None, "file is empty: no records")


def _read_gsm8k_aug(source: str) -> Iterator[Record | DataError]:
    base = os.path.basename(source)
    for number, line in _text_lines(source):
        if isinstance(line, DataError):
            yield line
            continue
        try:
            yield _parse_aug_line(line, f"{base}:{number}", source, number)
        except DataError as err:
            yield err


def _parse_aug_line(line: str, rid: str, source: str, loc: int | str) -> Record:
    """One ``question||<<eq>> <<eq>> #### answer`` line → Record."""
    if "||" not in line:
        raise DataError(source, loc, "question", "missing '||' between question and steps")
    question, rest = line.rsplit("||", 1)
    if "####" not in rest:
        raise DataError(source, loc, "answer", "missing '#### answer' after the steps")
    steps_text, answer = rest.rsplit("####", 1)
    leftover = _EQUATION.sub(" ", steps_text).strip()
    if leftover and "<<" in steps_text:
        raise DataError(source, loc, "steps", f"text outside <<...>> in steps: '{leftover[:40]}'")
    return validate_record(rid, question, _split_steps_text(steps_text), answer, source, loc)


def _json_items(source: str) -> Iterator[tuple[int | str, dict | DataError]]:
    """Objects from JSON lines, or from a ``.json`` file holding one list (located as ``row N``)."""
    if Path(source).suffix.lower() == ".json":
        try:
            data = Path(source).read_bytes()
        except FileNotFoundError:
            raise DataError(source, None, None, "file not found") from None
        text = data.decode("utf-8", errors="replace").lstrip("\ufeff")
        if not text.strip():
            raise DataError(source, None, None, "file is empty: no records")
        if text.lstrip().startswith("["):
            try:
                items = json.loads(data.decode("utf-8").lstrip("\ufeff"))
            except UnicodeDecodeError as err:
                raise DataError(source, data.count(b"\n", 0, err.start) + 1, "encoding",
                                f"invalid UTF-8 byte 0x{data[err.start]:02x}") from None
            except json.JSONDecodeError as err:
                raise DataError(source, err.lineno, "json", f"invalid JSON: {err.msg} (column {err.colno})") from None
            except RecursionError:
                raise DataError(source, None, "json", _TOO_DEEP) from None
            if not items:
                raise DataError(source, None, None, "file is empty: no records")
            for index, item in enumerate(items):
                yield f"row {index}", item
            return
    for number, line in _text_lines(source):
        if isinstance(line, DataError):
            yield number, line
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as err:
            yield number, DataError(source, number, "json", f"invalid JSON: {err.msg} (column {err.colno})")
        except RecursionError:
            yield number, DataError(source, number, "json", _TOO_DEEP)


def _read_json(source: str, gsm8k: bool) -> Iterator[Record | DataError]:
    base = os.path.basename(source)
    for loc, item in _json_items(source):
        if isinstance(item, DataError):
            yield item
            continue
        tag = loc.replace(" ", "") if isinstance(loc, str) else loc
        try:
            yield _from_mapping(item, f"{base}:{tag}", source, loc, gsm8k)
        except DataError as err:
            yield err


def _from_mapping(item: Any, rid: str, source: str, loc: int | str, gsm8k: bool) -> Record:
    """A JSON object / dataset row → Record, in jsonl style or GSM8K free-text style."""
    if not isinstance(item, dict):
        raise DataError(source, loc, "json", f"expected a JSON object, got {type(item).__name__}")
    for name in ("question", "answer") if gsm8k else ("question", "steps", "answer"):
        if name not in item and not (name == "steps" and "cot" in item):
            raise DataError(source, loc, name, f"missing field '{name}'")
    rid = str(item["id"]) if item.get("id") not in (None, "") else rid
    if gsm8k:
        solution = item["answer"]
        if not isinstance(solution, str) or "####" not in solution:
            raise DataError(source, loc, "answer", "GSM8K answer has no final '#### answer'")
        body, final = solution.rsplit("####", 1)
        return validate_record(rid, item["question"], _EQUATION.findall(body), final, source, loc)
    steps = item["steps"] if "steps" in item else item["cot"]
    return validate_record(rid, item["question"], steps, item["answer"], source, loc)


# --------------------------------------------------------------------------- Hugging Face


def _load_hf(source: str, split: str | None):
    """The dataset (or DatasetDict); a hub id that cannot be reached or found (offline, no network,
    no such id) is a :class:`DataError` naming it, not a ``ConnectionError`` traceback."""
    import datasets  # heavy import, only when needed

    if Path(source).is_dir():
        return datasets.load_from_disk(source)
    try:
        return datasets.load_dataset(source, split=split)
    except (OSError, ValueError) as err:  # ConnectionError, DatasetNotFoundError, HFValidationError ...
        first = (str(err).strip().splitlines() or [""])[0][:200]
        raise DataError(source, None, None, f"cannot load the Hugging Face dataset: {type(err).__name__}: "
                        f"{first}") from None


def hf_split_names(source: str) -> list[str] | None:
    """Split names of a saved/hub DatasetDict, or ``None`` for a single Dataset."""
    ds = _load_hf(source, None)
    return list(ds.keys()) if hasattr(ds, "keys") else None


def _read_hf(source: str, split: str | None) -> Iterator[Record | DataError]:
    ds = _load_hf(source, split)
    if hasattr(ds, "keys"):  # DatasetDict
        names = list(ds.keys())
        if split is None and len(names) == 1:
            split = names[0]
        if split not in names:
            raise DataError(source, None, "split", f"choose a split with split=...; available: {', '.join(names)}")
        ds = ds[split]
    cols = set(ds.column_names)
    if "question" not in cols or "answer" not in cols:
        raise DataError(source, None, "question" if "question" not in cols else "answer",
                        f"dataset needs 'question' and 'answer' columns; has {sorted(cols)}")
    gsm8k = "steps" not in cols and "cot" not in cols
    name = os.path.basename(os.path.normpath(source)) if Path(source).is_dir() else source
    prefix = f"{name}:{split}" if split else name
    if len(ds) == 0:
        raise DataError(source, None, None, "dataset is empty: no records")
    for index, row in enumerate(ds):
        try:
            yield _from_mapping(row, f"{prefix}:{index}", source, f"row {index}", gsm8k)
        except DataError as err:
            yield err


# --------------------------------------------------------------------------- entry point


def read_records(source: str, format: str = "auto", policy: str = "fail", split: str | None = None) -> ReadResult:
    """Read and validate every record of ``source``; see the module docstring for formats."""
    if policy not in ("fail", "skip"):
        raise ValueError(f"unknown policy '{policy}'; expected 'fail' or 'skip'")
    source = str(source)
    fmt = resolve_format(source, format)
    items: Iterable[Record | DataError]
    if fmt == "gsm8k-aug":
        items = _read_gsm8k_aug(source)
    elif fmt in ("jsonl", "gsm8k"):
        items = _read_json(source, gsm8k=fmt == "gsm8k")
    else:
        items = _read_hf(source, split)
    result = ReadResult(records=[])
    for item in items:
        if isinstance(item, DataError):
            if policy == "fail":
                raise item
            result.skipped += 1
            result.errors.append(str(item))
        else:
            result.records.append(item)
    if not result.records:  # only under skip: every record was bad, and 0 records is not a dataset
        raise DataError(source, None, None, f"no valid records: all {result.skipped:,} records are bad "
                        f"(first: {result.errors[0]})")
    return result
