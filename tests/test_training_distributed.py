"""Multi-process training and crash recovery, run the way a user runs them (subprocesses, CPU, gloo).

* 2 processes under ``torchrun`` (ZeRO-2) and under the ``deepspeed`` launcher (ZeRO-3), both
  started through ``colar_core.training.launch.launch``: one consistent checkpoint, an exported
  model that loads.
* SIGKILL after the first complete checkpoint, then the same command again: it resumes from that
  checkpoint and finishes the same number of steps.

Slow (each run pays Python + torch + DeepSpeed start-up, ~10 s per process on a 2-core runner);
CI runs them too.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.common import ROOT
from bench.pipeline_run import clean_env
from colar_core.model import ColarModel
from colar_core.training.callbacks import read_metrics
from colar_core.training.checkpoint import COMPLETE, complete_checkpoints, latest_checkpoint
from colar_core.training.config import LauncherConfig
from colar_core.training.launch import launch
from colar_core.training.sft import SFTResult
from tests.helpers import sigkill_after_first_checkpoint

pytestmark = pytest.mark.slow


def job_file(tmp_path: Path, out: Path, **train) -> Path:
    spec = {
        "output_dir": str(out),
        "model": {"tiny": {"arch": "llama", "hidden_size": 64, "num_layers": 2, "num_heads": 4}},
        "data": {"builtin_train": 48, "builtin_val": 6},
        "train": {"objective": {"mode": "colar", "compression_factors": [1, 2]}, "batch_size": 8, "lr": 3e-3,
                  "generation": {"do_sample": False, "sample_latents": False, "max_latents": 6}, **train},
    }
    path = tmp_path / f"{out.name}.json"
    path.write_text(json.dumps(spec))
    return path


@pytest.mark.parametrize("launcher,zero_stage", [("torchrun", 2), ("deepspeed", 3)])
def test_two_processes_write_one_consistent_checkpoint(tmp_path, launcher, zero_stage):
    out = tmp_path / f"run-{launcher}"
    job = job_file(tmp_path, out, max_steps=6, checkpoint_every=3, eval_every=6, eval_size=6,
                   zero_stage=zero_stage)
    lines: list[str] = []
    launch(job, LauncherConfig(num_gpus=2, launcher=launcher), env=clean_env(), on_line=lines.append)

    found = complete_checkpoints(out / "checkpoints")
    assert [s for s, _ in found] == [3, 6]
    for step, ckpt in found:
        ranks = [torch.load(ckpt / f"rank_{r:05d}.pt", weights_only=True) for r in (0, 1)]
        assert [s["step"] for s in ranks] == [step, step] and [s["rank"] for s in ranks] == [0, 1]
        assert all(s["world_size"] == 2 for s in ranks)
        assert ranks[0]["stateful"]["data"]["index"] == ranks[1]["stateful"]["data"]["index"]
        state = json.loads((ckpt / "trainer_state.json").read_text())
        assert state["step"] == step and state["world_size"] == 2
        assert json.loads((ckpt / COMPLETE).read_text())["step"] == step  # the manifest of every rank's files
        shards = sorted(p.name for p in (ckpt / "engine" / "ds").iterdir())
        assert [p for p in shards if p.endswith("optim_states.pt")] == [
            "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert not list((out / "checkpoints").glob(".tmp-*"))

    result = SFTResult.load(out)
    assert result.final_step == 6
    assert any("[train] step 6/6" in line for line in lines)  # progress reaches the caller's log through the pipe
    starts = read_metrics(out / "metrics.jsonl", "start")
    assert starts[0]["world_size"] == 2
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl", "step")] == list(range(1, 7))
    model = ColarModel.from_pretrained(result.model_dir)
    assert model.state.trained_compression_factors == [1, 2]
    if zero_stage == 2:  # the export holds the same weights as the checkpoint's module state
        module = torch.load(found[-1][1] / "engine" / "ds" / "mp_rank_00_model_states.pt",
                            map_location="cpu", weights_only=False)["module"]
        exported = model.state_dict()
        assert all(torch.equal(module[f"model.{k}"], v) for k, v in exported.items())
    else:  # ZeRO-3 gathered the partitioned parameters before exporting
        emb = model.causal_lm.get_input_embeddings().weight
        assert emb.shape[1] == 64 and emb.abs().sum() > 0


def test_sigkilled_run_resumes_from_its_last_checkpoint(tmp_path):
    out = tmp_path / "run-kill"
    job = job_file(tmp_path, out, max_steps=150, checkpoint_every=20, zero_stage=2)
    cmd = [sys.executable, "-m", "colar_core.training.sft_main", "--config", str(job)]
    env = clean_env()
    sigkill_after_first_checkpoint(cmd, env, out, tmp_path / "first.log")
    killed_at = latest_checkpoint(out)
    resume_step = int(killed_at.name.split("_")[1])
    assert 20 <= resume_step < 150

    second = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-3000:]
    starts = read_metrics(out / "metrics.jsonl", "start")
    assert [s["resumed_from"] for s in starts] == [None, resume_step]
    assert starts[1]["step"] == resume_step  # it continued from the checkpoint, not from 0
    steps = [r["step"] for r in read_metrics(out / "metrics.jsonl", "step")]
    assert steps == list(range(1, 151))  # each step once: the dead run's steps after its checkpoint were redone
    result = SFTResult.load(out)
    assert result.final_step == 150 and result.resumed_from == resume_step
    assert [s for s, _ in complete_checkpoints(out / "checkpoints")] == [140, 150]  # keep_checkpoints=2
    ColarModel.from_pretrained(result.model_dir)


def test_failed_launch_raises_with_the_output_tail(tmp_path):
    from colar_core.training.launch import LaunchError

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"output_dir": str(tmp_path / "x"), "train": {"zero_stage": 7}}))
    with pytest.raises(LaunchError) as err:
        launch(bad, LauncherConfig(num_gpus=2, launcher="torchrun"), env=clean_env(), on_line=lambda line: None)
    assert err.value.returncode != 0 and "zero_stage" in err.value.tail
