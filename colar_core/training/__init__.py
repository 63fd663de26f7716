"""Training: DeepSpeed / PyTorch engines, the shared loop, checkpoints, callbacks, SFT and launching.

``train_loop`` is the one loop (SFT calls it with the CoLaR loss; RL calls it with its own);
``train_sft`` runs one SFT stage in this process; ``launch`` starts a multi-process stage with the
``deepspeed`` launcher or ``torchrun``. Imports are lazy so ``import colar_core.training`` does not
import DeepSpeed.
"""

from colar_core.training.config import LauncherConfig, TrainConfig

__all__ = [
    "TrainConfig", "LauncherConfig",
    "train_loop", "build_engine", "TorchEngine", "DeepSpeedEngine", "StepBatch", "LoopState",
    "CheckpointManager", "export_model", "latest_checkpoint",
    "JsonlLogger", "ConsoleLogger", "CallbackBase", "read_metrics",
    "train_sft", "SFTResult", "SFTJob", "run_sft_job",
    "build_launch_command", "launch", "run_sft_stage",
]

_LAZY = {
    "train_loop": "engine", "build_engine": "engine", "TorchEngine": "engine", "DeepSpeedEngine": "engine",
    "StepBatch": "engine", "LoopState": "engine",
    "CheckpointManager": "checkpoint", "export_model": "checkpoint", "latest_checkpoint": "checkpoint",
    "JsonlLogger": "callbacks", "ConsoleLogger": "callbacks", "CallbackBase": "callbacks", "read_metrics": "callbacks",
    "train_sft": "sft", "SFTResult": "sft", "SFTJob": "sft", "run_sft_job": "sft",
    "build_launch_command": "launch", "launch": "launch", "run_sft_stage": "launch",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"colar_core.training.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'colar_core.training' has no attribute {name!r}")
