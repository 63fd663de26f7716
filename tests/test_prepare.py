"""prepare_data: splits, manifest with counts and digests, byte determinism, every input kind."""
import json
from pathlib import Path

import pytest

from colar_core.data import DataError, Record, file_digest, load_split, prepare_data, write_split
from colar_core.data.bundled import SETS_DIR

REAL = SETS_DIR / "gsm8k_aug"  # the GSM8k-Aug files bundled with colar (colar_core/data/bundled.py)


def _rows(n: int, offset: int = 0) -> list[dict]:
    return [{"question": f"Q{i}: {i}+{i}?", "steps": [f"{i}+{i}={2 * i}"], "answer": str(2 * i)} for i in range(offset, offset + n)]


def _jsonl(path: Path, rows: list) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_builtin_writes_splits_and_manifest(tmp_path):
    m = prepare_data("builtin", tmp_path / "out", builtin={"n_train": 60, "n_val": 10, "n_test": 12, "seed": 1})
    out = tmp_path / "out"
    assert m["counts"] == {"train": 60, "val": 10, "test": 12}
    assert m["format"] == "builtin" and m["source"] == "builtin" and m["skipped"] == 0
    assert json.loads((out / "manifest.json").read_text()) == m
    for split in ("train", "val", "test"):
        assert m["digests"][split] == file_digest(out / f"{split}.jsonl")
        assert len(load_split(out / f"{split}.jsonl")) == m["counts"][split]
    assert len(m["digest"]) == 64
    assert not list(out.glob(".*tmp"))  # no temp files left behind


def test_prepare_is_byte_deterministic(tmp_path):
    a = prepare_data("builtin", tmp_path / "a", builtin={"n_train": 40, "n_val": 5, "n_test": 5})
    b = prepare_data("builtin", tmp_path / "b", builtin={"n_train": 40, "n_val": 5, "n_test": 5})
    assert a == b
    for name in ("train.jsonl", "val.jsonl", "test.jsonl", "manifest.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    c = prepare_data("builtin", tmp_path / "c", builtin={"n_train": 40, "n_val": 5, "n_test": 5, "seed": 9})
    assert c["digest"] != a["digest"]


def test_single_file_is_split_by_seeded_shuffle(tmp_path):
    src = _jsonl(tmp_path / "all.jsonl", _rows(100))
    m1 = prepare_data(src, tmp_path / "o1", val_fraction=0.2, test_fraction=0.1, seed=3)
    m2 = prepare_data(src, tmp_path / "o2", val_fraction=0.2, test_fraction=0.1, seed=3)
    m3 = prepare_data(src, tmp_path / "o3", val_fraction=0.2, test_fraction=0.1, seed=4)
    assert m1["counts"] == {"train": 70, "val": 20, "test": 10}
    assert m1["format"] == "jsonl" and m1["digest"] == m2["digest"] != m3["digest"]
    ids = [r.id for s in ("train", "val", "test") for r in load_split(tmp_path / "o1" / f"{s}.jsonl")]
    assert sorted(ids) == sorted(f"all.jsonl:{i}" for i in range(1, 101))


def test_duplicate_questions_stay_in_one_split(tmp_path):
    rows = _rows(30) + _rows(30)  # every question twice (as in augmented data)
    src = _jsonl(tmp_path / "dup.jsonl", rows)
    prepare_data(src, tmp_path / "o", val_fraction=0.2, test_fraction=0.2)
    seen = {s: {r.question for r in load_split(tmp_path / "o" / f"{s}.jsonl")} for s in ("train", "val", "test")}
    assert not (seen["train"] & seen["val"] or seen["train"] & seen["test"] or seen["val"] & seen["test"])


def test_directory_of_split_files_and_skip_counts(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    _jsonl(d / "train.jsonl", _rows(50) + ["{bad json"])
    _jsonl(d / "valid.jsonl", _rows(5, offset=100) + [{"question": "Q", "steps": ["2+2=5"], "answer": "5"}])
    with pytest.raises(DataError, match=r"train\.jsonl:51: field 'json'"):
        prepare_data(str(d), tmp_path / "fail")
    m = prepare_data(str(d), tmp_path / "o", policy="skip", test_fraction=0.2)
    assert m["counts"] == {"train": 40, "val": 5, "test": 10}
    assert m["skipped"] == 2 and m["skipped_by_split"] == {"train": 1, "val": 1, "test": 0}
    assert m["policy"] == "skip" and len(m["skipped_examples"]) == 2


def test_real_directory_without_train_is_rejected_but_files_prepare(tmp_path):
    with pytest.raises(ValueError, match="no train split"):
        prepare_data(str(REAL), tmp_path / "o")
    m = prepare_data(str(REAL / "valid.txt"), tmp_path / "v", format="gsm8k-aug")
    assert sum(m["counts"].values()) == 500 and m["format"] == "gsm8k-aug"


def test_hf_dataset_dict_uses_its_splits(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.DatasetDict({
        "train": datasets.Dataset.from_list(_rows(20)),
        "validation": datasets.Dataset.from_list(_rows(4, offset=50)),
        "test": datasets.Dataset.from_list(_rows(6, offset=80)),
    }).save_to_disk(str(tmp_path / "hf"))
    m = prepare_data(str(tmp_path / "hf"), tmp_path / "o")
    assert m["format"] == "hf" and m["counts"] == {"train": 20, "val": 4, "test": 6}


def test_write_and_load_split_round_trip(tmp_path):
    recs = [Record("x", "Q é?", ("1+1=2",), "2"), Record("y", "R?", (), "3")]
    digest = write_split(recs, tmp_path / "s.jsonl")
    assert digest == file_digest(tmp_path / "s.jsonl")
    assert load_split(tmp_path / "s.jsonl") == recs
    first = (tmp_path / "s.jsonl").read_text(encoding="utf-8").splitlines()[0]
    assert first == '{"answer": "2", "id": "x", "question": "Q é?", "steps": ["1+1=2"]}'
