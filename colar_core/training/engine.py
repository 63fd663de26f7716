"""Training engines and the one training loop that SFT and RL share.

An engine owns the model's optimizer, learning-rate schedule, precision and (for DeepSpeed) the
ZeRO partitioning, behind one small interface::

    out = engine.forward(loss_fn, micro_batch)   # loss_fn(model, micro_batch) -> {"loss": ..., parts}
    engine.backward(out["loss"])                 # once per micro-batch (scaled by 1 / grad_accum)
    grad_norm = engine.step()                    # once per optimizer step: clip, update, schedule
    engine.save_checkpoint(dir) / engine.load_checkpoint(dir)
    with engine.full_model() as model: ...       # full parameters (ZeRO-3 gathered), for eval / export

``DeepSpeedEngine`` runs in one process without a launcher (it sets ``RANK=0 WORLD_SIZE=1`` and a
free ``MASTER_PORT`` when they are absent) or in many under ``deepspeed`` / ``torchrun`` (which set
them). ``TorchEngine`` is plain PyTorch in one process, for notebooks and quick checks.

:func:`train_loop` drives either engine: it asks ``batches_fn(step)`` for the micro-batches of an
optimizer step, calls ``loss_fn`` on each, logs through callbacks (rank 0 only), validates, keeps
the best models, stops early, and checkpoints so that a killed run resumes where it left off.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Protocol, Sequence

import torch
from torch import nn

from colar_core.training.config import TrainConfig

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# Process environment
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job, read from the launcher's environment variables."""

    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (for a single-process rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def dist_env(set_defaults: bool = True) -> DistEnv:
    """Read RANK / WORLD_SIZE / LOCAL_RANK; without a launcher, set the single-process defaults.

    ``deepspeed`` and ``torchrun`` set all five variables; a plain ``python`` run has none, and
    DeepSpeed still needs them, so one process sets ``RANK=0 WORLD_SIZE=1 LOCAL_RANK=0
    MASTER_ADDR=127.0.0.1 MASTER_PORT=<free port>`` for itself (only the missing ones).
    """
    if set_defaults:
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("LOCAL_RANK", "0" if os.environ["WORLD_SIZE"] == "1" else os.environ["RANK"])
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            if os.environ["WORLD_SIZE"] != "1":
                raise RuntimeError("WORLD_SIZE > 1 but MASTER_PORT is not set: start the job with deepspeed or torchrun")
            os.environ["MASTER_PORT"] = str(free_port())
    return DistEnv(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                   int(os.environ.get("LOCAL_RANK", 0)))


def default_device(local_rank: int = 0) -> torch.device:
    """``cuda:<local_rank>`` when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def _dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


# ----------------------------------------------------------------------------------------------
# Optimizer and learning-rate schedule
# ----------------------------------------------------------------------------------------------
def lr_factor(step: int, warmup_steps: int, max_steps: int, schedule: str, min_ratio: float = 0.0) -> float:
    """Multiplier of the peak lr for the update of 0-based optimizer step ``step``.

    Warm-up is linear from ``1/warmup_steps`` to 1 over the first ``warmup_steps`` updates; then
    ``constant`` stays at 1, ``linear`` and ``cosine`` decay to ``min_ratio`` at ``max_steps``.
    """
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    if schedule == "linear":
        decay = 1.0 - progress
    elif schedule == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ValueError(f"unknown lr schedule {schedule!r}")
    return min_ratio + (1.0 - min_ratio) * decay


class LRSchedule:
    """Warm-up + constant / linear / cosine schedule acting on an optimizer's param groups.

    Small and stateful in the way DeepSpeed expects from a client scheduler (``step``,
    ``state_dict``, ``load_state_dict``, ``get_last_lr``); the state is just the step count.
    """

    def __init__(self, optimizer, cfg: TrainConfig):
        self.optimizer = optimizer
        self.warmup_steps, self.max_steps = cfg.warmup_steps, cfg.max_steps
        self.schedule, self.min_ratio = cfg.lr_schedule, cfg.min_lr_ratio
        self.base_lrs = [float(g.get("initial_lr", g["lr"])) for g in optimizer.param_groups]
        for g, base in zip(optimizer.param_groups, self.base_lrs):
            g["initial_lr"] = base
        self.last_step = 0
        self._apply()

    def factor(self, step: int) -> float:
        return lr_factor(step, self.warmup_steps, self.max_steps, self.schedule, self.min_ratio)

    def _apply(self) -> None:
        f = self.factor(self.last_step)
        for g, base in zip(self.optimizer.param_groups, self.base_lrs):
            g["lr"] = base * f

    def step(self, *args, **kwargs) -> None:
        self.last_step += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"last_step": self.last_step, "base_lrs": list(self.base_lrs)}

    def load_state_dict(self, state: dict) -> None:
        self.last_step = int(state["last_step"])
        self.base_lrs = [float(x) for x in state.get("base_lrs", self.base_lrs)]
        self._apply()


def build_optimizer(params: Sequence[nn.Parameter], cfg: TrainConfig, device: torch.device, kind: Optional[str] = None):
    """AdamW over ``params``. ``kind`` overrides ``cfg.optimizer`` ('adamw', 'fused_adam', 'cpu_adam')."""
    kind = kind or ("adamw" if cfg.optimizer == "auto" else cfg.optimizer)
    kw = dict(lr=cfg.lr, betas=tuple(cfg.adam_betas), weight_decay=cfg.weight_decay)
    if kind == "adamw":
        fused = device.type == "cuda" and all(p.is_floating_point() for p in params)
        return torch.optim.AdamW(params, fused=fused or None, **kw)
    if kind == "fused_adam":
        from deepspeed.ops.adam import FusedAdam

        return FusedAdam(params, adam_w_mode=True, **kw)
    if kind == "cpu_adam":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, adamw_mode=True, **kw)
    raise ValueError(f"unknown optimizer {kind!r}")


# ----------------------------------------------------------------------------------------------
# DeepSpeed configuration
# ----------------------------------------------------------------------------------------------
def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _conflicts(user: dict, ours: dict, prefix: str = "") -> list[str]:
    found = []
    for k, v in ours.items():
        if k not in user:
            continue
        if isinstance(v, dict) and isinstance(user[k], dict):
            found += _conflicts(user[k], v, f"{prefix}{k}.")
        elif user[k] != v and user[k] != "auto":
            found.append(f"{prefix}{k}: file {user[k]!r} -> {v!r}")
    return found


def deepspeed_config(cfg: TrainConfig, world_size: int) -> dict:
    """The DeepSpeed config dict for ``cfg``: quiet defaults < the user's JSON file < TrainConfig's values.

    TrainConfig owns batch sizes, accumulation, clipping, precision and the ZeRO stage; everything
    else (bucket sizes, offload, overlap_comm, an 'optimizer' section, ...) may come from the file.
    """
    defaults = {"steps_per_print": 10**9, "wall_clock_breakdown": False, "zero_allow_untested_optimizer": True}
    user: dict = {}
    if cfg.deepspeed_config:
        path = Path(cfg.deepspeed_config)
        try:
            user = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"deepspeed_config: {path} does not exist") from None
        except json.JSONDecodeError as err:
            raise ValueError(f"deepspeed_config: {path} is not valid JSON ({err})") from None
    ours = {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.batch_size * cfg.grad_accum * world_size,
        "gradient_clipping": cfg.grad_clip,
        "bf16": {"enabled": cfg.precision == "bf16"},
        "fp16": {"enabled": False},
        "zero_optimization": {"stage": cfg.zero_stage if cfg.zero_stage is not None
                              else (user.get("zero_optimization") or {}).get("stage", 2)},
    }
    for c in _conflicts(user, ours):
        log.warning("deepspeed_config %s: TrainConfig overrides %s", cfg.deepspeed_config, c)
    return _deep_merge(_deep_merge(defaults, user), ours)


# ----------------------------------------------------------------------------------------------
# Engines
# ----------------------------------------------------------------------------------------------
class _LossModule(nn.Module):
    """Lets an engine call any ``loss_fn(model, ...)`` through ``module.forward`` (DeepSpeed's path)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn: Callable, *args, **kwargs):
        return fn(self.model, *args, **kwargs)


class Engine(Protocol):
    """What :func:`train_loop`, checkpointing and evaluation need from an engine.

    ``forward``/``backward``/``step`` train; ``lr`` is the current learning rate; ``save_checkpoint``
    / ``load_checkpoint`` / ``full_model`` / ``barrier`` / ``all_reduce_sum`` / ``broadcast_object``
    are collective (every process calls them).
    """

    model: nn.Module  # the wrapped model itself (e.g. a ColarModel), not a DeepSpeed wrapper
    device: torch.device
    env: DistEnv
    grad_accum: int
    rank: int
    world_size: int
    is_main: bool

    def forward(self, fn: Callable, *args, **kwargs) -> Any: ...
    def backward(self, loss: torch.Tensor) -> None: ...
    def step(self) -> Optional[float]: ...
    @property
    def lr(self) -> float: ...
    def save_checkpoint(self, directory: Path) -> None: ...
    def load_checkpoint(self, directory: Path) -> None: ...
    def full_model(self) -> contextlib.AbstractContextManager: ...
    def barrier(self) -> None: ...
    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor: ...
    def broadcast_object(self, obj: Any) -> Any: ...


class _EngineBase:
    env: DistEnv
    device: torch.device

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def world_size(self) -> int:
        return self.env.world_size

    @property
    def is_main(self) -> bool:
        return self.env.is_main

    def barrier(self) -> None:
        if _dist_ready() and self.world_size > 1:
            torch.distributed.barrier()

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over all processes (identity in one process)."""
        if _dist_ready() and self.world_size > 1:
            t = values.detach().to(self.comm_device, torch.float64).clone()
            torch.distributed.all_reduce(t)
            return t.to(values.device)
        return values

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every process."""
        if _dist_ready() and self.world_size > 1:
            box = [obj]
            torch.distributed.broadcast_object_list(box, src=0)
            return box[0]
        return obj

    @property
    def comm_device(self) -> torch.device:
        if _dist_ready() and torch.distributed.get_backend() == "nccl":
            return self.device
        return torch.device("cpu")


class TorchEngine(_EngineBase):
    """Plain PyTorch, one process: AdamW, optional bf16 autocast, clipping, accumulation, schedule."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, device: Optional[torch.device] = None,
                 params: Optional[Sequence[nn.Parameter]] = None):
        self.env = dist_env(set_defaults=False)
        if self.env.world_size > 1:
            raise RuntimeError("the torch backend runs in one process; use backend 'deepspeed' under a launcher")
        self.env = DistEnv(0, 1, 0)
        self.device = device or default_device(0)
        self.model = model.to(self.device)
        self.model.train()
        self.cfg = cfg
        self.grad_accum = cfg.grad_accum
        params = list(params) if params is not None else [p for p in model.parameters() if p.requires_grad]
        self.params = params
        self.optimizer = build_optimizer(params, cfg, self.device,
                                         "adamw" if cfg.optimizer in ("auto", "cpu_adam") else None)
        self.scheduler = LRSchedule(self.optimizer, cfg)
        self._autocast = cfg.precision == "bf16"
        self._micro = 0

    def forward(self, fn: Callable, *args, **kwargs):
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self._autocast):
            return fn(self.model, *args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum).backward()
        self._micro += 1

    def step(self) -> Optional[float]:
        if self._micro == 0:
            raise RuntimeError("step() before any backward()")
        grads = [p for p in self.params if p.grad is not None]
        if self.cfg.grad_clip > 0:
            norm = float(torch.nn.utils.clip_grad_norm_(grads, self.cfg.grad_clip))
        else:
            norm = float(torch.nn.utils.get_total_norm([p.grad for p in grads])) if grads else 0.0
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self._micro = 0
        return norm

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def save_checkpoint(self, directory: Path) -> None:
        from safetensors.torch import save_model

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_model(self.model, str(directory / "model.safetensors"))
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                   directory / "optimizer.pt")

    def load_checkpoint(self, directory: Path) -> None:
        from safetensors.torch import load_model

        directory = Path(directory)
        load_model(self.model, str(directory / "model.safetensors"), device=str(self.device))
        state = torch.load(directory / "optimizer.pt", map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    @contextlib.contextmanager
    def full_model(self) -> Iterator[nn.Module]:
        yield self.model


class DeepSpeedEngine(_EngineBase):
    """A ``deepspeed.initialize`` engine (ZeRO 0-3, fp32 or bf16) around any ``nn.Module``.

    The client optimizer is torch AdamW (no op build on CPU; fused kernels on CUDA) unless the
    config asks otherwise; the schedule is :class:`LRSchedule`. On CPU the process group is gloo,
    on CUDA nccl.
    """

    def __init__(self, model: nn.Module, cfg: TrainConfig, device: Optional[torch.device] = None,
                 params: Optional[Sequence[nn.Parameter]] = None):
        import deepspeed

        _quiet_deepspeed()
        self.env = dist_env(set_defaults=True)
        self.device = device or default_device(self.env.local_rank)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        deepspeed.init_distributed(dist_backend="nccl" if self.device.type == "cuda" else "gloo",
                                   verbose=False)
        self.cfg = cfg
        self.grad_accum = cfg.grad_accum
        self.ds_config = deepspeed_config(cfg, self.env.world_size)
        self.model = model.to(self.device)
        self.model.train()
        params = list(params) if params is not None else [p for p in model.parameters() if p.requires_grad]
        self.params = params

        optimizer = scheduler = None
        if "optimizer" not in self.ds_config:
            kind = cfg.optimizer
            if kind == "auto":
                offload = self.ds_config.get("zero_optimization", {}).get("offload_optimizer", {}) or {}
                kind = "cpu_adam" if offload.get("device") in ("cpu", "nvme") else "adamw"
            optimizer = build_optimizer(params, cfg, self.device, kind)
            if "scheduler" not in self.ds_config:
                scheduler = LRSchedule(optimizer, cfg)
        elif "scheduler" not in self.ds_config:
            log.warning("deepspeed_config has an 'optimizer' section: TrainConfig lr/schedule are not applied")

        self.ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=_LossModule(self.model), model_parameters=params, optimizer=optimizer,
            lr_scheduler=scheduler, config=self.ds_config,
        )
        self._micro = 0

    @property
    def zero_stage(self) -> int:
        return int(self.ds.zero_optimization_stage())

    def forward(self, fn: Callable, *args, **kwargs):
        return self.ds(fn, *args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        # DeepSpeed counts micro-steps in step(); every micro-batch but the last of an optimizer
        # step is stepped here (a no-op besides bookkeeping), the last one by step().
        if self._micro > 0:
            self.ds.step()
        self.ds.backward(loss)
        self._micro += 1

    def step(self) -> Optional[float]:
        if self._micro != self.grad_accum:
            raise RuntimeError(f"step() after {self._micro} backward() calls; expected grad_accum={self.grad_accum}")
        norm = None
        if self.zero_stage == 0 and self.cfg.precision == "fp32":  # the engine does not record it here
            grads = [p.grad for p in self.params if p.grad is not None]
            norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
        self.ds.step()
        self._micro = 0
        if norm is None:
            got = self.ds.get_global_grad_norm()
            norm = float(got) if got is not None else None
        return norm

    @property
    def lr(self) -> float:
        return float(self.ds.get_lr()[0])

    def save_checkpoint(self, directory: Path) -> None:
        """All ranks call this; each writes its own shards under ``directory``."""
        self.ds.save_checkpoint(str(directory), tag="ds", save_latest=False)

    def load_checkpoint(self, directory: Path) -> None:
        path, _ = self.ds.load_checkpoint(str(directory), tag="ds", load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint in {directory}")

    @contextlib.contextmanager
    def full_model(self) -> Iterator[nn.Module]:
        """The model with every parameter present: as is for ZeRO 0-2; gathered (and ZeRO-3's
        fetch hooks lifted, so processes may run different numbers of forwards) for ZeRO-3.
        Every process must enter it."""
        if self.zero_stage < 3:
            yield self.model
            return
        from deepspeed.runtime.zero import unwrap_model_for_generation

        with unwrap_model_for_generation(self.ds):
            yield self.model


def _quiet_deepspeed() -> None:
    """DeepSpeed logs its whole config at INFO on every rank; keep it to warnings unless asked."""
    if os.environ.get("COLAR_DEEPSPEED_VERBOSE"):
        return
    try:
        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(logging.WARNING)
    except Exception:  # pragma: no cover - logging only
        pass


def build_engine(model: nn.Module, cfg: TrainConfig, device: Optional[torch.device] = None,
                 params: Optional[Sequence[nn.Parameter]] = None):
    """The engine ``cfg.backend`` names, around ``model`` (trainable ``params`` by default)."""
    if cfg.backend == "torch":
        return TorchEngine(model, cfg, device, params)
    return DeepSpeedEngine(model, cfg, device, params)


# ----------------------------------------------------------------------------------------------
# The training loop
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


# keys of loss_fn's output that are counts (summed over micro-batches and processes), not means
_COUNT_KEYS = ("n_positions", "n_label_tokens", "n_tokens")


def _scalar_parts(out: dict) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().reshape(()) for k, v in out.items()
            if isinstance(v, torch.Tensor) and v.numel() == 1}


def train_loop(
    engine,
    batches_fn: Callable[[int], StepBatch],
    loss_fn: Callable[..., dict],
    *,
    max_steps: int,
    state: Optional[LoopState] = None,
    checkpoints=None,
    checkpoint_every: int = 0,
    stateful: Optional[dict] = None,
    callbacks=None,
    evaluate: Optional[Callable[[int], dict]] = None,
    eval_every: int = 0,
    save_best: Optional[Callable[[int], Path]] = None,
    keep_best: int = 1,
    early_stopping_patience: Optional[int] = None,
    log_every: int = 1,
) -> LoopState:
    """Run optimizer steps until ``max_steps`` (or early stopping); returns the final state.

    * ``batches_fn(step)`` gives a :class:`StepBatch` for 0-based optimizer step ``step``;
      ``loss_fn(model, micro_batch)`` returns a dict with a scalar ``loss`` plus any scalar parts
      to log (means over micro-batches and processes; ``n_positions`` / ``n_tokens`` are summed
      and give ``tokens_per_s``).
    * ``checkpoints`` (a :class:`~colar_core.training.checkpoint.CheckpointManager`) saves every
      ``checkpoint_every`` steps and at the end; if it holds a complete checkpoint the loop first
      resumes from the newest one (engine, ``state``, and every ``stateful`` object's
      ``state_dict``/``load_state_dict``).
    * ``evaluate(step)`` runs on every process every ``eval_every`` steps and at the end; its
      ``score`` (higher is better) ranks best-k models written by ``save_best(step)`` and drives
      early stopping after ``early_stopping_patience`` evaluations without improvement.
    * ``callbacks`` get ``on_step`` / ``on_eval`` / ``on_checkpoint`` on rank 0 only.
    """
    from colar_core.training.callbacks import CallbackList

    cbs = CallbackList(callbacks if engine.is_main else [])
    stateful = stateful or {}
    state = state or LoopState()
    if checkpoints is not None:
        restored = checkpoints.restore(engine, stateful)
        if restored is not None:
            state = restored
            state.resumed_from = state.step
            if state.finished and not state.stopped_early and state.step < max_steps:
                state.finished = False  # the same run, asked for more steps
    cbs.on_train_start({"step": state.step, "max_steps": max_steps, "resumed_from": state.resumed_from,
                        "world_size": engine.world_size})

    window: dict[str, list] = {}
    while state.step < max_steps and not state.finished:
        t0 = time.perf_counter()
        sb = batches_fn(state.step)
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

        keys = sorted(sums)
        vec = torch.stack([sums[k] for k in keys]).to(torch.float64)
        vec = engine.all_reduce_sum(vec).cpu().tolist()
        dt = time.perf_counter() - t0
        n_micro = len(sb.micro_batches) * engine.world_size
        metrics: dict[str, float] = {}
        for k, v in zip(keys, vec):
            metrics[k] = v if k in _COUNT_KEYS else v / n_micro
        fed = metrics.get("n_positions", metrics.get("n_tokens"))  # positions the backbone processed
        if fed is not None:
            metrics["tokens_per_s"] = fed / dt if dt > 0 else 0.0
        metrics.update({"lr": lr_used, "step_time_s": dt})
        if grad_norm is not None:
            metrics["grad_norm"] = grad_norm
        metrics.update({k: float(v) for k, v in sb.info.items() if isinstance(v, (int, float))})
        for k, v in metrics.items():
            window.setdefault(k, []).append(v)
        if step % log_every == 0 or step == max_steps:
            cbs.on_step(step, {k: (v[-1] if k in ("lr", "epoch") else sum(v) / len(v)) for k, v in window.items()})
            window = {}

        last = step >= max_steps
        if evaluate is not None and eval_every and (step % eval_every == 0 or last):
            _evaluate(engine, state, step, evaluate, cbs, save_best, keep_best, early_stopping_patience, checkpoints)
        if state.stopped_early or last:
            state.finished = True
        if checkpoints is not None and (state.finished or (checkpoint_every and step % checkpoint_every == 0)):
            path = checkpoints.save(engine, state, stateful)
            cbs.on_checkpoint(step, path)

    if window:
        cbs.on_step(state.step, {k: sum(v) / len(v) for k, v in window.items()})
    cbs.on_train_end({"step": state.step, "best_score": state.best_score, "stopped_early": state.stopped_early})
    return state


def _lr_of_step(engine) -> float:
    """The lr the update just taken used (schedules advance after the update)."""
    sched = getattr(engine, "scheduler", None)
    if isinstance(sched, LRSchedule):
        return sched.base_lrs[0] * sched.factor(sched.last_step - 1)
    return engine.lr


def _evaluate(engine, state: LoopState, step: int, evaluate, cbs, save_best, keep_best, patience, checkpoints):
    metrics = evaluate(step)
    state.last_eval_step = step
    score = metrics.get("score")
    if score is not None and math.isfinite(score):
        if state.best_score is None or score > state.best_score:
            state.best_score, state.best_step, state.evals_since_best = float(score), step, 0
        else:
            state.evals_since_best += 1
        qualifies = keep_best > 0 and (len(state.best) < keep_best or score > state.best[-1]["score"])
        if save_best is not None and qualifies:
            path = save_best(step)
            state.best.append({"step": step, "score": float(score), "path": str(path)})
            state.best.sort(key=lambda b: (-b["score"], b["step"]))
            dropped, state.best = state.best[keep_best:], state.best[:keep_best]
            if checkpoints is not None:
                checkpoints.remove_exports([b["path"] for b in dropped], engine)
    metrics = dict(metrics, best_score=state.best_score if state.best_score is not None else float("nan"))
    cbs.on_eval(step, metrics)
    if patience is not None and state.evals_since_best >= patience:
        state.stopped_early = True
