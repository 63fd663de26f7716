"""The RL stage as the pipeline runs it: a job file naming an SFT model directory and data files,
in process and as a subprocess that is SIGKILLed after its first checkpoint and started again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.common import ROOT
from bench.pipeline_run import LAUNCH_VARS, clean_env
from bench.tiny import PROBLEMS, encoder_for
from bench.tiny_rl import sft_start
from colar_core.config import GenerationConfig
from colar_core.inference import generate
from colar_core.model import ColarModel
from colar_core.rl.trainer import RLJob, RLResult, run_rl_stage
from colar_core.training.callbacks import read_metrics
from colar_core.training.checkpoint import complete_checkpoints, latest_checkpoint
from tests.helpers import sigkill_after_first_checkpoint

pytestmark = pytest.mark.one_torch_thread  # see tests/conftest.py


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """An SFT model directory (with tokenizer/) and train / val JSONL files as prepare_data writes them."""
    root = tmp_path_factory.mktemp("rl-inputs")
    model_dir = sft_start(root / "sft-model", steps=60)
    for name, recs in (("train.jsonl", PROBLEMS), ("val.jsonl", PROBLEMS[:2])):
        (root / name).write_text("".join(json.dumps(r.to_dict()) + "\n" for r in recs))
    return model_dir, root / "train.jsonl", root / "val.jsonl"


def job_spec(out: Path, inputs, **rl) -> dict:
    model_dir, train, val = inputs
    spec = {"max_steps": 4, "questions_per_step": 2, "group_size": 4, "lr": 1e-4, "backend": "torch",
            "generation": {"max_latents": 8, "max_answer_tokens": 6}, "checkpoint_every": 2}
    spec.update(rl)
    return {"output_dir": str(out), "init_from": str(model_dir), "data": {"train": str(train), "val": str(val)},
            "rl": spec}


def test_job_runs_in_process_validates_and_exports_a_model_inference_loads(inputs, tmp_path):
    job = RLJob.model_validate(job_spec(tmp_path / "run", inputs, eval_every=2, eval_size=2, final_model="best",
                                        eval_generation={"do_sample": False, "sample_latents": False,
                                                         "max_latents": 8}))
    assert RLJob.model_validate_json(job.model_dump_json()) == job
    result = run_rl_stage(job)
    assert result.final_step == 4 and result.best_step in (2, 4) and result.best_val_accuracy is not None
    assert (result.model_dir / "tokenizer").is_dir()
    evals = read_metrics(result.metrics_path, "eval")
    assert [e["step"] for e in evals] == [2, 4] and {"acc_c2", "mean_latents_c2", "score"} <= set(evals[0])
    assert RLResult.load(tmp_path / "run") == result
    saved = json.loads((tmp_path / "run" / "rl_config.json").read_text())
    assert saved["group_size"] == 4 and saved["lr"] == 1e-4
    model, tok = ColarModel.load_dir(result.model_dir)  # what inference and evaluation do
    gens = generate(model, encoder_for(tok), [p.question for p in PROBLEMS], "latent", 2,
                    GenerationConfig(max_latents=8, max_answer_tokens=6), seed=0)
    assert len(gens) == 4 and all(1 <= g.n_latents <= 8 for g in gens)
    with pytest.raises(ValueError, match="init_from"):
        RLJob.model_validate({"output_dir": str(tmp_path / "x")})


@pytest.mark.slow
def test_sigkilled_rl_run_resumes_from_its_last_checkpoint(inputs, tmp_path):
    """DeepSpeed ZeRO-2, one process, started the way launchers start it (``-m colar_core.rl.rl_main``)."""
    out = tmp_path / "run-kill"
    job = tmp_path / "job.json"
    job.write_text(json.dumps(job_spec(out, inputs, backend="deepspeed", zero_stage=2, max_steps=60,
                                       checkpoint_every=10)))
    cmd = [sys.executable, "-m", "colar_core.rl.rl_main", "--config", str(job)]
    env = clean_env()
    sigkill_after_first_checkpoint(cmd, env, out, tmp_path / "first.log")
    resume_step = int(latest_checkpoint(out).name.split("_")[1])
    assert 10 <= resume_step < 60
    rank_state = torch.load(latest_checkpoint(out) / "rank_00000.pt", weights_only=True)
    assert rank_state["stateful"]["data"]["rollouts"] == resume_step  # the rollout stream is checkpointed

    second = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-3000:]
    starts = read_metrics(out / "metrics.jsonl", "start")
    assert [s["resumed_from"] for s in starts] == [None, resume_step] and starts[1]["step"] == resume_step
    steps = read_metrics(out / "metrics.jsonl", "step")
    assert [r["step"] for r in steps] == list(range(1, 61))  # each once: the dead run's extra steps were redone
    assert [r["rollout"] for r in steps] == list(range(1, 61))
    result = RLResult.load(out)
    assert result.final_step == 60 and result.resumed_from == resume_step
    assert json.loads(second.stdout.strip().splitlines()[-1])["result"]["final_step"] == 60
    assert [s for s, _ in complete_checkpoints(out / "checkpoints")] == [50, 60]
    ColarModel.from_pretrained(result.model_dir)


@pytest.mark.slow
def test_two_processes_under_zero3_share_one_run(inputs, tmp_path, monkeypatch):
    """``run_rl_stage`` with two processes starts the launcher (torchrun on CPU); each process rolls
    out its own questions, rollout statistics are summed over both, ZeRO-3 gathers for generation."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p))
    for var in LAUNCH_VARS:
        monkeypatch.delenv(var, raising=False)
    out = tmp_path / "run-2p"
    job = RLJob.model_validate(job_spec(out, inputs, backend="deepspeed", zero_stage=3, max_steps=4,
                                        checkpoint_every=2, launcher={"num_gpus": 2, "launcher": "torchrun"}))
    lines: list[str] = []
    result = run_rl_stage(job, on_line=lines.append)
    assert result.final_step == 4, "\n".join(lines[-40:])
    steps = read_metrics(result.metrics_path, "step")
    # 2 processes x 2 questions x 4 samples: shares are multiples of 1/16, group shares of 1/4
    assert all(abs(s["accuracy"] * 16 - round(s["accuracy"] * 16)) < 1e-9 for s in steps)
    assert all(abs(s["zero_var_groups"] * 4 - round(s["zero_var_groups"] * 4)) < 1e-9 for s in steps)
    assert read_metrics(result.metrics_path, "start")[0]["world_size"] == 2
    ranks = [torch.load(latest_checkpoint(out) / f"rank_{r:05d}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0]["stateful"]["data"]["index"] == ranks[1]["stateful"]["data"]["index"]
    assert not torch.equal(ranks[0]["stateful"]["data"]["gen_rng"], ranks[1]["stateful"]["data"]["gen_rng"])
    ColarModel.from_pretrained(result.model_dir)
