"""The real data sets bundled with the package (colar_core/data/sets): every one reads completely under
policy fail, its questions and answers match the raw files (built as the reference implementation
builds them), each format is recognised from its fields, the Hugging Face layouts of these sets read
from datasets saved locally, and `colar data prepare --input gsm8k-train` writes its splits."""
import json
import re
from pathlib import Path

import pytest

from colar_core.data import DataError, bundled, check_equation, parse_number, prepare_data, read_records, resolve_format
from colar_core.data.bundled import BUNDLED, SETS_DIR, resolve_bundled
from colar_core.data.prepare import load_split
from colar_core.data.readers import hf_layout, plain_number

COUNTS = {"gsm8k-train": 7473, "gsm8k-test": 1319, "gsm8k-aug-valid": 500, "gsm8k-aug-test": 1319,
          "gsm-hard": 1319, "svamp": 1000, "multiarith": 600}
FORMATS = {"gsm8k-train": "gsm8k", "gsm8k-test": "gsm8k", "gsm8k-aug-valid": "gsm8k-aug", "gsm8k-aug-test": "gsm8k-aug",
           "gsm-hard": "gsm-hard", "svamp": "svamp", "multiarith": "multiarith"}
EVAL_ONLY = {"gsm-hard", "svamp", "multiarith"}


def _raw(name: str):
    """The bundled file's items, parsed here independently of the readers."""
    path = Path(resolve_bundled(name)[0])
    if path.suffix == ".json":
        return json.loads(path.read_text(encoding="utf-8"))
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="module")
def sets():
    return {name: read_records(name, "auto", policy="fail") for name in COUNTS}


# --------------------------------------------------------------------------- registry and counts

def test_registry_names_files_formats_and_sources():
    assert list(BUNDLED) == list(COUNTS)
    for name, fmt in FORMATS.items():
        path, found = resolve_bundled(name)
        assert found == fmt and Path(path).is_file() and Path(path).is_relative_to(SETS_DIR)
        assert "http" not in path and BUNDLED[name].records == COUNTS[name]
        assert "commit" in BUNDLED[name].source_md.read_text(encoding="utf-8")  # origin stated
        assert (name in EVAL_ONLY) == BUNDLED[name].evaluation_only
    for other in ("SVAMP", "./svamp", "gsm8k", "builtin", "openai/gsm8k", ""):
        assert resolve_bundled(other) is None


@pytest.mark.parametrize("name", list(COUNTS))
def test_every_bundled_set_reads_completely_under_policy_fail(sets, name):
    result = sets[name]
    assert len(result.records) == COUNTS[name] and result.skipped == 0 and result.errors == []
    assert len(_raw(name)) == COUNTS[name]
    ids = [r.id for r in result.records]
    assert all(isinstance(i, str) and i.startswith(f"{name}:") for i in ids) and len(set(ids)) == len(ids)
    assert all(r.question and r.question == r.question.strip() and parse_number(r.answer) is not None
               for r in result.records)
    with_steps = sum(bool(r.steps) for r in result.records)
    if name in EVAL_ONLY:
        assert with_steps == 0
    else:
        assert with_steps > 0.9 * COUNTS[name]
    assert resolve_format(name) == FORMATS[name]


def test_a_local_path_of_a_bundled_name_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("svamp").write_text(json.dumps({"question": "Local?", "steps": ["1+1=2"], "answer": "2"}) + "\n")
    recs = read_records("svamp").records
    assert [r.question for r in recs] == ["Local?"] and recs[0].id == "svamp:1"


# --------------------------------------------------------------------------- spot checks against the raw files

def test_gsm8k_questions_answers_and_steps_match_the_raw_file(sets):
    raw = _raw("gsm8k-train")
    recs = sets["gsm8k-train"].records
    assert recs[0].question == raw[0]["question"] and recs[0].answer == "72"
    assert recs[0].steps == ("48/2=24", "48+24=72")
    assert recs[-1].answer == raw[-1]["answer"].rsplit("####", 1)[1].strip()
    test = sets["gsm8k-test"].records
    assert test[0].question.startswith("Janet’s ducks lay 16 eggs per day.") and test[0].answer == "18"
    # the two floor-division annotations of GSM8K train (lines 395 and 4170)
    by_id = {r.id: r for r in recs}
    assert "560//10=56" in by_id["gsm8k-train:395"].steps and "<<560//10=56>>" in raw[394]["answer"]
    assert "180//3=60" in by_id["gsm8k-train:4170"].steps and "<<180//3=60>>" in raw[4169]["answer"]


