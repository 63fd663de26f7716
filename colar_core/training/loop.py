"""The one training loop that SFT and RL share, typed by what it needs and nothing more.

:func:`train_loop` asks a :class:`BatchSource` for the micro-batches of each optimizer step, runs
the :class:`LossFn` on each through the :class:`~colar_core.training.engines.Engine`, logs through
callbacks (rank 0 only), validates and keeps the best models (:class:`Validation`), stops early, and
checkpoints through a :class:`Checkpoints` store so that a killed run resumes where it left off.
How long and how often is a :class:`LoopPlan`; where the loop is, a :class:`LoopState` (saved in
every checkpoint).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Protocol, Sequence

import torch

from colar_core.training.callbacks import Callback, CallbackList
from colar_core.training.engines import Engine
from colar_core.training.schedule import LRSchedule


# ----------------------------------------------------------------------------------------------
# What the loop works with
# ----------------------------------------------------------------------------------------------
@dataclass
class StepBatch:
    """The micro-batches of one optimizer step (``grad_accum`` of them) and values to log with it."""

    micro_batches: list
    info: dict = field(default_factory=dict)


@dataclass
class LoopState:
    """Where the loop is; saved in every checkpoint (``trainer_state.json``)."""

    step: int = 0
    best_score: Optional[float] = None  # best validation score so far
    best_step: Optional[int] = None
    best: list = field(default_factory=list)  # exported best-k models: [{"step", "score", "path"}], best first
    evals_since_best: int = 0
    last_eval_step: int = -1
    finished: bool = False
    stopped_early: bool = False
    resumed_from: Optional[int] = None

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "resumed_from"}

    @classmethod
    def from_dict(cls, d: dict) -> "LoopState":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class LoopPlan:
    """How long the loop runs and how often it logs, validates and checkpoints (0 = never)."""

    max_steps: int
    checkpoint_every: int = 0  # besides the final checkpoint
    eval_every: int = 0  # besides the final evaluation (only with a Validation)
    keep_best: int = 1  # best-k exported models
    early_stopping_patience: Optional[int] = None  # evaluations without improvement
    log_every: int = 1  # steps averaged into one on_step


@dataclass(frozen=True)
class Validation:
    """``evaluate(step) -> metrics`` (its ``score``, higher is better, ranks models and drives early
    stopping) and ``save_best(step) -> path``, which exports a model that made the best-k."""

    evaluate: Callable[[int], dict]
    save_best: Optional[Callable[[int], Path]] = None


class BatchSource(Protocol):
    """Gives the :class:`StepBatch` of 0-based optimizer step ``step``."""

    def __call__(self, step: int) -> StepBatch: ...


class LossFn(Protocol):
    """``loss_fn(model, micro_batch)``: a dict with a scalar ``loss`` and any scalar parts to log."""

    def __call__(self, model: torch.nn.Module, micro_batch: Any, /) -> dict: ...


class Stateful(Protocol):
    """Anything whose state a checkpoint keeps (data position, random streams, model state)."""

    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


class Checkpoints(Protocol):
    """What the loop asks of a checkpoint store (:class:`~colar_core.training.checkpoint.CheckpointManager`).
    Every method is collective."""

    def restore(self, engine: Engine, stateful: Optional[Mapping[str, Stateful]] = None) -> Optional[LoopState]: ...
    def save(self, engine: Engine, state: LoopState, stateful: Optional[Mapping[str, Stateful]] = None) -> Path: ...
    def remove_exports(self, paths: Sequence[str], engine: Engine) -> None: ...


# keys of loss_fn's output that are counts (summed over micro-batches and processes), not means
_COUNT_KEYS = ("n_positions", "n_label_tokens", "n_tokens")


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------
def train_loop(engine: Engine, batches: BatchSource, loss_fn: LossFn, plan: LoopPlan, *,
               checkpoints: Optional[Checkpoints] = None, stateful: Optional[Mapping[str, Stateful]] = None,
               validation: Optional[Validation] = None, callbacks: Sequence[Callback] = ()) -> LoopState:
    """Run optimizer steps until ``plan.max_steps`` (or early stopping); returns the final state.

    * ``batches(step)`` gives the step's micro-batches; ``loss_fn`` parts are averaged over
      micro-batches and processes (``n_positions`` / ``n_tokens`` are summed and give ``tokens_per_s``).
    * ``checkpoints`` saves every ``plan.checkpoint_every`` steps and at the end; if it holds a
      complete checkpoint the loop first resumes from the newest one (engine, state, and every
      ``stateful`` object).
    * ``validation.evaluate`` runs on every process every ``plan.eval_every`` steps and at the end;
      its ``score`` ranks the ``plan.keep_best`` models written by ``validation.save_best`` and stops
      the run after ``plan.early_stopping_patience`` evaluations without improvement.
    * ``callbacks`` get ``on_train_start`` / ``on_step`` / ``on_eval`` / ``on_checkpoint`` /
      ``on_train_end`` on rank 0 only.
    """
    cbs = CallbackList(callbacks if engine.is_main else [])
    stateful = stateful or {}
    state = _resume(engine, checkpoints, stateful, plan.max_steps)
    cbs.on_train_start({"step": state.step, "max_steps": plan.max_steps, "resumed_from": state.resumed_from,
                        "world_size": engine.world_size})

    window: dict[str, list] = {}  # metrics of the steps since the last on_step
    while state.step < plan.max_steps and not state.finished:
        t0 = time.perf_counter()
        sb = batches(state.step)
        sums: dict[str, torch.Tensor] = {}
        for micro in sb.micro_batches:
            out = engine.forward(loss_fn, micro)
            engine.backward(out["loss"])
            for k, v in _scalar_parts(out).items():
                sums[k] = sums[k] + v if k in sums else v
        grad_norm = engine.step()
        lr_used = _lr_of_step(engine)
        state.step += 1
        step = state.step

        metrics = _step_metrics(engine, sums, sb, t0, lr_used, grad_norm)
        for name, value in metrics.items():
            window.setdefault(name, []).append(value)
        if step % plan.log_every == 0 or step == plan.max_steps:
            cbs.on_step(step, {k: (v[-1] if k in ("lr", "epoch") else sum(v) / len(v)) for k, v in window.items()})
            window = {}

        last = step >= plan.max_steps
        if validation is not None and plan.eval_every and (step % plan.eval_every == 0 or last):
            _evaluate(engine, state, step, validation, plan, cbs, checkpoints)
        if state.stopped_early or last:
            state.finished = True
        due = state.finished or (plan.checkpoint_every and step % plan.checkpoint_every == 0)
        if checkpoints is not None and due:
            path = checkpoints.save(engine, state, stateful)
            cbs.on_checkpoint(step, path)

    if window:
        cbs.on_step(state.step, {k: sum(v) / len(v) for k, v in window.items()})
    cbs.on_train_end({"step": state.step, "best_score": state.best_score, "stopped_early": state.stopped_early})
    return state


# ----------------------------------------------------------------------------------------------
# Its parts
# ----------------------------------------------------------------------------------------------
def _resume(engine: Engine, checkpoints: Optional[Checkpoints], stateful: Mapping[str, Stateful],
            max_steps: int) -> LoopState:
    """The newest checkpoint's state (engine and ``stateful`` restored), else a fresh one."""
    restored = checkpoints.restore(engine, stateful) if checkpoints is not None else None
    if restored is None:
        return LoopState()
    restored.resumed_from = restored.step
    if restored.finished and not restored.stopped_early and restored.step < max_steps:
        restored.finished = False  # the same run, asked for more steps
    return restored


