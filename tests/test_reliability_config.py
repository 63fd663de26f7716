"""Reliability, bad config: `colar run --set ...` stops with exit code 2 and one message naming the
field, before any server or stage starts and without writing to output_dir."""

from __future__ import annotations

import time

import pytest

from flows.config import ConfigError, load_config, preflight


@pytest.fixture
def no_servers(monkeypatch, tmp_path):
    """Fail the test if the CLI tries to reach or start a server; servers would go to tmp_path/home."""
    import colar_infra.servers

    def refuse(*args, **kwargs):
        raise AssertionError("a server was asked for before the config was validated")

    monkeypatch.setattr(colar_infra.servers, "ensure_servers", refuse)
    monkeypatch.setattr(colar_infra.servers, "ensure_mlflow", refuse)
    monkeypatch.setattr(colar_infra.servers, "ensure_prefect", refuse)
    monkeypatch.setenv("COLAR_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.mark.parametrize("override, field, reason", [
    ("eval.compression_factors=[0]", "eval.compression_factors", "integers >= 1"),
    ("eval.compression_factors=[-2,1]", "eval.compression_factors", "integers >= 1"),
    ("eval.compression_factors=[1,2,3,4]", "eval.compression_factors", "above the trained maximum 3"),
    ("rl.compression_factor=9", "rl.compression_factor", "above the trained maximum"),
    ("sft_colar.zero_stage=4", "sft_colar.zero_stage", "must be 0, 1, 2 or 3"),
    ("sft_cot.zero_stage=-1", "sft_cot.zero_stage", "must be 0, 1, 2 or 3"),
    ("sft_colar.lr=-0.001", "sft_colar.lr", "greater than 0"),
    ("model.name_or_path=/no/such/model-dir", "model.name_or_path", "does not exist"),
    ("model.name_or_path=no-such-org-colar/no-such-model", "model.name_or_path", "not 'tiny', an existing directory"),
    ("data.source=/no/such/train.jsonl", "data.source", "does not exist"),
    ("data.source=no-such-org-colar/no-such-dataset", "data.source", "not 'builtin', an existing path"),
])
def test_bad_config_stops_colar_run_before_anything_starts(override, field, reason, tmp_path, capsys, no_servers):
    from flows.cli import main

    out = tmp_path / "out"
    t0 = time.monotonic()
    assert main(["run", "--set", override, "--set", f"output_dir={out}"]) == 2
    assert time.monotonic() - t0 < 15  # the hub / dataset checks are one quick query at most
    err = capsys.readouterr().err
    assert err.startswith("colar run: invalid config: ") and f"field '{field}'" in err and reason in err, err
    assert len(err.strip().splitlines()) == 1  # one clear message, no traceback
    assert not out.exists()
    assert not (no_servers / "servers.json").exists()


def test_preflight_accepts_tiny_builtin_existing_paths_and_cached_hub_ids(tmp_path, monkeypatch):
    """The check refuses only what cannot work: local directories/files and cached hub ids pass offline."""
    from huggingface_hub import constants

    preflight(load_config(None, []))  # the defaults: tiny + builtin
    model_dir = tmp_path / "my-model"
    model_dir.mkdir()
    data_file = tmp_path / "train.jsonl"
    data_file.write_text("{}\n")
    preflight(load_config(None, [f"model.name_or_path={model_dir}", f"data.source={data_file}"]))

    cache = tmp_path / "hub"
    (cache / "models--acme--tiny-llm" / "snapshots" / "abc123").mkdir(parents=True)
    (cache / "datasets--acme--arith" / "snapshots" / "def456").mkdir(parents=True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    preflight(load_config(None, ["model.name_or_path=acme/tiny-llm", "data.source=acme/arith"]))
    with pytest.raises(ConfigError, match=r"field 'model\.name_or_path'.*offline mode"):
        preflight(load_config(None, ["model.name_or_path=acme/other-llm"]))
    with pytest.raises(ConfigError, match=r"field 'data\.source'.*offline mode"):
        preflight(load_config(None, ["data.source=acme/other-data"]))
