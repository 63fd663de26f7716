"""Where this process computes: :func:`default_device`, its GPU when it has one, else the CPU. Shared by
training (each rank's GPU) and evaluation (a saved model loads onto the CPU and is moved here)."""

from __future__ import annotations

import torch


def default_device(local_rank: int = 0) -> torch.device:
    """``cuda:<local_rank>`` (modulo the GPUs visible) when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")
