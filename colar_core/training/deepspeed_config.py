"""The DeepSpeed config dict of a run: quiet defaults < the user's JSON file < ``TrainConfig``.

``TrainConfig`` owns batch sizes, accumulation, clipping, precision and the ZeRO stage (a file
value it overrides is logged); everything else (bucket sizes, offload, overlap_comm, an
'optimizer' section, ...) may come from the file.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from colar_core.training.config import TrainConfig

log = logging.getLogger(__name__)


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
