"""Pipeline config: YAML + --set overrides, validated in full, errors that name the field."""

from pathlib import Path

import pytest

from flows.config import ConfigError, PipelineConfig, load_config

REPO = Path(__file__).resolve().parents[1]


def test_shipped_default_yaml_is_the_embedded_default():
    assert load_config(str(REPO / "configs" / "default.yaml")) == PipelineConfig()


def test_yaml_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("sft_colar:\n  max_steps: 50\n  objective:\n    compression_factors: [1, 2]\neval:\n  compression_factors: [1, 2]\n")
    cfg = load_config(str(f), ["sft_colar.lr=0.01", "sft_cot=null", "model.tiny.arch=gpt2"])
    assert cfg.sft_colar.max_steps == 50 and cfg.sft_colar.lr == 0.01
    assert cfg.sft_cot is None and cfg.model.tiny.arch == "gpt2"
    assert cfg.sft_colar.objective.compression_factors == [1, 2]


@pytest.mark.parametrize("override,field", [
    ("sft_colar.lr=-1", "sft_colar.lr"),
    ("sft_cot.zero_stage=5", "sft_cot.zero_stage"),
    ("eval.compression_factors=[0]", "eval.compression_factors"),
    ("eval.compression_factors=[1,2,7]", "eval.compression_factors"),
    ("sft_colar.objective.compression_factors=[0,2]", "sft_colar.objective.compression_factors"),
    ("model.tiny.hidden_size=30", "model.tiny"),
    ("data.policy=ignore", "data.policy"),
    ("sft_colar.bogus=1", "sft_colar.bogus"),
])
def test_bad_fields_are_named(override, field):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert field in str(err.value)


def test_bad_files_and_override_syntax(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("sft_colar: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config(None, ["sft_colar.lr"])


def test_digest_changes_with_any_field():
    assert PipelineConfig().digest() == PipelineConfig().digest()
    assert load_config(None, ["sft_colar.max_steps=901"]).digest() != PipelineConfig().digest()


def test_shipped_gpu_config_validates():
    cfg = load_config(str(REPO / "configs" / "gpu.yaml"))
    assert cfg.rl is not None and cfg.eval.nocot_baseline and cfg.sft_colar.precision == "bf16"
