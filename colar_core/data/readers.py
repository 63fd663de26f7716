"""Reading problems from the formats people actually have, with errors that say where.

Formats (``format=``):

* ``gsm8k-aug`` — the iCoT text release, one problem a line:
  ``question||<<16-3-4=9>> <<9*2=18>> #### 18``. A line may have no equations at all.
* ``jsonl`` — JSON lines (or a ``.json`` file holding a list) with ``question``, ``steps``
  (list of equation strings) and ``answer``; ``id`` is optional.
* ``gsm8k`` — the original GSM8K JSONL: ``question`` plus a free-text ``answer`` with
  ``<<expr=value>>`` calculator annotations and a final ``#### answer``; only the annotations
  are kept as steps (the paper's GSM8k-Aug convention).
* ``gsm-hard`` — GSM-Hard (PAL) JSON lines ``{"input", "code", "target"}``: ``input`` is the
  question, the number ``target`` the answer (``-9867630.0`` -> ``"-9867630"``).
* ``svamp`` — SVAMP, a JSON list of ``{"Body", "Question", "Answer", ...}``; the question is
  ``Body.strip(". ") + ". " + Question.strip()``, as the reference implementation builds it.
* ``multiarith`` — MultiArith, a JSON list of ``{"sQuestion", "lSolutions", ...}``; question
  ``sQuestion`` (stripped), answer ``lSolutions[0]``. (``question`` + ``final_ans`` too, the hub copy.)
* ``hf`` — a Hugging Face dataset: a directory written by ``save_to_disk`` or a hub id. The layout
  is detected from the columns: ``question``/``answer`` with ``steps``/``cot`` (jsonl style) or
  without (GSM8K, ``openai/gsm8k``), ``input``/``target`` (GSM-Hard, ``reasoning-machines/gsm-hard``),
  ``Body``/``Question``/``Answer`` (SVAMP, ``ChilleD/SVAMP``), ``sQuestion``/``lSolutions`` or
  ``question``/``final_ans`` (MultiArith, ``ChilleD/MultiArith``).
* ``auto`` — decided from the path (extension, directory contents) and the first record's fields.

``source`` may also name a bundled set (:mod:`.bundled`: ``gsm8k-train``, ``svamp``, ...); an
existing local path of that name wins. GSM-Hard, SVAMP and MultiArith are evaluation sets: their
records have no equation steps (``steps=()``), as a GSM8k-Aug line without equations has none.
A numeric answer is written as a plain number: ``51.0`` -> ``"51"``, ``3244047.0999999996`` as is.

Every record is validated the same way (non-empty question, numeric answer, each step an
equation that holds; a line over ``MAX_LINE_BYTES``, JSON nested too deeply, a number too large or
an expression too long to evaluate is a bad record). ``policy="fail"`` raises the first
:class:`DataError`; ``"skip"`` drops bad records, counting them and keeping their messages.
Structural problems (missing or empty file, a DatasetDict without a chosen split, a file whose every
record is bad) always raise.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from decimal import Decimal
from typing import Any, Iterable, Iterator

from .bundled import resolve_bundled
from .equations import answer_value, check_equation
from .records import DataError, Record

__all__ = ["ReadResult", "read_records", "resolve_format", "hf_split_names", "hf_layout", "validate_record",
           "plain_number", "FORMATS", "JSON_FORMATS"]

FORMATS = ("auto", "gsm8k-aug", "jsonl", "gsm8k", "gsm-hard", "svamp", "multiarith", "hf")
_ALIASES = {"aug": "gsm8k-aug", "icot": "gsm8k-aug", "txt": "gsm8k-aug", "json": "jsonl",
            "gsmhard": "gsm-hard", "gsm_hard": "gsm-hard"}
#: Formats read from JSON lines or a ``.json`` list, one object a record.
JSON_FORMATS = ("jsonl", "gsm8k", "gsm-hard", "svamp", "multiarith")
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
        answer = plain_number(answer)
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


def plain_number(value: int | float) -> str:
    """A JSON number as answer text: integral values without ``.0`` (``51.0`` -> ``"51"``), others
    in their shortest exact decimal form, never in exponent notation (``1e-05`` -> ``"0.00001"``)."""
    if isinstance(value, int):
        return str(value)
    if not math.isfinite(value):
        return str(value)  # refused by answer_value: 'nan' is not a number
    if value == int(value) and abs(value) < 2 ** 53:
        return str(int(value))
    text = format(Decimal(repr(value)), "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def _split_steps_text(text: str) -> list[str]:
    """Equations from a steps string: the ``<<…>>`` spans if any, else whitespace-separated items."""
    found = _EQUATION.findall(text)
    if found:
        return found
    return text.split()


# --------------------------------------------------------------------------- format resolution


def resolve_format(source: str, format: str = "auto") -> str:
    """The concrete format for ``source`` (any of :data:`FORMATS` but ``auto``); a bundled set's
    name resolves to that set's format."""
    fmt = _ALIASES.get(format, format)
    if fmt not in FORMATS:
        raise ValueError(f"unknown format '{format}'; expected one of {', '.join(FORMATS)}")
    if fmt != "auto":
        return fmt
    source = str(source)
    if (bundled := resolve_bundled(source)) is not None:
        return bundled[1]
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
        return _json_format(first)
    if isinstance(first, str) and "||" in first:
        return "gsm8k-aug"
    return "jsonl"


