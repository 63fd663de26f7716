"""The optimizer and its learning-rate schedule.

:func:`build_optimizer` makes AdamW (torch, or DeepSpeed's fused / CPU kernels); :class:`LRSchedule`
is linear warm-up then constant, linear or cosine decay (:func:`lr_factor`), with the small
stateful interface DeepSpeed expects from a client scheduler.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, TypedDict

import torch
from torch import nn

from colar_core.training.config import TrainConfig


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

    def last_update_lr(self) -> float:
        """The lr the last update used (``step()`` has already moved the groups to the next one)."""
        return self.base_lrs[0] * self.factor(self.last_step - 1)

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


class _AdamArgs(TypedDict):
    """The hyperparameters every AdamW flavour of :func:`build_optimizer` takes."""

    lr: float
    betas: tuple[float, float]
    weight_decay: float


def build_optimizer(params: Sequence[nn.Parameter], cfg: TrainConfig, device: torch.device, kind: Optional[str] = None):
    """AdamW over ``params``. ``kind`` overrides ``cfg.optimizer`` ('adamw', 'fused_adam', 'cpu_adam')."""
    kind = kind or ("adamw" if cfg.optimizer == "auto" else cfg.optimizer)
    kw = _AdamArgs(lr=cfg.lr, betas=cfg.adam_betas, weight_decay=cfg.weight_decay)  # a validated 2-tuple
    if kind == "adamw":
        fused = device.type == "cuda" and all(p.is_floating_point() for p in params)
        return torch.optim.AdamW(params, fused=fused or None, **kw)
    if kind == "fused_adam":
        from deepspeed.ops.adam import FusedAdam  # deepspeed is heavy: only when asked for

        return FusedAdam(params, adam_w_mode=True, **kw)
    if kind == "cpu_adam":
        from deepspeed.ops.adam import DeepSpeedCPUAdam  # deepspeed is heavy: only when asked for

        return DeepSpeedCPUAdam(params, adamw_mode=True, **kw)
    raise ValueError(f"unknown optimizer {kind!r}")
