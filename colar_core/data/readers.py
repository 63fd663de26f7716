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

Each record format is one :class:`DataFormat` entry of :data:`DATA_FORMATS` (name, aliases, how it is
recognised in a file's first record and among a dataset's columns, and how a raw record becomes a
:class:`Record`); the readers, the ``auto`` detection, the Hugging Face layouts and the ``--format``
choices all read that table, so a new data set is one entry. Whether a missing name is a local path
or a hub id is :func:`colar_core.hub.looks_like_path`'s rule.

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
from decimal import Decimal
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from colar_core.hub import DATA_SUFFIXES, is_saved_dataset, looks_like_path

from .bundled import resolve_bundled
from .equations import answer_value, check_equation
from .records import DataError, Record

__all__ = ["DataFormat", "DATA_FORMATS", "FORMATS", "ALIASES", "ReadResult", "known_format", "read_records", "resolve_format",
           "hf_split_names", "hf_layout", "validate_record", "plain_number"]

#: ``format=`` values beside the table's names: detect the format, or read a Hugging Face dataset.
AUTO, HF = "auto", "hf"
#: The format ``auto`` falls back to when no entry recognises a file: its reader names the missing field.
FALLBACK = "jsonl"
_EQUATION = re.compile(r"<<(.*?)>>")
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


# --------------------------------------------------------------------------- one raw record -> Record
# Each takes the raw record (a text line, or a JSON object / dataset row), the id it gets unless it
# names its own, and where it is (file, line or row) for errors.


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


def _own_id(item: dict, rid: str) -> str:
    """The record's own ``id`` when it has a non-empty one, else ``rid``."""
    return str(item["id"]) if item.get("id") not in (None, "") else rid


def _jsonl_record(item: dict, rid: str, source: str, loc: int | str) -> Record:
    """``{"question", "steps" (or "cot"), "answer", "id"?}``."""
    for name in ("question", "steps", "answer"):
        if name not in item and not (name == "steps" and "cot" in item):
            raise DataError(source, loc, name, f"missing field '{name}'")
    steps = item["steps"] if "steps" in item else item["cot"]
    return validate_record(_own_id(item, rid), item["question"], steps, item["answer"], source, loc)


def _gsm8k_record(item: dict, rid: str, source: str, loc: int | str) -> Record:
    """GSM8K: ``question`` and a free-text ``answer``; its ``<<expr=value>>`` annotations are the steps."""
    _require(item, ("question", "answer"), source, loc)
    solution = item["answer"]
    if not isinstance(solution, str) or "####" not in solution:
        raise DataError(source, loc, "answer", "GSM8K answer has no final '#### answer'")
    body, final = solution.rsplit("####", 1)
    return validate_record(_own_id(item, rid), item["question"], _EQUATION.findall(body), final, source, loc)


# GSM-Hard / SVAMP / MultiArith rows become records without steps, the question built as the reference
# implementation (xiaomi-research/colar, ``data_preprocessing/*.py``) builds it.


def _without_steps(rid: str, question: str, answer: Any, answer_field: str, source: str, loc: int | str) -> Record:
    """An evaluation-set record; an answer error names the set's own field (``target``, ``Answer``, ...)."""
    try:
        return validate_record(rid, question, [], answer, source, loc)
    except DataError as err:
        if err.field != "answer":
            raise
        raise DataError(source, loc, answer_field, err.reason.replace("answer ", f"{answer_field} ", 1)) from None


def _gsm_hard_record(item: dict, rid: str, source: str, loc: int | str) -> Record:
    _require(item, ("input", "target"), source, loc)
    return _without_steps(rid, _text_field(item, "input", source, loc), item["target"], "target", source, loc)


def _svamp_record(item: dict, rid: str, source: str, loc: int | str) -> Record:
    _require(item, ("Body", "Question", "Answer"), source, loc)
    body, ask = _text_field(item, "Body", source, loc), _text_field(item, "Question", source, loc)
    return _without_steps(rid, body.strip(". ") + ". " + ask.strip(), item["Answer"], "Answer", source, loc)


def _multiarith_record(item: dict, rid: str, source: str, loc: int | str) -> Record:
    if "sQuestion" in item or "lSolutions" in item or "final_ans" not in item:  # MultiArith (original)
        _require(item, ("sQuestion", "lSolutions"), source, loc)
        solutions = item["lSolutions"]
        if not isinstance(solutions, (list, tuple)) or not solutions:
            raise DataError(source, loc, "lSolutions", "lSolutions must be a non-empty list of numbers, got "
                            + (f"{type(solutions).__name__}" if not isinstance(solutions, (list, tuple)) else "[]"))
        question = _text_field(item, "sQuestion", source, loc).strip()
        return _without_steps(rid, question, solutions[0], "lSolutions[0]", source, loc)
    _require(item, ("question", "final_ans"), source, loc)  # MultiArith as on the hub (ChilleD/MultiArith)
    question = _text_field(item, "question", source, loc).strip()
    return _without_steps(rid, question, item["final_ans"], "final_ans", source, loc)