def _json_format(first: dict) -> str:
    """The JSON format whose fields the first record has (``jsonl`` when none fits: its reader then
    names the missing field)."""
    if "steps" in first or "cot" in first:
        return "jsonl"
    if isinstance(first.get("answer"), str) and "####" in first["answer"]:
        return "gsm8k"
    if "input" in first and "target" in first:
        return "gsm-hard"
    if "Body" in first and "Question" in first:
        return "svamp"
    if "sQuestion" in first or "lSolutions" in first or ("question" in first and "final_ans" in first):
        return "multiarith"
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


def _read_gsm8k_aug(source: str, label: str | None = None) -> Iterator[Record | DataError]:
    base = label or os.path.basename(source)
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


def _read_json(source: str, fmt: str, label: str | None = None) -> Iterator[Record | DataError]:
    base = label or os.path.basename(source)
    for loc, item in _json_items(source):
        if isinstance(item, DataError):
            yield item
            continue
        tag = loc.replace(" ", "") if isinstance(loc, str) else loc
        try:
            yield _from_mapping(item, f"{base}:{tag}", source, loc, fmt)
        except DataError as err:
            yield err


def _require(item: dict, names: Iterable[str], source: str, loc: int | str) -> None:
    for name in names:
        if name not in item:
            raise DataError(source, loc, name, f"missing field '{name}'")