def test_gsm8k_aug_records_match_the_raw_lines(sets):
    line = _raw("gsm8k-aug-valid")[0]
    question, rest = line.rsplit("||", 1)
    rec = sets["gsm8k-aug-valid"].records[0]
    assert rec.question == question.strip() and rec.answer == rest.rsplit("####", 1)[1].strip() == "300"
    assert rec.steps == tuple(re.findall(r"<<(.*?)>>", rest)) and rec.steps[:2] == ("4-2=2", "2/.5=4")
    assert sets["gsm8k-aug-test"].records[0].steps == ("16-3-4=9", "9*2=18")


def test_gsm_hard_question_is_input_and_answer_is_the_target_number(sets):
    raw = _raw("gsm-hard")
    recs = sets["gsm-hard"].records
    assert recs[0].question == raw[0]["input"].strip() and recs[0].answer == "-9867630"
    assert recs[7].answer == "3244047.0999999996"  # a float target keeps its exact value
    assert all(float(r.answer) == item["target"] for r, item in zip(recs, raw))
    assert sum(r.answer.startswith("-") for r in recs) == sum(item["target"] < 0 for item in raw) > 0
    assert not any(r.answer.endswith(".0") for r in recs)


def test_svamp_question_is_body_dot_question_as_the_reference_builds_it(sets):
    recs = sets["svamp"].records
    assert recs[0].question == ("Each pack of dvds costs 76 dollars. If there is a discount of 25 dollars on "
                                "each pack. How much do you have to pay to buy each pack?")
    assert recs[0].answer == "51"  # 51.0 in the file
    raw = _raw("svamp")
    assert all(r.question == (d["Body"].strip(". ") + ". " + d["Question"].strip()).strip()
               and float(r.answer) == d["Answer"] for r, d in zip(recs, raw))
    assert not any(r.answer.endswith(".0") for r in recs)


def test_multiarith_question_is_stripped_and_answer_is_the_first_solution(sets):
    raw = _raw("multiarith")
    recs = sets["multiarith"].records
    assert raw[0]["sQuestion"].startswith(" ") and recs[0].question.startswith("For Halloween Debby")
    assert recs[0].question == raw[0]["sQuestion"].strip() and recs[0].answer == "39"
    assert all(float(r.answer) == d["lSolutions"][0] for r, d in zip(recs, raw))


def test_plain_number_writes_answers_without_float_noise():
    assert [plain_number(v) for v in (51.0, -9867630.0, 3244047.0999999996, 1e-05, 7, 0.5)] == \
        ["51", "-9867630", "3244047.0999999996", "0.00001", "7", "0.5"]


# --------------------------------------------------------------------------- floor division

def test_floor_division_annotation_evaluates_and_is_checked():
    check_equation("560//10=56")
    check_equation("180//3=60")
    with pytest.raises(ValueError, match=r"evaluates to 56, not 57"):
        check_equation("560//10=57")
    with pytest.raises(ValueError, match="divides by zero"):
        check_equation("5//0=1")
    with pytest.raises(ValueError, match="does not parse"):  # still not a calculator for everything
        check_equation("2**3=8")


def test_gsm8k_row_with_floor_division_reads(tmp_path):
    row = {"question": "560 cm cut into 10 cm pieces: how many?", "answer": "560//10 = <<560//10=56>>56\n#### 56"}
    src = tmp_path / "g.jsonl"
    src.write_text(json.dumps(row) + "\n")
    assert read_records(str(src), "gsm8k").records[0].steps == ("560//10=56",)


# --------------------------------------------------------------------------- auto detection and errors