def _scalar_parts(out: dict) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().reshape(()) for k, v in out.items()
            if isinstance(v, torch.Tensor) and v.numel() == 1}


def _step_metrics(engine: Engine, sums: dict[str, torch.Tensor], sb: StepBatch, t0: float, lr: float,
                  grad_norm: Optional[float]) -> dict[str, float]:
    """What one step logs: loss parts over all micro-batches and processes (counts summed, the
    rest averaged), ``tokens_per_s``, ``lr``, ``step_time_s`` (since ``t0``), ``grad_norm`` and the
    batch's numeric ``info``."""
    keys = sorted(sums)
    vec = torch.stack([sums[k] for k in keys]).to(torch.float64)
    totals = engine.all_reduce_sum(vec).cpu().tolist()
    dt = time.perf_counter() - t0
    n_micro = len(sb.micro_batches) * engine.world_size
    metrics: dict[str, float] = {}
    for k, v in zip(keys, totals):
        metrics[k] = v if k in _COUNT_KEYS else v / n_micro
    fed = metrics.get("n_positions", metrics.get("n_tokens"))  # positions the backbone processed
    if fed is not None:
        metrics["tokens_per_s"] = fed / dt if dt > 0 else 0.0
    metrics.update({"lr": lr, "step_time_s": dt})
    if grad_norm is not None:
        metrics["grad_norm"] = grad_norm
    metrics.update({k: float(v) for k, v in sb.info.items() if isinstance(v, (int, float))})
    return metrics


def _lr_of_step(engine: Engine) -> float:
    """The lr the update just taken used (schedules advance after the update)."""
    sched = getattr(engine, "scheduler", None)
    if isinstance(sched, LRSchedule):
        return sched.last_update_lr()
    return engine.lr


def _evaluate(engine: Engine, state: LoopState, step: int, validation: Validation, plan: LoopPlan,
              cbs: CallbackList, checkpoints: Optional[Checkpoints]) -> None:
    """Validate; update the best score, the best-k exports and the early-stopping count."""
    metrics = validation.evaluate(step)
    state.last_eval_step = step
    score = metrics.get("score")
    if score is not None and math.isfinite(score):
        if state.best_score is None or score > state.best_score:
            state.best_score, state.best_step, state.evals_since_best = float(score), step, 0
        else:
            state.evals_since_best += 1
        keep = plan.keep_best
        qualifies = keep > 0 and (len(state.best) < keep or score > state.best[-1]["score"])
        if validation.save_best is not None and qualifies:
            path = validation.save_best(step)
            state.best.append({"step": step, "score": float(score), "path": str(path)})
            state.best.sort(key=lambda b: (-b["score"], b["step"]))
            dropped, state.best = state.best[keep:], state.best[:keep]
            if checkpoints is not None:
                checkpoints.remove_exports([b["path"] for b in dropped], engine)
    metrics = dict(metrics, best_score=state.best_score if state.best_score is not None else float("nan"))
    cbs.on_eval(step, metrics)
    if plan.early_stopping_patience is not None and state.evals_since_best >= plan.early_stopping_patience:
        state.stopped_early = True
