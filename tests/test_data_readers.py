"""Readers: real GSM8k-Aug files, every malformed input located by file/line/field, policies,
GSM8K free-text conversion, JSON lists, Hugging Face datasets saved to disk, and the table of
formats that drives them all."""
import json
from pathlib import Path

import pytest

from colar_core.data import DataError, Record, read_records, readers, resolve_format, validate_record
from colar_core.data.bundled import SETS_DIR
from colar_core.data.readers import ALIASES, FORMATS, DataFormat

REAL = SETS_DIR / "gsm8k_aug"  # the GSM8k-Aug files bundled with colar (colar_core/data/bundled.py)


def _write(path: Path, lines: list[str]) -> str:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


def _jsonl(path: Path, rows: list) -> str:
    return _write(path, [r if isinstance(r, str) else json.dumps(r) for r in rows])


GOOD = {"question": "Tom has 3 bags of 4 apples. He eats 2. How many are left?", "steps": ["3*4=12", "12-2=10"], "answer": "10"}


# --------------------------------------------------------------------------- real data

@pytest.mark.parametrize("name, count", [("valid.txt", 500), ("test.txt", 1319)])
def test_real_gsm8k_aug_files_load_completely(name, count):
    path = REAL / name
    result = read_records(str(path), policy="fail")
    assert len(result.records) == count and result.skipped == 0
    assert resolve_format(str(path)) == "gsm8k-aug"
    assert len({r.id for r in result.records}) == count
    no_steps = [r for r in result.records if not r.steps]
    assert no_steps, "the real files contain problems without equations"
    assert all(r.question and r.answer for r in result.records)


def test_real_test_file_keeps_unevaluated_right_side():
    path = REAL / "test.txt"
    records = read_records(str(path)).records
    first = records[0]
    assert first.steps == ("16-3-4=9", "9*2=18") and first.answer == "18"
    assert any("3/4=3/4" in r.steps for r in records)


# --------------------------------------------------------------------------- gsm8k-aug lines

def test_gsm8k_aug_line_parsing(tmp_path):
    src = _write(tmp_path / "d.txt", [
        "Q one?||<<16-3-4=9>> <<9*2=18>> #### 18",
        "Q two with no equations?|| #### 9",
        "Q three?||<<3/4=3/4>> <<1+2=3>> #### 1,450",
    ])
    recs = read_records(src).records
    assert [r.steps for r in recs] == [("16-3-4=9", "9*2=18"), (), ("3/4=3/4", "1+2=3")]
    assert [r.answer for r in recs] == ["18", "9", "1,450"]
    assert recs[0].id == "d.txt:1" and recs[0].question == "Q one?"


@pytest.mark.parametrize("line, field, reason", [
    ("Q?||<<2+2=5>> #### 5", "steps[0]", "equation '2+2=5' evaluates to 4, not 5"),
    ("Q?||<<1+1=2>> <<2+x=3>> #### 3", "steps[1]", "unsupported characters"),
    ("Q?||<<1+1=2>> #### abc", "answer", "answer 'abc' is not a number"),
    ("Q?||<<1+1=2>> ####", "answer", "answer is empty"),
    ("   ||<<1+1=2>> #### 2", "question", "question is empty"),
    ("Q? <<1+1=2>> #### 2", "question", "missing '||'"),
    ("Q?||<<1+1=2>> 2", "answer", "missing '#### answer'"),
])
def test_gsm8k_aug_errors_name_file_line_field(tmp_path, line, field, reason):
    src = _write(tmp_path / "bad.txt", ["Fine?||<<1+1=2>> #### 2", line])
    with pytest.raises(DataError) as info:
        read_records(src)
    msg = str(info.value)
    assert msg.startswith(f"{src}:2: field '{field}': "), msg
    assert reason in msg
    assert info.value.line == 2 and info.value.field == field


# --------------------------------------------------------------------------- jsonl