def _text_field(item: dict, name: str, source: str, loc: int | str) -> str:
    """``item[name]`` as it is; a DataError naming the field unless it is a non-empty string."""
    value = item[name]
    if not isinstance(value, str):
        raise DataError(source, loc, name, f"{name} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(source, loc, name, f"{name} is empty")
    return value


def _eval_set_record(item: dict, rid: str, source: str, loc: int | str, fmt: str) -> Record:
    """GSM-Hard / SVAMP / MultiArith row → Record without steps, with the question built as the
    reference implementation (xiaomi-research/colar, ``data_preprocessing/*.py``) builds it."""
    if fmt == "gsm-hard":
        _require(item, ("input", "target"), source, loc)
        question, answer, answer_field = _text_field(item, "input", source, loc), item["target"], "target"
    elif fmt == "svamp":
        _require(item, ("Body", "Question", "Answer"), source, loc)
        body, ask = _text_field(item, "Body", source, loc), _text_field(item, "Question", source, loc)
        question, answer, answer_field = body.strip(". ") + ". " + ask.strip(), item["Answer"], "Answer"
    elif "sQuestion" in item or "lSolutions" in item or "final_ans" not in item:  # MultiArith (original)
        _require(item, ("sQuestion", "lSolutions"), source, loc)
        solutions = item["lSolutions"]
        if not isinstance(solutions, (list, tuple)) or not solutions:
            raise DataError(source, loc, "lSolutions", "lSolutions must be a non-empty list of numbers, got "
                            + (f"{type(solutions).__name__}" if not isinstance(solutions, (list, tuple)) else "[]"))
        question, answer, answer_field = _text_field(item, "sQuestion", source, loc).strip(), solutions[0], "lSolutions[0]"
    else:  # MultiArith as on the hub (ChilleD/MultiArith): question, final_ans
        _require(item, ("question", "final_ans"), source, loc)
        question, answer, answer_field = _text_field(item, "question", source, loc).strip(), item["final_ans"], "final_ans"
    try:
        return validate_record(rid, question, [], answer, source, loc)
    except DataError as err:
        if err.field != "answer":
            raise
        raise DataError(source, loc, answer_field, err.reason.replace("answer ", f"{answer_field} ", 1)) from None


def _from_mapping(item: Any, rid: str, source: str, loc: int | str, fmt: str) -> Record:
    """A JSON object / dataset row → Record in the layout of ``fmt`` (one of :data:`JSON_FORMATS`)."""
    if not isinstance(item, dict):
        raise DataError(source, loc, "json", f"expected a JSON object, got {type(item).__name__}")
    if fmt not in ("jsonl", "gsm8k"):
        return _eval_set_record(item, rid, source, loc, fmt)
    gsm8k = fmt == "gsm8k"
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
    fmt = hf_layout(source, ds.column_names)
    name = os.path.basename(os.path.normpath(source)) if Path(source).is_dir() else source
    prefix = f"{name}:{split}" if split else name
    if len(ds) == 0:
        raise DataError(source, None, None, "dataset is empty: no records")
    for index, row in enumerate(ds):
        try:
            yield _from_mapping(row, f"{prefix}:{index}", source, f"row {index}", fmt)
        except DataError as err:
            yield err


def hf_layout(source: str, columns: Iterable[str]) -> str:
    """The JSON format a Hugging Face dataset's columns match (``DataError`` naming them if none).

    Column sets as the hub's copies of the sets have them (as far as known offline: the reference
    implementation loads ``openai/gsm8k`` this way; the others follow the sets' original files and
    the hub cards): ``openai/gsm8k`` question/answer, ``reasoning-machines/gsm-hard``
    input/code/target, ``ChilleD/SVAMP`` ID/Body/Question/Equation/Answer/Type (+question_concat),
    ``ChilleD/MultiArith`` question/final_ans.
    """
    cols = set(columns)
    if "question" in cols and "answer" in cols:
        return "jsonl" if "steps" in cols or "cot" in cols else "gsm8k"
    if {"input", "target"} <= cols:
        return "gsm-hard"
    if {"Body", "Question", "Answer"} <= cols:
        return "svamp"
    if {"sQuestion", "lSolutions"} <= cols or {"question", "final_ans"} <= cols:
        return "multiarith"
    raise DataError(source, None, "columns", f"no known layout in columns {sorted(cols)}: expected question+answer "
                    "(GSM8K; with steps or cot: jsonl style), input+target (GSM-Hard), Body+Question+Answer "
                    "(SVAMP), sQuestion+lSolutions or question+final_ans (MultiArith)")


# --------------------------------------------------------------------------- entry point


def read_records(source: str, format: str = "auto", policy: str = "fail", split: str | None = None) -> ReadResult:
    """Read and validate every record of ``source`` (a path, a hub id or a bundled set's name such
    as ``"svamp"``); see the module docstring for formats."""
    if policy not in ("fail", "skip"):
        raise ValueError(f"unknown policy '{policy}'; expected 'fail' or 'skip'")
    source = str(source)
    fmt = resolve_format(source, format)
    label = None
    if (bundled := resolve_bundled(source)) is not None:
        label, source = source, bundled[0]  # ids say the set's name ("svamp:row0"), errors the file
    items: Iterable[Record | DataError]
    if fmt == "gsm8k-aug":
        items = _read_gsm8k_aug(source, label)
    elif fmt in JSON_FORMATS:
        items = _read_json(source, fmt, label)
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
