"""Helpers shared by several test modules: the one place tests take them from (a test module never
imports another ``test_*.py``; tests/test_layering.py checks it).

What the benchmarks need as well lives in bench/ (bench never imports tests): the tiny problems and
models in bench/tiny.py, the tiny RL start in bench/tiny_rl.py, and the tiny pipeline, the ``colar``
command line and the subprocess environment in bench/pipeline_run.py. Here, what only tests need:

- training doubles: callbacks that crash or act at a step, a toy model and a real training loop on it;
- processes: a job killed right after its first checkpoint;
- the pipeline: the tiny pipeline's config, a parent run's stage runs in MLflow;
- PostgreSQL: the tests' server (required, not optional);
- bad inputs: a data file with every kind of bad row, a pickle that runs code when loaded;
- benchmarks: a bench script run as a user runs it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch
from torch import nn

from bench.common import ROOT
from bench.pipeline_run import LAUNCH_VARS, TINY
from colar_core.training.checkpoint import COMPLETE, CheckpointManager
from colar_core.training.config import TrainConfig
from colar_core.training.engines import TorchEngine
from colar_core.training.loop import LoopPlan, StepBatch, train_loop

if TYPE_CHECKING:
    from colar_infra.backends import PgServer
    from flows.config import PipelineConfig

# --------------------------------------------------------------------------------------------
# training doubles


class Crash(Exception):
    """What :class:`CrashAt` raises."""


class CrashAt:
    """A training callback that raises after ``step``: a run dying between two checkpoints."""

    def __init__(self, step: int):
        self.step = step

    def on_step(self, step: int, metrics: dict) -> None:
        if step == self.step:
            raise Crash(step)


class AtStep:
    """A training callback that calls ``action()`` once, when ``step`` is reached (a fault injected
    at a chosen moment of a real run: a server stopped, a file removed)."""

    def __init__(self, step: int, action):
        self.step, self.action, self.done = step, action, False

    def on_step(self, step: int, metrics: dict) -> None:
        if step == self.step and not self.done:
            self.done = True
            self.action()


class Toy(nn.Module):
    """A one-layer regression model: the smallest thing the training loop and its engines train."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 1)


def toy_loop(out, max_steps=30, callbacks=(), checkpoint_every=10):
    """A real training loop (torch engine, checkpoints) on a toy regression: the SFT/RL loop's code path."""
    torch.manual_seed(0)
    model = Toy()
    cfg = TrainConfig(backend="torch", lr=0.1, grad_clip=0.0, max_steps=max_steps, checkpoint_every=checkpoint_every)
    engine = TorchEngine(model, cfg)
    x, w = torch.randn(64, 4), torch.tensor([[1.0], [-2.0], [0.5], [3.0]])

    def batches(step):
        idx = [(step * 8 + i) % 64 for i in range(8)]
        return StepBatch([(x[idx], x[idx] @ w)])

    def loss_fn(m, b):
        return {"loss": ((m.lin(b[0]) - b[1]) ** 2).mean()}

    manager = CheckpointManager(out, keep=2)
    return train_loop(engine, batches, loss_fn, LoopPlan(max_steps=max_steps, checkpoint_every=checkpoint_every),
                      checkpoints=manager, callbacks=list(callbacks))


# --------------------------------------------------------------------------------------------
# processes


def sigkill_at_checkpoint(cmd: list, env: dict, root: Path, pattern: str, log_path: Path, *, timeout_s: float,
                          tail: int, what: str) -> None:
    """Start ``cmd`` (in the repository), SIGKILL it as soon as ``root.glob(pattern)`` finds a complete
    checkpoint; fail with the log's last ``tail`` characters if it exits first, or with ``what`` after
    ``timeout_s``."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        deadline = time.time() + timeout_s
        while not list(root.glob(pattern)):
            assert proc.poll() is None, log_path.read_text()[-tail:]
            assert time.time() < deadline, what
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL


def sigkill_after_first_checkpoint(cmd: list, env: dict, out: Path, log_path: Path) -> None:
    """Start a job's command, SIGKILL it as soon as its first complete checkpoint exists in ``out``."""
    sigkill_at_checkpoint(cmd, env, out / "checkpoints", f"step_*/{COMPLETE}", log_path, timeout_s=240, tail=3000,
                          what="no checkpoint appeared")


