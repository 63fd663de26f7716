"""Training: engines, the shared loop, checkpoints, callbacks, the stage skeleton, SFT and launching.

Modules, bottom up: ``distributed`` (this process's place in the job), ``schedule`` (optimizer and
lr schedule), ``deepspeed_config``, ``engines`` (the ``Engine`` interface over PyTorch and
DeepSpeed), ``loop`` (``train_loop``, the one loop), ``checkpoint``, ``callbacks``, ``stage`` (what
every training method shares: job data, validation, best-k, final model, result file), ``sft`` (one
SFT stage) and ``launch`` (a multi-process stage under the ``deepspeed`` launcher or ``torchrun``).
RL lives in :mod:`colar_core.rl` on the same stage skeleton. Imports are lazy so
``import colar_core.training`` does not import DeepSpeed.
"""

import importlib

from colar_core.training.config import LauncherConfig, TrainConfig

__all__ = [
    "TrainConfig", "LauncherConfig",
    "train_loop", "StepBatch", "LoopState", "LoopPlan", "Validation",
    "Engine", "build_engine", "TorchEngine", "DeepSpeedEngine",
    "CheckpointManager", "export_model", "latest_checkpoint",
    "JsonlLogger", "ConsoleLogger", "CallbackBase", "read_metrics",
    "StageData", "run_stage_loop",
    "train_sft", "SFTResult", "SFTJob", "run_sft_job", "run_sft_stage",
    "build_launch_command", "launch",
]

_LAZY = {
    "train_loop": "loop", "StepBatch": "loop", "LoopState": "loop", "LoopPlan": "loop", "Validation": "loop",
    "Engine": "engines", "build_engine": "engines", "TorchEngine": "engines", "DeepSpeedEngine": "engines",
    "CheckpointManager": "checkpoint", "export_model": "checkpoint", "latest_checkpoint": "checkpoint",
    "JsonlLogger": "callbacks", "ConsoleLogger": "callbacks", "CallbackBase": "callbacks", "read_metrics": "callbacks",
    "StageData": "stage", "run_stage_loop": "stage",
    "train_sft": "sft", "SFTResult": "sft", "SFTJob": "sft", "run_sft_job": "sft", "run_sft_stage": "sft",
    "build_launch_command": "launch", "launch": "launch",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f"colar_core.training.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'colar_core.training' has no attribute {name!r}")