# --------------------------------------------------------------------------- the table of formats


@dataclass(frozen=True)
class DataFormat:
    """One record format: everything the readers know of it.

    ``convert(item, rid, source, loc)`` turns one raw record (a text line, or a JSON object when
    ``json``) into a :class:`Record` or raises :class:`DataError` naming the field. ``auto`` picks the
    format from a file's suffix (``suffixes``), else from its first record (``detect``); a Hugging
    Face dataset is read in the first format one of whose ``hf_columns`` sets it has. ``title`` names
    the format in messages.
    """

    name: str
    title: str
    convert: Callable[[Any, str, str, int | str], Record]
    detect: Callable[[Any], bool]
    aliases: tuple[str, ...] = ()
    json: bool = True
    suffixes: tuple[str, ...] = ()
    hf_columns: tuple[tuple[str, ...], ...] = ()


def _fields(test: Callable[[dict], bool]) -> Callable[[Any], bool]:
    """``detect`` of a JSON format: the first record is an object and ``test`` holds for it."""
    return lambda first: isinstance(first, dict) and test(first)


def _table(*formats: DataFormat) -> dict[str, DataFormat]:
    """The formats by name, refusing a name or alias given twice (or one of ``auto``, ``hf``)."""
    names = [n for f in formats for n in (f.name, *f.aliases)]
    clash = {n for n in names if names.count(n) > 1} | ({AUTO, HF} & set(names))
    if clash:
        raise ValueError(f"format names or aliases used twice: {sorted(clash)}")
    return {f.name: f for f in formats}


#: Every record format, in the order ``auto`` tries them (and ``--format`` lists them). The functions
#: here read it when called; :data:`FORMATS` and :data:`ALIASES` are taken from it at import.
DATA_FORMATS: dict[str, DataFormat] = _table(
    DataFormat("gsm8k-aug", "GSM8k-Aug", _parse_aug_line, lambda first: isinstance(first, str) and "||" in first,
               aliases=("aug", "icot", "txt"), json=False, suffixes=(".txt",)),
    DataFormat("jsonl", "jsonl style", _jsonl_record, _fields(lambda r: "steps" in r or "cot" in r), aliases=("json",),
               hf_columns=(("question", "answer", "steps"), ("question", "answer", "cot"))),
    DataFormat("gsm8k", "GSM8K", _gsm8k_record,
               _fields(lambda r: isinstance(r.get("answer"), str) and "####" in r["answer"]),
               hf_columns=(("question", "answer"),)),
    DataFormat("gsm-hard", "GSM-Hard", _gsm_hard_record, _fields(lambda r: "input" in r and "target" in r),
               aliases=("gsmhard", "gsm_hard"), hf_columns=(("input", "target"),)),
    DataFormat("svamp", "SVAMP", _svamp_record, _fields(lambda r: "Body" in r and "Question" in r),
               hf_columns=(("Body", "Question", "Answer"),)),
    DataFormat("multiarith", "MultiArith", _multiarith_record,
               _fields(lambda r: "sQuestion" in r or "lSolutions" in r or ("question" in r and "final_ans" in r)),
               hf_columns=(("sQuestion", "lSolutions"), ("question", "final_ans"))),
)


def _format_names() -> tuple[str, ...]:
    return (AUTO, *DATA_FORMATS, HF)


def _aliases() -> dict[str, str]:
    return {alias: f.name for f in DATA_FORMATS.values() for alias in f.aliases}


#: Every ``format=`` value (``--format`` choices): ``auto``, the table's names, ``hf``.
FORMATS = _format_names()
#: Other names of the table's formats (``aug`` -> ``gsm8k-aug``, ...).
ALIASES = _aliases()


def known_format(name: str) -> str:
    """``name`` if it is one of :data:`FORMATS` or :data:`ALIASES` (a config field's check), else ValueError
    listing the formats."""
    if name not in FORMATS and name not in ALIASES:
        raise ValueError(f"unknown format {name!r}; one of {', '.join(FORMATS)}")
    return name


# --------------------------------------------------------------------------- format resolution


