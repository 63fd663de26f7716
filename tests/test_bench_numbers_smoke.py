"""bench.merge_order and bench.smollm2_throughput run end to end at their smoke size and write the JSON
the docs read (numbers not checked, only their shape). Neither needs SmolLM2 at this size."""

from __future__ import annotations

import json

import pytest

from tests.helpers import is_number, run_bench


@pytest.mark.slow
def test_merge_order_tiny_writes_every_condition_and_a_table(tmp_path):
    out = tmp_path / "merge.json"
    run_bench("bench.merge_order", "--tiny", "--work", str(tmp_path / "work"), "--out", str(out), timeout=300)
    data = json.loads(out.read_text())
    assert set(data["summary"]) == {"cot/digits", "cot/whole", "digits/sqrt", "digits/rotate", "digits/gain",
                                    "whole/sqrt"}
    for c in ("1", "2", "3"):
        row = data["summary"]["digits/gain"]["final"][c]
        assert 0 <= row["accuracy"] <= 1 and is_number(row["mean_latents"])
        assert "half" in data["summary"]["whole/sqrt"]
    per_seed = data["per_seed"]["0"]
    assert per_seed["cot/whole"]["vocab"] > per_seed["cot/digits"]["vocab"]  # the number tokens were added
    assert "| digits/rotate |" in out.with_suffix(".md").read_text()


@pytest.mark.slow
def test_smollm2_throughput_tiny_times_full_lora_and_decoding(tmp_path):
    out = tmp_path / "smol.json"
    run_bench("bench.smollm2_throughput", "--tiny", "--out", str(out), timeout=300)
    data = json.loads(out.read_text())
    assert set(data["train"]) == {"full_r1", "full_r3", "lora_r1", "lora_r3"}
    assert all(v["tokens_per_s"] > 0 for v in data["train"].values())
    assert data["train"]["lora_r1"]["trainable_params"] < data["train"]["full_r1"]["trainable_params"]
    assert {"cot", "latent_c2"} == set(data["decode"]) and data["decode"]["cot"]["steps_per_s"] > 0
    assert data["recipe"]["cpu_estimate"]["sft_total_hours"] > 0 and data["gpu"] == "pending"
    assert data["tiny"] is True
