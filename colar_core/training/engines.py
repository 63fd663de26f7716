"""Training engines: one small interface over plain PyTorch and DeepSpeed.

An engine owns the model's optimizer, learning-rate schedule, precision and (for DeepSpeed) the
ZeRO partitioning::

    out = engine.forward(loss_fn, micro_batch)   # loss_fn(model, micro_batch) -> {"loss": ..., parts}
    engine.backward(out["loss"])                 # once per micro-batch (scaled by 1 / grad_accum)
    grad_norm = engine.step()                    # once per optimizer step: clip, update, schedule
    engine.save_checkpoint(dir) / engine.load_checkpoint(dir)
    with engine.full_model() as model: ...       # full parameters (ZeRO-3 gathered), for eval / export
    engine.close()                               # at the stage's end: optimizer state and hooks let go

``DeepSpeedEngine`` runs in one process without a launcher (it sets ``RANK=0 WORLD_SIZE=1`` and a
free ``MASTER_PORT`` when they are absent, and starts its process group on an in-memory store, so no
port listens) or in many under ``deepspeed`` / ``torchrun`` (which set
them). ``TorchEngine`` is plain PyTorch in one process, for notebooks and quick checks.
:func:`build_engine` makes the one ``TrainConfig.backend`` names.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from pathlib import Path
from typing import Any, Callable, Generic, Iterator, Optional, Protocol, Sequence, TypeVar

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from colar_core.training.config import TrainConfig
from colar_core.training.deepspeed_config import deepspeed_config
from colar_core.training.distributed import (
    DistEnv,
    bound_collectives,
    default_device,
    dist_env,
    dist_ready,
    init_single_process_group,
)
from colar_core.training.schedule import LRSchedule, build_optimizer

log = logging.getLogger(__name__)

M = TypeVar("M", bound=nn.Module)  # the model an engine wraps (e.g. a ColarModel)
M_co = TypeVar("M_co", bound=nn.Module, covariant=True)


class Engine(Protocol[M_co]):
    """What :func:`~colar_core.training.loop.train_loop`, checkpointing and evaluation need from an engine.

    ``forward``/``backward``/``step`` train; ``lr`` is the current learning rate; ``save_checkpoint``
    / ``load_checkpoint`` / ``full_model`` / ``barrier`` / ``all_reduce_sum`` / ``broadcast_object``
    are collective (every process calls them).
    """

    device: torch.device
    env: DistEnv
    grad_accum: int

    @property
    def model(self) -> M_co: ...  # the wrapped model itself (e.g. a ColarModel), not a DeepSpeed wrapper
    @property
    def rank(self) -> int: ...
    @property
    def world_size(self) -> int: ...
    @property
    def is_main(self) -> bool: ...
    def forward(self, fn: Callable, *args, **kwargs) -> Any: ...
    def backward(self, loss: torch.Tensor) -> None: ...
    def step(self) -> Optional[float]: ...
    @property
    def lr(self) -> float: ...
    def save_checkpoint(self, directory: Path) -> None: ...
    def load_checkpoint(self, directory: Path) -> None: ...
    def full_model(self) -> contextlib.AbstractContextManager[M_co]: ...
    def barrier(self) -> None: ...
    def close(self) -> None: ...
    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor: ...
    def broadcast_object(self, obj: Any) -> Any: ...


class _LossModule(nn.Module):
    """Lets an engine call any ``loss_fn(model, ...)`` through ``module.forward`` (DeepSpeed's path)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn: Callable, *args, **kwargs):
        return fn(self.model, *args, **kwargs)


class _EngineBase:
    """Rank properties and the collectives both engines share."""

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
        if dist_ready() and self.world_size > 1:
            torch.distributed.barrier()

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over all processes (identity in one process)."""
        if dist_ready() and self.world_size > 1:
            t = values.detach().to(self.comm_device, torch.float64).clone()
            torch.distributed.all_reduce(t)
            return t.to(values.device)
        return values

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every process."""
        if dist_ready() and self.world_size > 1:
            box = [obj]
            torch.distributed.broadcast_object_list(box, src=0)
            return box[0]
        return obj

    @property
    def comm_device(self) -> torch.device:
        if dist_ready() and torch.distributed.get_backend() == "nccl":
            return self.device
        return torch.device("cpu")


class TorchEngine(_EngineBase, Generic[M]):
    """Plain PyTorch, one process: AdamW, optional bf16 autocast, clipping, accumulation, schedule."""

    def __init__(self, model: M, cfg: TrainConfig, device: Optional[torch.device] = None,
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
        with_grad = [p for p in self.params if p.grad is not None]
        if self.cfg.grad_clip > 0:
            norm = float(torch.nn.utils.clip_grad_norm_(with_grad, self.cfg.grad_clip))
        else:
            grads = [p.grad for p in with_grad if p.grad is not None]
            norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self._micro = 0
        return norm

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def save_checkpoint(self, directory: Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_model(self.model, str(directory / "model.safetensors"))
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                   directory / "optimizer.pt")

    def load_checkpoint(self, directory: Path) -> None:
        directory = Path(directory)
        load_model(self.model, str(directory / "model.safetensors"), device=str(self.device))
        state = torch.load(directory / "optimizer.pt", map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    @contextlib.contextmanager
    def full_model(self) -> Iterator[M]:
        yield self.model

    def close(self) -> None:
        """Drop the optimizer state (AdamW's moments: twice the trained weights) and the gradients; the
        model stays usable. Called at the end of every stage (:func:`~colar_core.training.stage.run_stage_loop`)."""
        self.optimizer.state.clear()
        self.model.zero_grad(set_to_none=True)


class DeepSpeedEngine(_EngineBase, Generic[M]):
    """A ``deepspeed.initialize`` engine (ZeRO 0-3, fp32 or bf16) around any ``nn.Module``.

    The client optimizer is torch AdamW (no op build on CPU; fused kernels on CUDA) unless the
    config asks otherwise; the schedule is :class:`LRSchedule`. On CPU the process group is gloo,
    on CUDA nccl.
    """

    def __init__(self, model: M, cfg: TrainConfig, device: Optional[torch.device] = None,
                 params: Optional[Sequence[nn.Parameter]] = None):
        import deepspeed  # heavy: only when this backend is used

        _quiet_deepspeed()
        self.env = dist_env(set_defaults=True)
        self.device = device or default_device(self.env.local_rank)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        if self.env.world_size == 1 and not dist_ready():
            init_single_process_group(backend)  # no TCPStore listening on MASTER_PORT (on every interface)
        # the rendezvous and every collective, of every group, give up after the launcher's timeout
        bound_collectives(cfg.launcher.collective_timeout_s)
        deepspeed.init_distributed(dist_backend=backend, verbose=False,
                                   timeout=datetime.timedelta(seconds=cfg.launcher.collective_timeout_s))
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
        _leave_out_every_frozen_name(self.ds)

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
        """All ranks call this; each writes its own shards under ``directory``. Frozen parameters (a LoRA
        model's base weights) are left out: the stage's model is built with them before any resume, and
        they do not change (0.81 of a 1.03 GB checkpoint of the 1B recipe cut to 2 layers)."""
        self.ds.save_checkpoint(str(directory), tag="ds", save_latest=False, exclude_frozen_parameters=True)

    def load_checkpoint(self, directory: Path) -> None:
        path, _ = self.ds.load_checkpoint(str(directory), tag="ds", load_optimizer_states=True,
                                          load_lr_scheduler_states=True, custom_load_fn=load_trained_state)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint in {directory}")

    def close(self) -> None:
        """Let the DeepSpeed engine go: its optimizer's gradient hooks on the model's parameters keep the
        engine, its optimizer state and fp32 master weights alive as long as the model lives (on a GPU,
        on the device) otherwise. The model stays usable (ZeRO-3 leaves it partitioned). Idempotent."""
        if self.ds is None:
            return
        self.ds.destroy()
        self.model.zero_grad(set_to_none=True)
        self.ds = self.optimizer = self.scheduler = None

    @contextlib.contextmanager
    def full_model(self) -> Iterator[M]:
        """The model with every parameter present: as is for ZeRO 0-2; gathered (and ZeRO-3's
        fetch hooks lifted, so processes may run different numbers of forwards) for ZeRO-3.
        Every process must enter it."""
        if self.zero_stage < 3:
            yield self.model
            return
        from deepspeed.runtime.zero import unwrap_model_for_generation  # heavy: see __init__

        with unwrap_model_for_generation(self.ds):
            yield self.model


def _leave_out_every_frozen_name(ds) -> None:
    """Make ``ds.module_state_dict(exclude_frozen_parameters=True)`` (what its ``save_checkpoint`` calls)
    leave out every name of a frozen tensor. DeepSpeed 0.19.8 drops the names ``named_parameters()`` yields,
    which lists a shared tensor once: a tied LM head (Llama-3.2-1B's) stays in as the frozen embedding's
    second name (0.53 of the 0.78 GB checkpoint of the 1B recipe cut to 2 layers)."""
    own = ds.module_state_dict

    def module_state_dict(destination=None, prefix="", keep_vars=False, exclude_frozen_parameters=False):
        state = own(destination=destination, prefix=prefix, keep_vars=keep_vars,
                    exclude_frozen_parameters=exclude_frozen_parameters)
        if exclude_frozen_parameters:
            for name, param in ds.module.named_parameters(remove_duplicate=False):
                if not param.requires_grad:
                    state.pop(prefix + name, None)
        return state

    ds.module_state_dict = module_state_dict


def load_trained_state(src: dict[str, torch.Tensor], dst: nn.Module) -> None:
    """Load a checkpoint's module state that leaves out frozen parameters (``exclude_frozen_parameters``)
    into ``dst``: strict for everything else, so a trained parameter the checkpoint lacks (or a name it
    has that the model does not) is an error naming it, not a silent keep of the initial value."""
    result = dst.load_state_dict(src, strict=False)
    frozen = {n for n, p in dst.named_parameters(remove_duplicate=False) if not p.requires_grad}
    missing = [k for k in result.missing_keys if k not in frozen]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"checkpoint does not match the model: trained weights missing {missing[:5]}"
                           f"{' ...' if len(missing) > 5 else ''}, unknown {list(result.unexpected_keys)[:5]}")


def _quiet_deepspeed() -> None:
    """DeepSpeed logs its whole config at INFO on every rank; keep it to warnings unless asked."""
    if os.environ.get("COLAR_DEEPSPEED_VERBOSE"):
        return
    try:
        from deepspeed.utils import logger as ds_logger  # heavy: only for the DeepSpeed engine

        ds_logger.setLevel(logging.WARNING)
    except Exception:  # noqa: BLE001 - logging only: a DeepSpeed that cannot be quietened still trains
        pass


def build_engine(model: M, cfg: TrainConfig, device: Optional[torch.device] = None,
                 params: Optional[Sequence[nn.Parameter]] = None) -> Engine[M]:
    """The engine ``cfg.backend`` names, around ``model`` (trainable ``params`` by default)."""
    if cfg.backend == "torch":
        return TorchEngine(model, cfg, device, params)
    return DeepSpeedEngine(model, cfg, device, params)
