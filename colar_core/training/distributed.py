"""This process's place in a (possibly multi-process) job.

:func:`dist_env` reads ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` as set by ``deepspeed`` or
``torchrun``, and without a launcher sets the single-process defaults DeepSpeed needs (including a
free ``MASTER_PORT``); :func:`default_device` picks this process's GPU, or the CPU.
:func:`init_single_process_group` sets up a one-process group without any TCP rendezvous, so a
single-process DeepSpeed run opens no port reachable from the network.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from colar_core.net import free_port


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job, read from the launcher's environment variables."""

    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


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


def init_single_process_group(backend: str) -> None:
    """Initialise torch.distributed for one process (rank 0 of 1) on an in-memory store: no TCPStore
    listens on ``MASTER_PORT``. Gloo's transport device, which listens too, is put on the loopback
    interface (``GLOO_SOCKET_IFNAME=lo`` while the group is made, unless set). A later
    ``deepspeed.init_distributed`` sees the group is up and uses it."""
    pin_gloo = backend == "gloo" and "GLOO_SOCKET_IFNAME" not in os.environ and os.path.isdir("/sys/class/net/lo")
    if pin_gloo:
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    try:
        torch.distributed.init_process_group(backend, store=torch.distributed.HashStore(), rank=0, world_size=1)
    finally:
        if pin_gloo:
            del os.environ["GLOO_SOCKET_IFNAME"]


def dist_ready() -> bool:
    """True when a torch.distributed process group is up."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()
