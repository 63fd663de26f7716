"""This process's place in a (possibly multi-process) job.

:func:`dist_env` reads ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` as set by ``deepspeed`` or
``torchrun``, and without a launcher sets the single-process defaults DeepSpeed needs (including a
free ``MASTER_PORT``); :func:`default_device` picks this process's GPU, or the CPU.
:func:`init_single_process_group` sets up a one-process group without any TCP rendezvous, so a
single-process DeepSpeed run opens no port reachable from the network. :func:`bound_collectives` makes
every process group of this process give up after a set time.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch

from colar_core.devices import default_device
from colar_core.net import free_port

__all__ = ["DistEnv", "bound_collectives", "default_device", "dist_env", "dist_ready", "init_single_process_group"]


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


def bound_collectives(timeout_s: float) -> None:
    """Every process group this process makes from now on, including the ones it does not make itself,
    gives up after ``timeout_s`` at its rendezvous or in one collective.

    The default group takes the timeout it is given, but a group made later without one (DeepSpeed's
    ZeRO data-parallel group, made by ``torch.distributed.new_group(ranks)``) takes torch's module
    default: 30 minutes for gloo, 10 for nccl. A node whose link went down then held its peers in an
    all-gather for half an hour (measured: the three-host test's ranks sat in ZeRO-2's all-gather for
    minutes after a 20 s timeout was given to ``deepspeed.init_distributed``). Setting the module default
    is the one place every such group reads."""
    from torch.distributed import distributed_c10d

    timeout = datetime.timedelta(seconds=timeout_s)
    distributed_c10d.default_pg_timeout = timeout
    if isinstance(getattr(distributed_c10d, "default_pg_nccl_timeout", None), datetime.timedelta):
        distributed_c10d.default_pg_nccl_timeout = timeout
