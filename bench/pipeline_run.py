"""Starting this checkout's code in a subprocess: the tiny pipeline, the ``colar`` command line and the
subprocess environment.

Shared by the benchmarks that start pipelines (bench/chaos.py, bench/concurrent_pipelines.py) and by
the tests, which start ``colar`` and training jobs the same way (tests may import bench; bench never
imports tests).
"""

from __future__ import annotations

import os
import sys

from bench.common import ROOT

#: The variables a launcher (torchrun, deepspeed) sets for each process. A subprocess started from a
#: process that trained in-process must not inherit them (its MASTER_PORT is taken): it is a job of its own.
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")

#: A pipeline small enough for a test (``--set`` overrides of the default config): every stage runs,
#: nothing is meant to be accurate.
TINY = [
    "name=test-pipeline",
    "data.builtin.n_train=64", "data.builtin.n_val=8", "data.builtin.n_test=8",
    "model.tiny.hidden_size=32", "model.tiny.num_layers=1", "model.tiny.num_heads=2",
    "sft_cot.max_steps=4", "sft_cot.warmup_steps=0", "sft_colar.warmup_steps=0", "sft_cot.batch_size=8", "sft_cot.checkpoint_every=2",
    "sft_colar.max_steps=6", "sft_colar.batch_size=8", "sft_colar.checkpoint_every=2",
    "sft_colar.objective.compression_factors=[1,2]",
    "eval.compression_factors=[1,2]", "eval.seeds=[0]", "eval.n_examples=8",
    "eval.generation.max_latents=6", "eval.generation.max_cot_tokens=16", "eval.generation.max_answer_tokens=4",
    "tracking.registered_model_name=colar-test",
    # The embedded default trains RL and the No-CoT baseline; tests add them where they test them
    # (an `rl.*` override on top of `rl=null` starts from RLConfig's defaults).
    "rl=null", "eval.nocot_baseline=false",
]


def clean_env() -> dict:
    """This process's environment for a job of its own (a launcher, a training job): no launcher
    variables (:data:`LAUNCH_VARS`), one torch thread (tiny models; two spinning threads per process
    thrash a 2-core runner), and this checkout first on ``PYTHONPATH``."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def cli_env(**extra) -> dict:
    """Environment of a ``colar`` subprocess: :func:`clean_env`, with ``CI=1`` (no console progress bars
    in its log), unbuffered output, and ``extra`` on top."""
    return {**clean_env(), "CI": "1", "PYTHONUNBUFFERED": "1", **extra}


def colar_cmd(*args: str, overrides=()) -> list[str]:
    """``colar ARGS --set O1 --set O2 ...`` as this checkout's interpreter runs it."""
    cmd = [sys.executable, "-m", "flows.cli", *args]
    for o in overrides:
        cmd += ["--set", o]
    return cmd