# --------------------------------------------------------------------------------------------
# the pipeline


def tiny_config(tmp_path, *extra) -> PipelineConfig:
    """The tiny pipeline's config (bench/pipeline_run.py's ``TINY``), writing under ``tmp_path/runs``."""
    from flows.config import load_config

    return load_config(None, TINY + [f"output_dir={tmp_path / 'runs'}", *extra])


def child_runs(client, parent_id: str) -> list:
    """The stage runs (MLflow child runs) of the parent run ``parent_id``."""
    exp = client.get_run(parent_id).info.experiment_id
    return client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")


# --------------------------------------------------------------------------------------------
# PostgreSQL

#: The tests' PostgreSQL server: ``$COLAR_TEST_DB_URL``, default the one CI runs (.ci/run starts Debian's).
DB_URL = os.environ.get("COLAR_TEST_DB_URL", "postgresql://postgres@127.0.0.1:5432")


def require_postgres(url: str = DB_URL) -> PgServer:
    """The PostgreSQL server of the tests; the test fails (not skips) when it does not answer."""
    from colar_infra.backends import DatabaseError, PgServer

    pg = PgServer.parse(url)
    try:
        pg.exists("postgres")
    except DatabaseError as err:
        pytest.fail(f"{err}. The production-backend tests need PostgreSQL (CI runs one on 127.0.0.1:5432; "
                    ".ci/run installs and starts Debian's where none answers); set COLAR_TEST_DB_URL for another.")
    return pg


# --------------------------------------------------------------------------------------------
# bad inputs

#: A valid record of the JSON-lines format.
GOOD_ROW = {"question": "Tom has 3 bags of 4 apples. He eats 2. How many are left?", "steps": ["3*4=12", "12-2=10"],
            "answer": "10"}
TEN_MB = 10 * 1024 * 1024


def huge_row() -> bytes:
    """A syntactically valid JSON record of 10 MB: only its size is wrong."""
    return json.dumps({**GOOD_ROW, "question": "Why? " + "x" * TEN_MB}).encode()


def mixed_file(path: Path) -> tuple[str, int, int]:
    """20 good rows and one of every kind of bad row; returns (path, n_good, n_bad)."""
    good = [json.dumps({"question": f"Q{i}: {i}+{i}?", "steps": [f"{i}+{i}={2 * i}"], "answer": str(2 * i)}).encode()
            for i in range(20)]
    bad = [
        b'{"question": "Q", "steps": [',  # unparsable JSON
        json.dumps({"question": "Q", "answer": "1"}).encode(),  # missing field (steps)
        json.dumps({"question": "  ", "steps": [], "answer": "1"}).encode(),  # empty question
        json.dumps({"question": "Q", "steps": [], "answer": ""}).encode(),  # empty answer
        json.dumps({"question": "Q", "steps": ["2*=4"], "answer": "4"}).encode(),  # equation does not evaluate
        json.dumps({"question": "Q", "steps": ["2+2=5"], "answer": "5"}).encode(),  # wrong value
        json.dumps({"question": "Q", "steps": [], "answer": "twelve"}).encode(),  # non-numeric answer
        b'{"question": "caf\xff", "steps": [], "answer": "1"}',  # invalid UTF-8
        huge_row(),  # 10 MB line
    ]
    lines = good[:10] + bad + good[10:]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return str(path), len(good), len(bad)


class Payload:
    """Unpickling this creates a file: proof that a pickle was executed."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


# --------------------------------------------------------------------------------------------
# benchmarks


def run_bench(module: str, *args: str, timeout: int = 120) -> None:
    """``python -m MODULE ARGS`` as a job of its own, at the CPU smoke size even on a GPU machine;
    fails the test, with the output's tail, unless it exits 0."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}  # a job of its own
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env["CUDA_VISIBLE_DEVICES"] = ""  # the smoke size, even on a GPU machine
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"{module} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def is_number(x) -> bool:
    """An int or a float (not a bool): what a number in a result JSON must be."""
    return isinstance(x, (int, float)) and not isinstance(x, bool)