def test_jsonl_reads_rows_ids_and_json_lists(tmp_path):
    src = _jsonl(tmp_path / "d.jsonl", [GOOD, {**GOOD, "id": "custom", "answer": 10, "steps": ["<<3*4=12>>", "12-2=10"]}])
    recs = read_records(src).records
    assert recs[0].id == "d.jsonl:1" and recs[1].id == "custom"
    assert recs[1].answer == "10" and recs[1].steps == ("3*4=12", "12-2=10")
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps([GOOD, GOOD]), encoding="utf-8")
    assert len(read_records(str(listed)).records) == 2
    assert resolve_format(str(listed)) == "jsonl"


@pytest.mark.parametrize("row, field, reason", [
    ('{"question": "Q", "steps": [', "json", "invalid JSON"),
    ('[1, 2]', "json", "expected a JSON object"),
    ({"steps": [], "answer": "1"}, "question", "missing field 'question'"),
    ({"question": "Q", "answer": "1"}, "steps", "missing field 'steps'"),
    ({"question": "Q", "steps": []}, "answer", "missing field 'answer'"),
    ({"question": "", "steps": [], "answer": "1"}, "question", "question is empty"),
    ({"question": "Q", "steps": ["1+1=2", "2+2=5"], "answer": "5"}, "steps[1]", "evaluates to 4, not 5"),
    ({"question": "Q", "steps": ["1+1=2", "2*=4"], "answer": "4"}, "steps[1]", "does not parse"),
    ({"question": "Q", "steps": ["4/0=1"], "answer": "1"}, "steps[0]", "divides by zero"),
    ({"question": "Q", "steps": "not a list", "answer": "1"}, "steps[0]", "equation 'not' must contain exactly one '='"),
    ({"question": "Q", "steps": {"a": 1}, "answer": "1"}, "steps", "steps must be a list of strings"),
    ({"question": "Q", "steps": [3], "answer": "3"}, "steps[0]", "step must be a string"),
    ({"question": "Q", "steps": [], "answer": "twelve"}, "answer", "answer 'twelve' is not a number"),
])
def test_jsonl_errors_name_file_line_field(tmp_path, row, field, reason):
    src = _jsonl(tmp_path / "train.jsonl", [GOOD, GOOD, row])
    with pytest.raises(DataError) as info:
        read_records(src, format="jsonl")
    msg = str(info.value)
    assert msg.startswith(f"{src}:3: field '{field}': "), msg
    assert reason in msg


def test_message_format_matches_documented_example(tmp_path):
    src = _jsonl(tmp_path / "train.jsonl", [GOOD] * 6 + [{"question": "Q", "steps": ["1+1=2", "2+2=5"], "answer": "5"}])
    with pytest.raises(DataError, match=r"train\.jsonl:7: field 'steps\[1\]': equation '2\+2=5' evaluates to 4, not 5$"):
        read_records(src)


def test_empty_file_is_an_error_naming_the_file(tmp_path):
    for name in ("empty.jsonl", "empty.txt", "blank.jsonl", "empty.json"):
        path = tmp_path / name
        path.write_text("" if "empty" in name else "\n  \n", encoding="utf-8")
        for policy in ("fail", "skip"):
            with pytest.raises(DataError, match=rf"^{path}: .*empty"):
                read_records(str(path), format="jsonl" if "json" in name else "gsm8k-aug", policy=policy)


def test_invalid_utf8_names_the_line(tmp_path):
    path = tmp_path / "bin.jsonl"
    path.write_bytes((json.dumps(GOOD) + "\n").encode() + b'{"question": "caf\xff"}\n')
    with pytest.raises(DataError) as info:
        read_records(str(path))
    assert str(info.value).startswith(f"{path}:2: field 'encoding': invalid UTF-8 byte 0xff")
    skipped = read_records(str(path), policy="skip")
    assert len(skipped.records) == 1 and skipped.skipped == 1