def test_auto_recognises_each_format_from_the_first_record(tmp_path):
    # the bundled files themselves, by path
    for name, fmt in FORMATS.items():
        assert resolve_format(resolve_bundled(name)[0]) == fmt
    # files of the same shapes under neutral names
    shapes = {
        "gsm-hard": ("a.jsonl", "\n".join(json.dumps(d) for d in _raw("gsm-hard")[:3])),
        "svamp": ("b.json", json.dumps(_raw("svamp")[:3])),
        "multiarith": ("c.json", json.dumps(_raw("multiarith")[:3])),
        "gsm8k": ("d.jsonl", "\n".join(json.dumps(d) for d in _raw("gsm8k-test")[:3])),
    }
    for fmt, (file, text) in shapes.items():
        (tmp_path / file).write_text(text + "\n", encoding="utf-8")
        assert resolve_format(str(tmp_path / file)) == fmt
        assert len(read_records(str(tmp_path / file)).records) == 3
    hub_style = tmp_path / "e.json"
    hub_style.write_text(json.dumps([{"question": " Q one? ", "final_ans": "39"}]))
    assert resolve_format(str(hub_style)) == "multiarith"
    assert read_records(str(hub_style)).records[0].question == "Q one?"


@pytest.mark.parametrize("fmt, item, loc, field, reason", [
    ("svamp", {"Body": "A has 3", "Question": "How many?"}, "row 0", "Answer", "missing field 'Answer'"),
    ("svamp", {"Body": "", "Question": "How many?", "Answer": 3.0}, "row 0", "Body", "Body is empty"),
    ("multiarith", {"sQuestion": "How many?", "lSolutions": []}, "row 0", "lSolutions", "non-empty list"),
    ("multiarith", {"sQuestion": "How many?", "lSolutions": ["x"]}, "row 0", "lSolutions[0]", "'x' is not a number"),
    ("gsm-hard", {"input": "How many?", "target": "lots"}, 1, "target", "target 'lots' is not a number"),
    ("gsm-hard", {"input": 5, "target": 1.0}, 1, "input", "input must be a string, got int"),
])
def test_evaluation_set_errors_name_file_location_and_field(tmp_path, fmt, item, loc, field, reason):
    src = tmp_path / ("x.jsonl" if fmt == "gsm-hard" else "x.json")
    src.write_text(json.dumps(item) + "\n" if fmt == "gsm-hard" else json.dumps([item]))
    with pytest.raises(DataError) as info:
        read_records(str(src), fmt)
    assert str(info.value).startswith(f"{src}:{loc}: field '{field}': ") and reason in str(info.value)


# --------------------------------------------------------------------------- Hugging Face layouts

def test_hf_layouts_of_the_hub_copies_read_from_saved_datasets(tmp_path):
    datasets = pytest.importorskip("datasets")
    gsm8k = _raw("gsm8k-test")[:2]
    datasets.DatasetDict({  # openai/gsm8k, config main: question, answer; splits train/test
        "train": datasets.Dataset.from_list(_raw("gsm8k-train")[:3]),
        "test": datasets.Dataset.from_list(gsm8k),
    }).save_to_disk(str(tmp_path / "gsm8k"))
    datasets.Dataset.from_dict({  # reasoning-machines/gsm-hard
        "input": [d["input"] for d in _raw("gsm-hard")[:8]], "code": [d["code"] for d in _raw("gsm-hard")[:8]],
        "target": [d["target"] for d in _raw("gsm-hard")[:8]],
    }).save_to_disk(str(tmp_path / "gsmhard"))
    svamp = _raw("svamp")[:3]
    datasets.Dataset.from_dict({  # ChilleD/SVAMP
        **{k: [d[k] for d in svamp] for k in ("ID", "Body", "Question", "Equation", "Answer", "Type")},
        "question_concat": [d["Body"] + " " + d["Question"] for d in svamp],
    }).save_to_disk(str(tmp_path / "svamp"))
    datasets.Dataset.from_dict({  # ChilleD/MultiArith
        "question": [" Debby had 32 pieces of candy and ate 2. How many are left? "], "final_ans": ["30"],
    }).save_to_disk(str(tmp_path / "multiarith"))
    datasets.Dataset.from_list(_raw("multiarith")[:2]).save_to_disk(str(tmp_path / "multiarith_raw"))

    recs = read_records(str(tmp_path / "gsm8k"), split="test").records
    assert [r.answer for r in recs] == ["18", "3"] and recs[0].steps == ("16-3-4=9", "9*2=18")
    recs = read_records(str(tmp_path / "gsmhard")).records
    assert recs[0].answer == "-9867630" and recs[7].answer == "3244047.0999999996" and recs[0].steps == ()
    recs = read_records(str(tmp_path / "svamp")).records
    assert recs[0].question.endswith("on each pack. How much do you have to pay to buy each pack?")
    assert recs[0].answer == "51" and recs[0].id == "svamp:0"
    recs = read_records(str(tmp_path / "multiarith")).records
    assert recs[0].question.startswith("Debby") and recs[0].answer == "30"
    assert read_records(str(tmp_path / "multiarith_raw")).records[0].answer == "39"
    manifest = prepare_data(str(tmp_path / "gsm8k"), tmp_path / "out", format="hf")
    assert manifest["counts"]["test"] == 2 and manifest["counts"]["train"] + manifest["counts"]["val"] == 3