def resolve_format(source: str, format: str = AUTO) -> str:
    """The concrete format for ``source`` (any of :data:`FORMATS` but ``auto``); a bundled set's
    name resolves to that set's format."""
    fmt = _aliases().get(format, format)
    if fmt not in _format_names():
        raise ValueError(f"unknown format '{format}'; expected one of {', '.join(_format_names())}")
    if fmt != AUTO:
        return fmt
    source = str(source)
    if (bundled := resolve_bundled(source)) is not None:
        return bundled[1]
    path = Path(source)
    if path.is_dir():
        if is_saved_dataset(path):
            return HF
        raise DataError(source, None, None, "directory is not a saved Hugging Face dataset "
                        "(use prepare_data for a directory of split files)")
    if not path.exists():
        if looks_like_path(source, DATA_SUFFIXES):
            raise DataError(source, None, None, "file not found")
        return HF  # otherwise it names a Hugging Face hub dataset
    suffix = path.suffix.lower()
    for entry in DATA_FORMATS.values():
        if suffix in entry.suffixes:
            return entry.name
    first = _first_item(source)
    for entry in DATA_FORMATS.values():
        if entry.detect(first):
            return entry.name
    return FALLBACK


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


def hf_layout(source: str, columns: Iterable[str]) -> str:
    """The format whose ``hf_columns`` a Hugging Face dataset's columns hold (``DataError`` naming them
    if none).

    Column sets as the hub's copies of the sets have them (as far as known offline: the reference
    implementation loads ``openai/gsm8k`` this way; the others follow the sets' original files and
    the hub cards): ``openai/gsm8k`` question/answer, ``reasoning-machines/gsm-hard``
    input/code/target, ``ChilleD/SVAMP`` ID/Body/Question/Equation/Answer/Type (+question_concat),
    ``ChilleD/MultiArith`` question/final_ans.
    """
    cols = set(columns)
    for entry in DATA_FORMATS.values():
        if any(cols.issuperset(needed) for needed in entry.hf_columns):
            return entry.name
    expected = ", ".join(" or ".join("+".join(needed) for needed in entry.hf_columns) + f" ({entry.title})"
                         for entry in DATA_FORMATS.values() if entry.hf_columns)
    raise DataError(source, None, "columns", f"no known layout in columns {sorted(cols)}: expected {expected}")


# --------------------------------------------------------------------------- file readers
# They yield either a Record or a DataError (so the policy decides); structural errors raise.


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


def _read_file(source: str, fmt: DataFormat, label: str | None = None) -> Iterator[Record | DataError]:
    """The records of one file in format ``fmt``; ids are ``<label or file name>:<line or row>``."""
    base = label or os.path.basename(source)
    items = _json_items(source) if fmt.json else _text_lines(source)
    for loc, item in items:
        if isinstance(item, DataError):
            yield item
            continue
        tag = loc.replace(" ", "") if isinstance(loc, str) else loc
        try:
            yield _convert(fmt, item, f"{base}:{tag}", source, loc)
        except DataError as err:
            yield err


def _convert(fmt: DataFormat, item: Any, rid: str, source: str, loc: int | str) -> Record:
    if fmt.json and not isinstance(item, dict):
        raise DataError(source, loc, "json", f"expected a JSON object, got {type(item).__name__}")
    return fmt.convert(item, rid, source, loc)


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
    fmt = DATA_FORMATS[hf_layout(source, ds.column_names)]
    name = os.path.basename(os.path.normpath(source)) if Path(source).is_dir() else source
    prefix = f"{name}:{split}" if split else name
    if len(ds) == 0:
        raise DataError(source, None, None, "dataset is empty: no records")
    for index, row in enumerate(ds):
        try:
            yield _convert(fmt, row, f"{prefix}:{index}", source, f"row {index}")
        except DataError as err:
            yield err


# --------------------------------------------------------------------------- entry point


def read_records(source: str, format: str = AUTO, policy: str = "fail", split: str | None = None) -> ReadResult:
    """Read and validate every record of ``source`` (a path, a hub id or a bundled set's name such
    as ``"svamp"``); see the module docstring for formats."""
    if policy not in ("fail", "skip"):
        raise ValueError(f"unknown policy '{policy}'; expected 'fail' or 'skip'")
    source = str(source)
    fmt = resolve_format(source, format)
    label = None
    if (bundled := resolve_bundled(source)) is not None:
        label, source = source, bundled[0]  # ids say the set's name ("svamp:row0"), errors the file
    items = _read_hf(source, split) if fmt == HF else _read_file(source, DATA_FORMATS[fmt], label)
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
