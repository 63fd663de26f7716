"""The benchmark scripts run end to end at their tiniest size and write the JSON the docs promise.

Each script runs as a subprocess (as a user would start it), on the CPU, with one or two steps;
the numbers are not checked, only that they exist and have the right shape. GPU result files
(``bench/results/sft_throughput.json`` / ``inference_speed.json``) are never written here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import is_number, run_bench


@pytest.mark.slow
def test_sft_throughput_tiny_writes_both_phases(tmp_path):
    out = tmp_path / "sft.json"
    run_bench("bench.sft_throughput", "--tiny", "--isolate", "none", "--steps", "1", "--warmup", "1",
              "--micro-batch", "2", "--seq-len", "16", "--out", str(out))
    data = json.loads(out.read_text())
    assert {"device", "plain", "colar", "config", "versions", "command", "flops", "targets"} <= set(data)
    for phase in ("plain", "colar"):
        assert {"tokens_per_s", "tflops", "mfu", "step_time_ms", "tokens_per_step"} <= set(data[phase])
        assert data[phase]["tokens_per_s"] > 0 and data[phase]["tflops"] > 0
    assert data["plain"]["tokens_per_step"] == 2 * 16  # micro-batch x seq-len
    assert data["colar"]["per_r"] and 0 <= data["colar"]["padding_fraction"] < 1
    assert data["tiny"] is True and data["targets"]["plain_tflops"]["met"] is None  # no verdict off-GPU
    assert data["config"]["zero_stage"] == 2 and data["config"]["model"]["vocab_size"] == 2000
    assert "bench.sft_throughput" in data["command"]


@pytest.mark.slow
def test_inference_speed_tiny_writes_ratios_and_questions_per_s(tmp_path):
    out = tmp_path / "inf.json"
    run_bench("bench.inference_speed", "--tiny", "--batch-sizes", "2", "--factors", "2,4", "--reps", "1",
              "--warmup", "0", "--probe-start", "1", "--probe-steps", "2", "--cot-tokens", "8",
              "--question-tokens", "20", "--out", str(out))
    data = json.loads(out.read_text())
    assert {"device", "latent_step_over_token_step", "c4_over_cot", "questions_per_s", "batches", "config",
            "versions", "command"} <= set(data)
    assert set(data["questions_per_s"]["2"]) == {"cot", "c2", "c4"}
    assert all(is_number(v) and v > 0 for v in data["questions_per_s"]["2"].values())
    b = data["batches"]["2"]
    assert {"token_step_ms", "latent_step_ms", "e2e_ms", "over_cot", "components_ms"} <= set(b)
    assert b["chain_lengths"] == {"cot": 8, "c2": 4, "c4": 2}
    assert is_number(data["c4_over_cot"]) and data["c4_over_cot"] == b["over_cot"]["c4"]


def test_phase_children_get_the_parents_arguments_but_not_its_output():
    from bench.sft_throughput import child_argv

    cmd = child_argv(["--tiny", "--out", "x.json", "--steps", "3", "--phases=plain"], "colar", Path("p.json"))
    assert cmd[1:3] == ["-m", "bench.sft_throughput"]
    assert cmd[3:] == ["--tiny", "--steps", "3", "--isolate", "none", "--phase", "colar", "--phase-out", "p.json"]


def test_cpu_and_tiny_runs_never_write_the_gpu_result_files():
    import torch

    from bench.common import default_out

    assert default_out("sft_throughput", torch.device("cpu"), True).name == "sft_throughput_cpu_tiny.json"
    assert default_out("inference_speed", torch.device("cuda"), True).name == "inference_speed_cuda_tiny.json"
    assert default_out("inference_speed", torch.device("cuda"), False).name == "inference_speed.json"


def test_flop_counts_match_the_model():
    from transformers import AutoModelForCausalLM

    from bench.common import LLAMA_3_2_1B, TINY, attention_train_flops, latent_head_param_count
    from colar_core.latent_head import LatentHead

    assert LLAMA_3_2_1B.param_count() == 1_235_814_400  # Llama-3.2-1B
    model = AutoModelForCausalLM.from_config(TINY.hf_config())
    assert sum(p.numel() for p in model.parameters()) == TINY.param_count()
    assert sum(p.numel() for p in LatentHead(64).parameters()) == latent_head_param_count(64)
    # 12 * L * d * n per token of an n-token row: 32 rows of 256 tokens
    assert attention_train_flops(LLAMA_3_2_1B, [256] * 32) == 12 * 16 * 2048 * 256 * 256 * 32


def test_lora_flops_count_the_adapters_the_recipe_trains():
    import torch

    from bench.common import LLAMA_3_2_1B, attention_train_flops, lora_param_count
    from bench.sft_throughput import build_backbone, step_flops
    from colar_core.config import LoraConfig

    model = build_backbone(LLAMA_3_2_1B, torch.device("meta"), 0, "sdpa", lora=LoraConfig(r=128))  # no memory
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert trained == lora_param_count(LLAMA_3_2_1B, 128, ["q_proj", "v_proj"]) == 13_631_488
    assert frozen == LLAMA_3_2_1B.param_count()
    # a frozen weight runs forward and passes the input gradient (4 per token); a trained one also
    # computes its weight gradient (6)
    step = {"positions": 100, "rows": [60, 40], "lm_head_rows": 30, "latent_head_rows": 0}
    attn = attention_train_flops(LLAMA_3_2_1B, [60, 40])
    lora = step_flops(LLAMA_3_2_1B, trained, 0, step)
    assert lora["nominal"] == (4 * frozen + 6 * trained) * 100 + attn
    assert lora["nominal_6n"] == 6 * (frozen + trained) * 100 + attn
    full = step_flops(LLAMA_3_2_1B, 0, 0, step)
    assert full["nominal"] == full["nominal_6n"] == 6 * frozen * 100 + attn


def test_quality_bench_runs_every_stage_at_tiny_size(tmp_path):
    """All stages (data, no-CoT, CoT, CoLaR, RL, eval) run and the JSON has the issue's keys."""
    import json

    from bench.quality import main

    results = tmp_path / "quality.json"
    assert main(["--tiny", "--out", str(tmp_path / "work"), "--results", str(results)]) == 0
    data = json.loads(results.read_text())
    assert {"device", "nocot", "cot", "colar", "colar_rl"} <= set(data)
    assert set(data["colar"]) == {"1", "2", "3", "4", "5"}
    assert {"accuracy", "ci95", "mean_len"} <= set(data["cot"])
    assert {"c", "accuracy", "ci95", "mean_len", "sft_accuracy", "sft_mean_len"} <= set(data["colar_rl"])
    assert (tmp_path / "quality.png").stat().st_size > 1000


def test_inference_summary_line_survives_a_noisy_token_step():
    # reps=1 on a busy machine can time the longer CoT probe no slower than the shorter one: the ratio is
    # then None and the bench must still finish (CI once failed formatting it)
    from bench.inference_speed import summary_line

    res = {"token_step_ms": -0.5, "latent_step_ms": 1.0, "latent_step_over_token_step": None,
           "e2e_ms": {"cot": 10.0, "c4": 4.0}, "over_cot": {"c4": 0.4}}
    line = summary_line(2, res)
    assert "ratio n/a" in line and "c4/cot 0.400" in line
    assert "(x2.000)" in summary_line(2, {**res, "latent_step_over_token_step": 2.0})
