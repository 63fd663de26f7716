"""RL stage: GRPO over latent reasoning (docs/METHOD.md, "RL (GRPO)").

``config`` (RLConfig, RewardConfig), ``rewards`` (pure reward functions), ``grpo`` (trajectories,
group advantages, log-prob recomputation, the clipped loss) and ``trainer`` (``train_rl``,
``RLJob``, ``run_rl_job``, ``run_rl_stage`` on the stage skeleton of :mod:`colar_core.training.stage`).
``python -m colar_core.rl.rl_main --config job.json`` is the launcher entry. Imports are lazy so
``import colar_core.rl`` does not import DeepSpeed.
"""

import importlib

from colar_core.rl.config import RewardConfig, RLConfig

__all__ = [
    "RLConfig", "RewardConfig",
    "correctness", "length_bonus", "combine", "compute_rewards",
    "Trajectories", "group_advantages", "policy_log_probs", "clipped_policy_loss", "grpo_loss",
    "train_rl", "RLResult", "RLJob", "run_rl_job", "run_rl_stage", "RLBatches",
]

_LAZY = {
    "correctness": "rewards", "length_bonus": "rewards", "combine": "rewards", "compute_rewards": "rewards",
    "Trajectories": "grpo", "group_advantages": "grpo", "policy_log_probs": "grpo",
    "clipped_policy_loss": "grpo", "grpo_loss": "grpo",
    "train_rl": "trainer", "RLResult": "trainer", "RLJob": "trainer", "run_rl_job": "trainer",
    "run_rl_stage": "trainer", "RLBatches": "trainer",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f"colar_core.rl.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'colar_core.rl' has no attribute {name!r}")
