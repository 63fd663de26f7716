"""The GPU recipes rehearsed on CPU (issue 24, item 3): ``colar rehearse --config FILE [--layers N]``.

Fast tests check the rewrite of each recipe (sizes cut, shapes and precision kept, the GSM8k-Aug path
replaced by the bundled GSM8K train and said so) and that an architecture file builds a random backbone
of exactly that shape. The slow tests run the rehearsal through the pipeline (real MLflow and Prefect
servers) on Llama-3.2-1B's architecture cut to 2 decoder layers, with the word-level tokenizer (CI is
offline; the vocabulary stays Llama's 128,256) and every decoding length capped at 4: configs/gsm8k.yaml in
full, then the stages table1-gpu.yaml adds (soft-MSE CoLaR, the iCoT / Coconut / Distill baselines), each
checked on its report: every stage completed, its time and peak memory recorded, its checkpoint and model
written in bf16 with adapters on every LoRA target, the recipe's DeepSpeed config accepted, and the
evaluation decoded up to its caps. (gsm8k-aug.yaml rehearses as gsm8k.yaml once its train file is
replaced; configs/gpu.yaml, whose model is random anyway, runs through the pipeline in
tests/test_pipeline.py, and its rewrite is checked here.) Numbers: docs/METHOD.md, "GPU recipes against
the paper (issue 24)".
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from colar_core.config import ModelConfig
from colar_core.model import build_arch_backbone, is_architecture_file, load_backbone
from colar_core.tokenizer import build_tokenizer
from flows.config import load_config, preflight
from flows.rehearsal import RehearsalOptions, architecture_file, rehearsal_config

REPO = Path(__file__).resolve().parents[1]
GPU_RECIPES = ("gsm8k-aug.yaml", "gsm8k.yaml", "table1-gpu.yaml", "gpu.yaml")


def recipe(name: str, *overrides: str):
    return load_config(str(REPO / "configs" / name), list(overrides))


def training_sections(cfg) -> list:
    return [t for t in (cfg.sft_cot, cfg.sft_colar, *(m.train for _, m in cfg.baselines.selected())) if t]


@pytest.mark.parametrize("name", GPU_RECIPES)
def test_the_rehearsal_cuts_steps_batch_and_examples_but_keeps_shapes_precision_and_decoding(name, tmp_path):
    real = recipe(name)
    opts = RehearsalOptions(output_dir=str(tmp_path), layers=2, batch_size=4)
    arch = str(tmp_path / "arch.json") if real.model.name_or_path != "tiny" else None
    cfg, notes = rehearsal_config(real, opts, arch, str(tmp_path) if arch else None)
    for before, after in zip(training_sections(real), training_sections(cfg)):
        assert after.max_steps == 2 and after.checkpoint_every == 2  # one checkpoint, at the end
        assert after.batch_size == min(before.batch_size, 4) and after.grad_accum == 1
        assert (after.eval_every > 0) == (before.eval_every > 0) and after.eval_every <= 2
        assert (after.precision, after.backend, after.zero_stage, after.lr, after.grad_clip) == (
            before.precision,
            before.backend,
            before.zero_stage,
            before.lr,
            before.grad_clip,
        )
        assert after.objective == before.objective and after.generation == before.generation
        assert after.length_grouping == before.length_grouping
    if real.rl is not None:  # a whole group per question; the update and micro-batch shapes kept
        assert cfg.rl is not None
        assert cfg.rl.max_steps == 2 and cfg.rl.group_size == real.rl.group_size
        assert cfg.rl.generation == real.rl.generation and cfg.rl.micro_batch_size == real.rl.micro_batch_size
    assert cfg.eval.generation == real.eval.generation  # decoding caps and batch as on the GPU
    assert cfg.eval.compression_factors == real.eval.compression_factors and cfg.eval.n_examples == 2
    assert [d.source for d in cfg.eval.datasets] == [d.source for d in real.eval.datasets]
    assert cfg.model.lora == real.model.lora and cfg.model.dtype == real.model.dtype
    assert cfg.tracking.registered_model_name is None and cfg.output_dir == str(tmp_path)
    if real.model.name_or_path == "tiny":
        assert cfg.model.tiny.num_layers == 2 and cfg.model.tiny.hidden_size == real.model.tiny.hidden_size
    else:
        assert cfg.model.name_or_path == arch and any("random weights" in n for n in notes)
    if real.data.source.endswith("train.txt"):  # GSM8k-Aug's train file is not here: said, and replaced
        assert (cfg.data.source, cfg.data.format) == ("gsm8k-train", "gsm8k")
        assert any("gsm8k-aug/train.txt" in n and "gsm8k-train" in n for n in notes)
    else:
        assert cfg.data == real.data


def test_the_baselines_are_rehearsed_at_their_first_and_last_curriculum_stage(tmp_path):
    from colar_core.baselines.batches import curriculum_stage

    cfg, _ = rehearsal_config(recipe("table1-gpu.yaml"), RehearsalOptions(output_dir=str(tmp_path)))
    for method in (cfg.baselines.icot, cfg.baselines.coconut):
        assert method is not None
        epochs_after_one_step = 4 / 7000  # one micro-batch of 4 of GSM8K train
        assert curriculum_stage(0.0, method) == 1
        assert curriculum_stage(epochs_after_one_step, method) == method.max_stage


def test_the_carried_llama_architecture_builds_a_random_backbone_of_that_shape(tmp_path):
    arch = architecture_file("meta-llama/Llama-3.2-1B-Instruct")
    values = json.loads(arch.read_text())
    assert (
        values["hidden_size"],
        values["num_hidden_layers"],
        values["num_attention_heads"],
        values["num_key_value_heads"],
        values["intermediate_size"],
        values["vocab_size"],
    ) == (2048, 16, 32, 8, 8192, 128256)
    small = {
        **values,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "num_hidden_layers": 2,
        "vocab_size": 3000,
    }
    path = tmp_path / "llama-3.2-1b-instruct.json"  # the name keeps the paper's embedding scale
    path.write_text(json.dumps(small))
    tok = build_tokenizer([], extra_texts=["a few words to tokenize"])
    assert is_architecture_file(str(path)) and not is_architecture_file(str(tmp_path))
    torch.manual_seed(0)
    lm = build_arch_backbone(str(path), tok, torch.bfloat16)
    assert lm.dtype == torch.bfloat16 and lm.config.num_hidden_layers == 2
    assert lm.get_input_embeddings().weight.shape == (3000, 64)  # the architecture's vocabulary, not the tokenizer's
    assert lm.config.tie_word_embeddings and lm.config.rope_parameters["rope_type"] == "llama3"
    assert (lm.config.bos_token_id, lm.config.pad_token_id) == (tok.bos_token_id, tok.pad_token_id)
    through_config = load_backbone(ModelConfig(name_or_path=str(path), dtype="bfloat16"), tok)
    assert type(through_config) is type(lm) and through_config.dtype == torch.bfloat16
    cfg = recipe("gsm8k.yaml", f"model.name_or_path={path}", f"model.tokenizer={tmp_path}")
    preflight(cfg)  # an architecture file is a model source the pre-flight checks accept


def test_a_recipe_without_a_carried_architecture_is_refused_naming_the_field(tmp_path):
    from flows.config import ConfigError
    from flows.rehearsal import prepare_model

    cfg = recipe("gsm8k.yaml", "model.name_or_path=some-org/Unknown-7B")
    with pytest.raises(ConfigError, match="model.name_or_path.*Unknown-7B"):
        prepare_model(cfg, RehearsalOptions(output_dir=str(tmp_path), tokenizer="word"))


# ---------------------------------------------------------------------------------------------------------
# slow: through the pipeline

#: CI's cut: Llama-3.2-1B's architecture with 2 decoder layers, the word-level tokenizer (offline), and every
#: decoding length capped at 4 (at the recipe's 64 latents / 256 + 16 tokens, decoding with the 128,256-word
#: LM head took 43 of the 62 minutes of a 2-layer gsm8k.yaml rehearsal on 2 busy cores).
CI = ("--layers", "2", "--tokenizer", "word", "--decode-cap", "4")


def rehearse(name: str, out: Path, *overrides: str, artifacts: Path) -> dict:
    """``colar rehearse`` of configs/``name`` at CI size; its report. The stage folders and the run's MLflow
    artifacts (``artifacts``: the session server's ``mlartifacts``; each several GB of random weights at 2
    layers) are removed once the report is read."""
    from mlflow import MlflowClient

    from flows.cli import main

    args = ["rehearse", "--config", str(REPO / "configs" / name), *CI, "--output-dir", str(out)]
    for o in overrides:
        args += ["--set", o]
    try:
        code = main(args)
        report = json.loads((out / "rehearsal.json").read_text())
    finally:
        for folder in out.iterdir():
            if folder.is_dir():
                shutil.rmtree(folder, ignore_errors=True)
        for exp in MlflowClient().search_experiments():
            if exp.name.endswith("-rehearsal"):
                shutil.rmtree(artifacts / exp.experiment_id, ignore_errors=True)
    assert code == 0, json.dumps(report, indent=1)[:4000]
    return report


def check_report(report: dict, stages: list[str], lora: bool) -> None:
    """Every stage finished and measured; training stages wrote a checkpoint and a model in bf16 (fp32 at
    most for some tensors) with adapters on every LoRA target; DeepSpeed accepts the recipe's own config;
    the evaluation decoded up to its caps and no further."""
    assert list(report["stages"]) == stages  # in the order they ran
    # what a finished stage freed goes back (tasks call release_memory): each stage used to start ~1.2 GB
    # above the one before at this size, every tensor of the earlier stages gone
    starts = [report["stages"][name]["rss_at_start_gb"] for name in stages[1:]]
    assert max(starts) - starts[0] < 1.0, starts
    for name, s in report["stages"].items():
        assert s["status"] == "FINISHED", name
        assert s["wall_s"] > 0 and s["peak_rss_gb"] >= s["rss_at_start_gb"] > 0, name
        if name.startswith(("sft-", "rl")):
            assert s["checkpoints_bytes"] and min(s["checkpoints_bytes"].values()) > 0, name
            model = s["model"]
            if lora:
                assert model["lora_targets_missing"] == [] and model["lora_tensors"] > 0, name
                assert model["parts_bytes"]["adapter"] > 0 and model["parts_bytes"]["base"] > 0, name
                # the checkpoint holds what training changes, smaller than the frozen base alone (it was
                # 1.03 GB with the base, 0.78 GB with a tied LM head left in, against a 0.77 GB base)
                assert max(s["checkpoints_bytes"].values()) < model["parts_bytes"]["base"], name
            assert set(model["dtypes"]) <= {"BF16", "F32"} and "BF16" in model["dtypes"], name
    for stage, ds in report["recipe_deepspeed"].items():
        assert "error" not in ds, (stage, ds)
        assert ds["config"]["bf16"]["enabled"] and ds["config"]["train_batch_size"] == 256, stage
    caps = report["eval_decoding_caps"]
    assert max(caps["max_latents"], caps["max_answer_tokens"], caps["max_cot_tokens"]) == 4
    decoding = report["stages"]["evaluate"]["decoding"]
    assert decoding, "the evaluation's decoding lengths were not recorded"
    for key, value in decoding.items():  # a text chain's count holds its answer tokens too
        if key.endswith(("/coconut", "/distill")):
            continue  # a fixed number of continuous thoughts, no cap: the table1-gpu test
        cap = (
            caps["max_latents"]
            if key.startswith("mean_latents/")
            else caps["max_cot_tokens"] + caps["max_answer_tokens"]
        )
        assert 0 < value <= cap, (key, value)


@pytest.mark.slow
def test_gsm8k_recipe_rehearses_every_stage_on_llama_1b_cut_to_two_layers(tmp_path, mlflow_server, prefect_server,
                                                                           mlflow_state_dir):
    report = rehearse("gsm8k.yaml", tmp_path / "gsm8k", artifacts=mlflow_state_dir / "mlartifacts")
    check_report(report, ["prepare", "sft-cot", "sft-colar", "rl", "sft-nocot", "evaluate"], lora=True)
    assert report["model"]["name_or_path"].endswith("llama-3.2-1b-instruct.json")
    assert report["recipe_deepspeed"]["sft-colar"]["config"]["gradient_accumulation_steps"] == 8
    sets = {k.split("/")[1] for k in report["stages"]["evaluate"]["decoding"]}
    assert {"gsm8k", "gsm-hard", "svamp", "multiarith"} <= sets  # every test set read and decoded


@pytest.mark.slow
def test_table1_gpu_rehearses_its_own_stages_the_baselines(tmp_path, mlflow_server, prefect_server, mlflow_state_dir):
    """What table1-gpu.yaml adds to gsm8k.yaml: the soft-MSE CoLaR stage and the iCoT / Coconut / Distill
    stages (each at its last curriculum stage from step 2), evaluated beside CoLaR; its GSM8k-Aug train file
    replaced by GSM8K train, as the report says. (No-CoT and the other test sets: the gsm8k.yaml test.)"""
    report = rehearse(
        "table1-gpu.yaml",
        tmp_path / "table1",
        "eval.nocot_baseline=false",
        "eval.datasets=[{name: gsm8k, source: gsm8k-aug-test}]",
        artifacts=mlflow_state_dir / "mlartifacts",
    )
    check_report(
        report, ["prepare", "sft-cot", "sft-colar", "sft-icot", "sft-coconut", "sft-distill", "evaluate"], lora=True
    )
    assert any("gsm8k-aug/train.txt" in note for note in report["changed"])
    decoding = report["stages"]["evaluate"]["decoding"]
    assert decoding["mean_tokens/gsm8k/icot"] <= 8  # what steps remain, then the answer: both capped at 4
    # the reference's last curriculum stage: 3 removed steps x 2 thoughts; Distill's 6 thoughts
    assert decoding["mean_latents/gsm8k/coconut"] == 6 and decoding["mean_latents/gsm8k/distill"] == 6
