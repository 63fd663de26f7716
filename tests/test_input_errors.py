"""Issue 12, clear errors: bad data, bad config and bad command lines end in one line naming the file,
line or field, exit code 2, and nothing started or overwritten (docs/RELIABILITY.md, "Bad data" and
"Bad config")."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from colar_core.data import DataError, read_records
from flows import cli
from flows.config import ConfigError, load_config, preflight

GOOD = {"question": "Tom has 2 apples and buys 3. How many?", "steps": ["2+3=5"], "answer": "5"}


def _write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _good_rows(n: int) -> list[dict]:
    return [{**GOOD, "question": f"{GOOD['question']} ({i})"} for i in range(n)]


def _cli(capsys, *argv: str) -> tuple[int, str]:
    code = cli.main(list(argv))
    return code, capsys.readouterr().err


# ----------------------------------------------------------------------------- data prepare --out


@pytest.mark.parametrize("layout", ["file", "directory", "parent"])
def test_prepare_refuses_an_out_that_would_overwrite_the_input(tmp_path, capsys, layout):
    source = _write_jsonl(tmp_path / "d" / "train.jsonl", _good_rows(50))
    before = source.read_bytes()
    args = {"file": (str(source), str(tmp_path / "d")),
            "directory": (str(tmp_path / "d"), str(tmp_path / "d")),
            "parent": (str(source), str(tmp_path / "d" / ".." / "d"))}[layout]
    code, err = _cli(capsys, "data", "prepare", "--input", args[0], "--out", args[1])
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert f"output directory {args[1]}" in err and str(source) in err and "overwrite" in err
    assert source.read_bytes() == before  # 50 lines, not the 40 of a train split
    assert sorted(p.name for p in source.parent.iterdir()) == ["train.jsonl"]


def test_prepare_out_pointing_at_a_file_is_a_clear_error(tmp_path, capsys):
    source = _write_jsonl(tmp_path / "data.jsonl", _good_rows(10))
    blocker = tmp_path / "out.txt"
    blocker.write_text("not a directory")
    for out in (blocker, blocker / "sub"):
        code, err = _cli(capsys, "data", "prepare", "--input", str(source), "--out", str(out))
        assert code == 2 and "Traceback" not in err
        assert f"{blocker} is a file, not a directory" in err
    assert blocker.read_text() == "not a directory"


def test_prepare_into_a_sibling_folder_still_works(tmp_path, capsys):
    source = _write_jsonl(tmp_path / "d" / "data.jsonl", _good_rows(20))
    assert cli.main(["data", "prepare", "--input", str(source), "--out", str(tmp_path / "d")]) == 0
    assert (tmp_path / "d" / "train.jsonl").is_file() and len(source.read_text().splitlines()) == 20


# ----------------------------------------------------------------------------- records that crashed the reader


HUGE_STEP = {**GOOD, "steps": ["1" * 400 + "+1=2"]}                        # OverflowError in float()
LONG_SUM = {**GOOD, "steps": ["+".join(["1"] * 3000) + "=3000"]}         # RecursionError in ast
HUGE_ANSWER = {**GOOD, "answer": "9" * 400}                               # float("9"*400) == inf
DEEP_JSON = "[" * 100_000 + "]" * 100_000                                 # RecursionError in json


def test_huge_numbers_long_sums_and_deep_json_are_bad_records(tmp_path):
    rows = [*_good_rows(3), HUGE_STEP, LONG_SUM, DEEP_JSON, HUGE_ANSWER, {**GOOD, "answer": "1e400"}]
    path = _write_jsonl(tmp_path / "train.jsonl", rows)
    result = read_records(str(path), "jsonl", policy="skip")
    assert len(result.records) == 3 and result.skipped == 5
    name = str(path)
    expected = [(4, "steps[0]", "beyond float range"), (5, "steps[0]", "over the limit of"),
                (6, "json", "nested too deeply"), (7, "answer", "out of range"), (8, "answer", "is not a number")]
    for message, (line, field, reason) in zip(result.errors, expected):
        assert message.startswith(f"{name}:{line}: field '{field}': ") and reason in message
        assert len(message) < 400  # a runaway expression is not quoted in full
    for row in rows[3:]:  # under policy fail each one is the DataError that stops the stage
        one = _write_jsonl(tmp_path / "one.jsonl", [row])
        with pytest.raises(DataError) as info:
            read_records(str(one), "jsonl", policy="fail")
        assert info.value.line == 1 and info.value.field in ("steps[0]", "json", "answer")


def test_a_file_whose_every_record_is_bad_is_an_error_under_skip(tmp_path, capsys):
    path = _write_jsonl(tmp_path / "all_bad.jsonl", [HUGE_ANSWER, {**GOOD, "steps": ["2+2=5"]}, "{nope"])
    with pytest.raises(DataError, match=r"all_bad\.jsonl: no valid records: all 3 records are bad"):
        read_records(str(path), "jsonl", policy="skip")
    code, err = _cli(capsys, "data", "prepare", "--input", str(path), "--out", str(tmp_path / "out"),
                     "--policy", "skip")
    assert code == 2 and "no valid records: all 3 records are bad" in err and str(path) in err
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- config


def test_fractions_that_leave_nothing_to_train_on_are_refused_naming_both_fields(capsys):
    with pytest.raises(ConfigError, match=r"data.val_fraction \(0.5\) \+ data.test_fraction \(0.5\)"):
        load_config(None, ["data.val_fraction=0.5", "data.test_fraction=0.5"])
    code, err = _cli(capsys, "run", "--set", "data.val_fraction=0.6", "--set", "data.test_fraction=0.4")
    assert code == 2 and "data.val_fraction" in err and "data.test_fraction" in err
    load_config(None, ["data.val_fraction=0.5", "data.test_fraction=0.4"])  # below 1: fine


def test_test_fraction_zero_is_refused_when_the_test_split_is_carved_from_the_source(tmp_path, capsys):
    source = _write_jsonl(tmp_path / "all.jsonl", _good_rows(10))
    cfg = load_config(None, [f"data.source={source}", "data.test_fraction=0"])
    with pytest.raises(ConfigError, match=r"field 'data.test_fraction': 0 leaves no test split"):
        preflight(cfg)
    code, err = _cli(capsys, "run", "--set", f"data.source={source}", "--set", "data.test_fraction=0")
    assert code == 2 and "data.test_fraction" in err
    # no false alarm: builtin data and a directory with its own test split
    preflight(load_config(None, ["data.test_fraction=0"]))
    _write_jsonl(tmp_path / "splits" / "train.jsonl", _good_rows(5))
    _write_jsonl(tmp_path / "splits" / "test.jsonl", _good_rows(2))
    preflight(load_config(None, [f"data.source={tmp_path / 'splits'}", "data.test_fraction=0"]))


def test_bad_yaml_in_set_and_a_non_utf8_config_file_exit_2_naming_key_and_file(tmp_path, capsys):
    code, err = _cli(capsys, "run", "--set", "sft_colar.max_steps=[1,")
    assert code == 2 and "--set sft_colar.max_steps: value '[1,' is not valid YAML" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("name: caf\xe9\n".encode("latin-1"))
    code, err = _cli(capsys, "run", "--config", str(bad))
    assert code == 2 and f"{bad}: not UTF-8 text (byte 0xe9" in err and len(err.strip().splitlines()) == 1
    broken = tmp_path / "broken.yaml"
    broken.write_text("data: [1,\n")
    code, err = _cli(capsys, "run", "--config", str(broken))
    assert code == 2 and f"{broken}: not valid YAML" in err and len(err.strip().splitlines()) == 1


def test_an_unreachable_hf_dataset_id_is_a_clear_error(tmp_path):
    """Offline (or with no network) ``datasets.load_dataset`` raises ConnectionError: it was a traceback."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "data", "prepare", "--input",
                           "someorg/no-such-dataset", "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert "someorg/no-such-dataset: cannot load the Hugging Face dataset: ConnectionError" in proc.stderr


