"""bench/gpu_session.sh: every GPU benchmark in one device command, each part under its own time limit,
one summary JSON with every part's numbers and the device's name (issue 24).

The slow tests run the script as the device runs it, at its tiny CPU size (the 1B architecture cut to the
tiny shape, a tiny GGUF for SmolLM2's path); the fast ones pin the budgets, the killing of a part past its
limit, and the joining of SmolLM2's carried GGUF parts.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time

import pytest

from bench import gpu_session
from bench.common import ROOT, peak_bf16_flops
from bench.pipeline_run import LAUNCH_VARS


def _session(tmp_path, *args: str, timeout: int = 300, **env_extra: str) -> dict:
    """``bash bench/gpu_session.sh ARGS --out tmp`` on the CPU; returns the summary JSON."""
    out = tmp_path / "session.json"
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env.update(CUDA_VISIBLE_DEVICES="", OUT=str(tmp_path / "out"), COLAR_CACHE_DIR=str(tmp_path / "cache"))
    env.pop("GPU_SESSION_BUDGET_S", None)
    env.update(env_extra)
    proc = subprocess.run(
        ["bash", "bench/gpu_session.sh", *args, "--out", str(out), "--work", str(tmp_path / "work")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"gpu_session.sh failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(out.read_text())


@pytest.mark.slow
def test_tiny_session_reports_every_part_with_numbers_and_the_device(tmp_path):
    from tests.gguf_tiny import write_tiny_gguf

    gguf = write_tiny_gguf(tmp_path / "tiny.gguf")
    data = _session(tmp_path, "--tiny", GPU_SESSION_GGUF=str(gguf))
    assert data["device_name"] == "cpu" and data["device_slug"] == "cpu" and data["tiny"] is True
    assert data["complete"] is True and list(data["parts"]) == list(gpu_session.PARTS)
    for name, part in data["parts"].items():
        assert part["status"] == "ok", (name, part.get("log_tail"))
        assert part["numbers"], name
        bad = {k: v for k, v in part["numbers"].items() if not gpu_session.is_good_number(v)}
        assert not bad, (name, bad)
    sft = data["parts"]["sft_deepspeed"]["result"]
    assert sft["cot"]["zero_stage"] == 2 and sft["config"]["lora"]["target_modules"] == ["q_proj", "v_proj"]
    assert data["parts"]["sft_torch"]["result"]["colar"]["backend"] == "torch"
    assert {"b1_latent_over_token_step", "b4_latent_over_token_step"} <= set(data["parts"]["inference"]["numbers"])
    smol = data["parts"]["smollm2"]
    assert smol["gguf"] == "$GPU_SESSION_GGUF" and smol["result"]["complete"] is True
    assert all(0 <= q["accuracy"] <= 1 for q in smol["quality"].values())
    # what the device tool brings back: the summary and each part's log
    back = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert "session.json" in back and "gpu_session_smollm2.log" in back


@pytest.mark.slow
def test_a_part_past_its_budget_is_timed_out_and_the_others_still_report(tmp_path):
    data = _session(tmp_path, "--tiny", "--parts", "sft_torch,inference", GPU_SESSION_BUDGET_SFT_TORCH_S="2")
    late, other = data["parts"]["sft_torch"], data["parts"]["inference"]
    assert late["status"] == "timed_out" and late["numbers"] == {} and late["elapsed_s"] < 30
    assert (
        other["status"] == "ok"
        and other["numbers"]
        and all(gpu_session.is_good_number(v) for v in other["numbers"].values())
    )
    assert data["complete"] is True


def test_budgets_are_shares_of_the_session_with_a_reserve_and_overrides():
    budgets = gpu_session.part_budgets(540, gpu_session.PARTS, env={})
    assert set(budgets) == set(gpu_session.PARTS)
    assert sum(budgets.values()) + gpu_session.reserve_s(540) == pytest.approx(540)
    assert gpu_session.reserve_s(540) > 0
    fixed = gpu_session.part_budgets(540, ["smollm2"], env={"GPU_SESSION_BUDGET_SMOLLM2_S": "7"})
    assert fixed == {"smollm2": 7.0}


def test_a_part_past_its_limit_is_killed_with_its_children(tmp_path):
    pid_file = tmp_path / "child.pid"
    script = (
        "import subprocess, sys, time; "
        "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
        f"open({str(pid_file)!r}, 'w').write(str(c.pid)); time.sleep(60)"
    )
    t0 = time.perf_counter()
    status, _, secs = gpu_session.run_part([sys.executable, "-c", script], 1.5, tmp_path / "log", dict(os.environ))
    assert status == "timed_out" and secs < 15 and time.perf_counter() - t0 < 15
    child = int(pid_file.read_text())
    for _ in range(50):  # the grandchild got the group's signal too
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"grandchild {child} still alive")
    assert gpu_session.run_part([sys.executable, "-c", "raise SystemExit(3)"], 30, tmp_path / "log2", dict(os.environ))[
        :2
    ] == ("failed", 3)


def test_carried_smollm2_parts_are_joined_and_checked(tmp_path, monkeypatch):
    monkeypatch.delenv("GPU_SESSION_GGUF", raising=False)
    monkeypatch.setattr(
        gpu_session,
        "smollm2_meta",
        lambda: {"member": "pkg/model.gguf", "sha256": hashlib.sha256(b"abcdef").hexdigest()},
    )
    root, work = tmp_path / "repo", tmp_path / "work"
    work.mkdir()
    a, b = (root / gpu_session.CARRY_DIR / d for d in gpu_session.SMOLLM2_PARTS)
    a.mkdir(parents=True)
    (a / "model.gguf.part1").write_bytes(b"abc")
    path, how = gpu_session.find_smollm2_gguf(work, root)
    assert path is None and "smollm2-b" in how  # the second call came without the first's part, or vice versa
    b.mkdir(parents=True)
    (b / "model.gguf.part2").write_bytes(b"def")
    path, how = gpu_session.find_smollm2_gguf(work, root)
    assert path is not None and path.read_bytes() == b"abcdef" and "joined" in how
    (b / "model.gguf.part2").write_bytes(b"xyz")
    path, how = gpu_session.find_smollm2_gguf(work, root)
    assert path is None and "sha256" in how


def test_device_names_give_the_result_file_and_the_mfu_peak():
    assert gpu_session.slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert peak_bf16_flops("NVIDIA H100 80GB HBM3")[0] == 989e12
    assert peak_bf16_flops("NVIDIA H100 PCIe")[0] == 756e12
    assert peak_bf16_flops("NVIDIA H200")[0] == 989e12
    assert peak_bf16_flops("NVIDIA A100-SXM4-80GB")[0] == 312e12
    flops, source = peak_bf16_flops("cpu")
    assert flops == 989e12 and "not in the table" in source