def test_hf_columns_of_no_known_layout_are_named():
    assert hf_layout("x", ["question", "answer", "steps"]) == "jsonl"
    assert hf_layout("x", ["question", "answer"]) == "gsm8k"
    with pytest.raises(DataError, match=r"x: field 'columns': no known layout in columns \['foo', 'question'\]"):
        hf_layout("x", ["question", "foo"])


# --------------------------------------------------------------------------- prepare, CLI, config

def test_cli_prepares_the_bundled_gsm8k_train_set(tmp_path, capsys):
    from flows.cli import main

    out = tmp_path / "prepared"
    assert main(["data", "prepare", "--input", "gsm8k-train", "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"] == "gsm8k-train" and manifest["format"] == "gsm8k" and manifest["skipped"] == 0
    counts = {s: len(load_split(out / f"{s}.jsonl")) for s in ("train", "val", "test")}
    assert counts == manifest["counts"] and sum(counts.values()) == 7473 and min(counts.values()) > 700
    assert json.loads(capsys.readouterr().out)["digest"] == manifest["digest"]


def test_evaluation_only_set_prepares_with_empty_steps(tmp_path):
    manifest = prepare_data("svamp", tmp_path, val_fraction=0.0, test_fraction=0.5)
    test = load_split(tmp_path / "test.jsonl")
    assert manifest["counts"]["test"] == len(test) == 500 and all(r.steps == () for r in test)
    assert '"steps": []' in (tmp_path / "test.jsonl").read_text().splitlines()[0]


def test_prepare_refuses_to_overwrite_a_bundled_file(tmp_path, monkeypatch):
    fake = tmp_path / "sets"  # a stand-in for the package's folder: a failure never touches the real files
    (fake / "gsm8k").mkdir(parents=True)
    before = "".join(json.dumps(d) + "\n" for d in _raw("gsm8k-train")[:20])
    (fake / "gsm8k" / "train.jsonl").write_text(before, encoding="utf-8")
    monkeypatch.setattr(bundled, "SETS_DIR", fake)
    assert read_records("gsm8k-train").records[0].answer == "72"  # the name now reads the stand-in
    with pytest.raises(ValueError, match="would overwrite the input"):
        prepare_data("gsm8k-train", fake / "gsm8k")
    assert (fake / "gsm8k" / "train.jsonl").read_text(encoding="utf-8") == before
    assert sorted(p.name for p in (fake / "gsm8k").iterdir()) == ["train.jsonl"]


def test_config_accepts_bundled_sources_and_formats():
    from flows.config import ConfigError, load_config, preflight

    for name in COUNTS:
        preflight(load_config(overrides=[f"data.source={name}"]))
    assert load_config(overrides=["data.format=svamp"]).data.format == "svamp"
    with pytest.raises(ConfigError, match="data.format"):
        load_config(overrides=["data.format=svamp2"])


def test_training_loss_tolerates_records_without_steps():
    torch = pytest.importorskip("torch")
    from bench.tiny import PROBLEMS, encoder_for, tiny_model, tiny_tokenizer
    from colar_core.collate import collate
    from colar_core.config import ObjectiveConfig
    from colar_core.data import Record

    tok = tiny_tokenizer()
    model, enc = tiny_model(tok), encoder_for(tok)
    rows = [Record(p.id, p.question, (), p.answer) for p in PROBLEMS]
    batch = collate([enc.encode(r) for r in rows], enc, r=2, generator=torch.Generator().manual_seed(0))
    out = model.sft_loss(batch, ObjectiveConfig())
    # no step group to predict: the only latent term is the closing one (the '###' group predicts the
    # closing '###', issue 25); without it there is none
    assert torch.isfinite(out["loss"]) and torch.isfinite(out["latent"])
    out = model.sft_loss(batch, ObjectiveConfig(closing_think_latent=False))
    assert torch.isfinite(out["loss"]) and float(out["latent"]) == 0.0