def test_retry_of_a_stored_config_that_no_longer_validates_names_the_field(tmp_path, capsys, monkeypatch):
    from types import SimpleNamespace

    import mlflow.tracking

    stored = load_config().model_dump(mode="json")
    stored["sft_colar"]["lr"] = -1.0  # e.g. a rule added since the run was stored
    path = tmp_path / "config.json"
    path.write_text(json.dumps(stored))
    parent = SimpleNamespace(info=SimpleNamespace(run_id="r1", status="FAILED"), data=SimpleNamespace(tags={}))
    monkeypatch.setattr(cli.servers, "ensure_servers", lambda *a, **k: {"mlflow": "x", "prefect": "y"})
    monkeypatch.setattr(cli, "resolve_parent_run", lambda run: parent)
    # a stand-in for the flow module (importing the real one imports Prefect: seconds for nothing here)
    monkeypatch.setitem(sys.modules, "flows.pipeline", SimpleNamespace(still_running=lambda run: None,
                                                                       check_from_stage=lambda cfg, stage: None))
    monkeypatch.setattr(mlflow.tracking, "MlflowClient",
                        lambda *a, **k: SimpleNamespace(download_artifacts=lambda run_id, name: str(path)))
    monkeypatch.setattr(cli, "_run", lambda *a, **k: pytest.fail("the pipeline must not start"))
    code, err = _cli(capsys, "retry", "r1")
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "no longer validates" in err and "field 'sft_colar.lr'" in err


# ----------------------------------------------------------------------------- --help lists only working commands


def _listed_subcommands(help_text: str) -> list[str]:
    """The ``{a,b,c}`` choices of a help text's positional subcommand argument."""
    for line in help_text.splitlines():
        words = line.strip().split()
        if words and words[0].startswith("{") and words[0].endswith("}"):
            return words[0][1:-1].split(",")
    return []


def test_help_lists_only_commands_that_work(capsys):
    def help_of(*argv: str) -> str:
        with pytest.raises(SystemExit) as info:
            cli.main([*argv, "--help"])
        out = capsys.readouterr().out
        assert info.value.code == 0, f"colar {' '.join(argv)} --help exited {info.value.code}"
        return out

    top = _listed_subcommands(help_of())
    assert top and "evaluate" not in top
    for name in top:
        text = help_of(name)
        for sub in _listed_subcommands(text):
            help_of(name, sub)