def test_missing_file_is_an_error(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        read_records(str(tmp_path / "nope.jsonl"))


def test_skip_policy_counts_exactly_and_keeps_messages(tmp_path):
    src = _jsonl(tmp_path / "mixed.jsonl", [
        GOOD,
        "{oops",
        {**GOOD, "answer": "n/a"},
        GOOD,
        {**GOOD, "steps": ["2+2=5"]},
        {"question": "   ", "steps": [], "answer": "1"},
    ])
    result = read_records(src, policy="skip")
    assert len(result.records) == 2 and result.skipped == 4
    assert [m.split(": field ")[0] for m in result.errors] == [f"{src}:{n}" for n in (2, 3, 5, 6)]
    assert [r.id for r in result.records] == ["mixed.jsonl:1", "mixed.jsonl:4"]
    with pytest.raises(DataError, match=":2: field 'json'"):
        read_records(src, policy="fail")
    with pytest.raises(ValueError, match="unknown policy"):
        read_records(src, policy="ignore")


# --------------------------------------------------------------------------- gsm8k free text

GSM8K_ROW = {
    "question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many in May. How many clips did Natalia sell altogether in April and May?",
    "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72",
}


def test_gsm8k_free_text_keeps_only_equations(tmp_path):
    src = _jsonl(tmp_path / "gsm8k.jsonl", [GSM8K_ROW, {"question": "Q?", "answer": "No tools here.\n#### 1,000"}])
    assert resolve_format(src) == "gsm8k"
    recs = read_records(src).records
    assert recs[0].steps == ("48/2=24", "48+24=72") and recs[0].answer == "72"
    assert recs[1].steps == () and recs[1].answer == "1,000"


def test_gsm8k_errors(tmp_path):
    src = _jsonl(tmp_path / "g.jsonl", [GSM8K_ROW, {"question": "Q?", "answer": "<<2*3=7>>7\n#### 7"}, {"question": "Q?", "answer": "18"}])
    with pytest.raises(DataError, match=r"g\.jsonl:2: field 'steps\[0\]': equation '2\*3=7' evaluates to 6, not 7"):
        read_records(src, format="gsm8k")
    result = read_records(src, format="gsm8k", policy="skip")
    assert result.skipped == 2 and "g.jsonl:3: field 'answer': GSM8K answer has no final '#### answer'" in result.errors[1]


# --------------------------------------------------------------------------- Hugging Face on disk

def test_hf_saved_dataset_jsonl_style_and_gsm8k_style(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [GOOD, {**GOOD, "question": "Other?", "steps": ["1+1=2"], "answer": "2"}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "single"))
    recs = read_records(str(tmp_path / "single")).records
    assert resolve_format(str(tmp_path / "single")) == "hf"
    assert [r.answer for r in recs] == ["10", "2"] and recs[0].steps == ("3*4=12", "12-2=10")
    assert recs[0].id == "single:0"

    bad = [{"question": "Q?", "answer": "<<2*3=6>>6\n#### 6"}, {"question": "Q?", "answer": "<<2*3=5>>5\n#### 5"}]
    datasets.DatasetDict({"train": datasets.Dataset.from_list([GSM8K_ROW]), "test": datasets.Dataset.from_list(bad)}
                         ).save_to_disk(str(tmp_path / "dict"))
    recs = read_records(str(tmp_path / "dict"), split="train").records
    assert recs[0].steps == ("48/2=24", "48+24=72") and recs[0].id == "dict:train:0"
    with pytest.raises(DataError, match=r"dict: field 'split': choose a split"):
        read_records(str(tmp_path / "dict"))
    with pytest.raises(DataError, match=r"dict:row 1: field 'steps\[0\]': equation '2\*3=5' evaluates to 6, not 5"):
        read_records(str(tmp_path / "dict"), split="test")
    assert read_records(str(tmp_path / "dict"), split="test", policy="skip").skipped == 1


def test_numeric_answers_are_written_as_plain_numbers(tmp_path):
    rows = [{**GOOD, "answer": 10.0}, {**GOOD, "question": "Q2?", "answer": 2.5e-05}, {**GOOD, "question": "Q3?", "answer": -7}]
    recs = read_records(_jsonl(tmp_path / "n.jsonl", rows)).records
    assert [r.answer for r in recs] == ["10", "0.000025", "-7"]


def test_new_formats_and_aliases_resolve():
    assert resolve_format("x.jsonl", "gsmhard") == "gsm-hard"
    assert resolve_format("x.json", "svamp") == "svamp" and resolve_format("x.json", "multiarith") == "multiarith"
    with pytest.raises(ValueError, match="unknown format 'svamp2'.*gsm-hard, svamp, multiarith"):
        resolve_format("x.json", "svamp2")


# --------------------------------------------------------------------------- the table of formats

def _toy_record(item: dict, rid: str, source: str, loc) -> Record:
    return validate_record(rid, item.get("prompt"), [], item.get("result"), source, loc)


TOY = DataFormat("toy", "Toy", _toy_record, lambda first: isinstance(first, dict) and "prompt" in first,
                 aliases=("toys",), hf_columns=(("prompt", "result"),))


def test_one_table_entry_is_all_a_new_format_needs(tmp_path, monkeypatch):
    """A format entered once in DATA_FORMATS is read by its name and alias, found by ``auto`` in a file
    and among a saved dataset's columns, and named in the errors that list the choices."""
    monkeypatch.setitem(readers.DATA_FORMATS, "toy", TOY)
    src = _jsonl(tmp_path / "toy.jsonl", [{"prompt": "Two and two?", "result": 4.0}, {"prompt": "", "result": 1}])
    assert resolve_format(src) == "toy" and resolve_format(src, "toys") == "toy"
    for fmt in ("toy", "toys", "auto"):
        result = read_records(src, fmt, policy="skip")
        records = [(r.id, r.question, r.steps, r.answer) for r in result.records]
        assert records == [("toy.jsonl:1", "Two and two?", (), "4")]
        assert result.skipped == 1 and result.errors[0].startswith(f"{src}:2: field 'question'")
    with pytest.raises(ValueError, match="unknown format 'toy2'; expected one of .*multiarith, toy, hf"):
        resolve_format(src, "toy2")
    assert readers.hf_layout("x", ["prompt", "result", "id"]) == "toy"
    with pytest.raises(DataError, match=r"field 'columns': no known layout .* prompt\+result \(Toy\)"):
        readers.hf_layout("x", ["foo"])

    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list([{"prompt": "One and one?", "result": "2"}]).save_to_disk(str(tmp_path / "toy_hf"))
    assert [(r.id, r.answer) for r in read_records(str(tmp_path / "toy_hf")).records] == [("toy_hf:0", "2")]


def test_without_the_entry_the_toy_format_is_unknown(tmp_path):
    """The check above can fail: the same file and name without the entry."""
    src = _jsonl(tmp_path / "toy.jsonl", [{"prompt": "Two and two?", "result": 4}])
    assert resolve_format(src) == "jsonl"
    with pytest.raises(ValueError, match="unknown format 'toy'"):
        resolve_format(src, "toy")
    with pytest.raises(DataError, match="no known layout"):
        readers.hf_layout("x", ["prompt", "result"])


def test_format_choices_and_aliases_come_from_the_table():
    assert FORMATS == ("auto", *readers.DATA_FORMATS, "hf")
    assert FORMATS == ("auto", "gsm8k-aug", "jsonl", "gsm8k", "gsm-hard", "svamp", "multiarith", "hf")
    assert ALIASES == {a: f.name for f in readers.DATA_FORMATS.values() for a in f.aliases}
    assert all(resolve_format("x.jsonl", alias) == name for alias, name in ALIASES.items())
