"""The data order of every training stage: a seeded permutation per epoch, sliced across processes.

One :class:`EpochSampler` serves SFT (:class:`colar_core.training.sft.SFTBatches`, and through it the
baselines' curriculum batches) and RL (:class:`colar_core.rl.trainer.RLBatches`). Each epoch is a fresh
``torch.randperm`` seeded with ``seed * 1_000_003 + epoch`` (on its own CPU generator, so no other
random stream moves); a draw takes the next ``per_rank * world_size`` entries and process ``k`` keeps
the ``k``-th slice of ``per_rank``. The ragged tail of an epoch (fewer entries than one draw) is
dropped. Its position (epoch, index) is all a checkpoint needs to continue the same order.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

#: Reorders an epoch's permutation with the epoch's generator (already past the permutation's draw).
Reorder = Callable[[list[int], torch.Generator], list[int]]


class EpochSampler:
    """Which of ``n`` items this process takes next (see the module docstring).

    ``reorder`` (optional) rearranges each epoch's permutation, drawing from the same generator after
    it: SFT's length grouping.
    """

    def __init__(self, n: int, per_rank: int, rank: int, world_size: int, seed: int,
                 reorder: Optional[Reorder] = None):
        self.n, self.per_rank, self.rank, self.seed = n, per_rank, rank, seed
        self.per_draw = per_rank * world_size
        self.reorder = reorder
        self.epoch, self.index = 0, 0
        self._perm: list[int] = []
        self._perm_epoch = -1

    def permutation(self) -> list[int]:
        """The current epoch's order (computed once per epoch)."""
        if self._perm_epoch != self.epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            self._perm = torch.randperm(self.n, generator=g).tolist()
            if self.reorder is not None:
                self._perm = self.reorder(self._perm, g)
            self._perm_epoch = self.epoch
        return self._perm

    def next_indices(self) -> list[int]:
        """This process's items of the next draw (a new epoch starts when a draw no longer fits)."""
        if self.index + self.per_draw > self.n:
            self.epoch, self.index = self.epoch + 1, 0
        perm = self.permutation()
        lo = self.index + self.rank * self.per_rank
        self.index += self.per_draw
        return perm[lo: lo + self.per_rank]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
