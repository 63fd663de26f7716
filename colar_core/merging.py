"""Merging token embeddings into compressed embeddings, as tensor operations.

Each group of up to ``r`` consecutive reasoning-token embeddings becomes one compressed
embedding. Pad slots are zeroed before the merge, and an all-pad group merges to zeros.

Poolings (``ModelConfig.pooling``):

* ``sqrt`` (paper default): the sum of the real tokens divided by sqrt(n real tokens), which keeps
  the norm of a sum of near-independent vectors close to one token's;
* ``mean``: their mean (the weaker ablation).

Both are blind to order inside a group: with a tokenizer that splits numbers into digits, "12"
and "21" merge to the same vector. Two order-aware variants change each slot ``j`` (0-based
position inside the group) a little before the same sum / sqrt(n), so that slot 0 is untouched (a
one-token group, and every group at r = 1, merges to the token's own embedding) and the merged
vector stays close to the plain sum, where the LM can read it (a *random* rotation per slot sends
it out of the embedding space; see docs/BENCHMARKS.md, "Order-aware merge vs digit tokens"):

* ``rotate``: no parameters. The hidden dimensions are paired into 2-D planes by a fixed seeded
  permutation, and slot ``j`` is rotated by ``j * merge_angle`` radians in every plane, so each
  rotated embedding keeps cosine ``cos(j * merge_angle)`` with the original;
* ``gain``: learned. Slot ``j >= 1`` is multiplied elementwise by ``1 + delta_j`` (``delta``: a
  ``[MAX_SLOTS - 1, H]`` parameter, initialised small and random so order counts from the first
  step, trained with the model, saved next to the latent head). Weight decay pulls it back to the
  plain sum.

The latent head learns to predict the merged vector whatever the pooling, so inference feeds the
head's sample as it is and never needs an inverse.
"""

from __future__ import annotations

import random

import torch
from torch import nn

POOLINGS = ("sqrt", "mean", "rotate", "gain")
#: Poolings whose merged vector depends on token order inside a group.
ORDER_AWARE = ("rotate", "gain")
#: Largest group a per-slot pooling supports (prompts name speeds 1..16).
MAX_SLOTS = 16
#: Default rotation step of ``rotate`` (radians per slot): slot 4 keeps cosine 0.70 with itself.
DEFAULT_ANGLE = 0.2
#: Standard deviation of the initial ``gain`` offsets around 1.
GAIN_INIT_STD = 0.1
#: Seed of the fixed plane pairing of ``rotate`` (part of the method: a saved model relies on it).
_PAIRING_SEED = "colar-merge-rotate"


def merge_groups(token_embeddings: torch.Tensor, token_mask: torch.Tensor, pooling: str = "sqrt") -> torch.Tensor:
    """``[B, G, r, H]`` embeddings and ``[B, G, r]`` mask -> ``[B, G, H]`` compressed embeddings
    (``sqrt`` or ``mean``; the order-aware poolings need a :class:`GroupMerger`)."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if pooling in ORDER_AWARE:
        raise ValueError(f"pooling {pooling!r} has per-slot state: merge with a GroupMerger")
    return _pool(token_embeddings, token_mask, pooling)


def _pool(token_embeddings: torch.Tensor, token_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    mask = token_mask.to(token_embeddings.dtype).unsqueeze(-1)
    summed = (token_embeddings * mask).sum(dim=-2)
    count = mask.sum(dim=-2).clamp(min=1.0)
    return summed / (count if pooling == "mean" else count.sqrt())


def plane_pairing(hidden_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(partner, sign)`` of the fixed 2-D planes of ``rotate``: dimension ``d`` is paired with
    ``partner[d]``; rotating by ``a`` maps ``x`` to ``x * cos a + x[partner] * sign * sin a``. With an
    odd ``hidden_size`` one dimension is left unrotated (its own partner, sign 0)."""
    dims = list(range(hidden_size))
    random.Random(f"{_PAIRING_SEED}:{hidden_size}").shuffle(dims)
    partner = list(range(hidden_size))
    sign = [0.0] * hidden_size
    for a, b in zip(dims[0::2], dims[1::2]):
        partner[a], partner[b] = b, a
        sign[a], sign[b] = -1.0, 1.0
    return torch.tensor(partner, dtype=torch.long), torch.tensor(sign)


class GroupMerger(nn.Module):
    """The merge of a saved model: its pooling and, for ``rotate`` / ``gain``, the per-slot state.

    ``forward(token_embeddings [B, G, r, H], token_mask [B, G, r]) -> [B, G, H]``.
    Only ``gain`` has parameters (:meth:`has_parameters`); ``rotate``'s pairing is rebuilt from
    ``hidden_size`` and is never saved.
    """

    partner: torch.Tensor  # rotate only: buffers (see plane_pairing)
    sign: torch.Tensor

    def __init__(self, pooling: str, hidden_size: int, angle: float = DEFAULT_ANGLE):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.pooling, self.hidden_size, self.angle = pooling, hidden_size, float(angle)
        if pooling == "rotate":
            partner, sign = plane_pairing(hidden_size)
            self.register_buffer("partner", partner, persistent=False)
            self.register_buffer("sign", sign, persistent=False)
        if pooling == "gain":
            self.gain_delta = nn.Parameter(torch.randn(MAX_SLOTS - 1, hidden_size) * GAIN_INIT_STD)

    @property
    def has_parameters(self) -> bool:
        return self.pooling == "gain"

    def slot_transform(self, token_embeddings: torch.Tensor) -> torch.Tensor:
        """Each slot's embedding before the sum (identity for ``sqrt`` / ``mean`` and for slot 0)."""
        r = token_embeddings.shape[-2]
        if self.pooling in ORDER_AWARE and r > MAX_SLOTS:
            raise ValueError(f"pooling {self.pooling!r} supports groups of at most {MAX_SLOTS} tokens, got {r}")
        if self.pooling == "rotate":
            angles = torch.arange(r, device=token_embeddings.device, dtype=torch.float32) * self.angle
            cos = angles.cos().to(token_embeddings.dtype).unsqueeze(-1)
            sin = angles.sin().to(token_embeddings.dtype).unsqueeze(-1)
            swapped = token_embeddings.index_select(-1, self.partner) * self.sign.to(token_embeddings.dtype)
            return token_embeddings * cos + swapped * sin
        if self.pooling == "gain":
            ones = self.gain_delta.new_zeros(1, self.hidden_size)
            gain = 1.0 + torch.cat([ones, self.gain_delta[: r - 1]], dim=0)
            return token_embeddings * gain.to(token_embeddings.dtype)
        return token_embeddings

    def forward(self, token_embeddings: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
        return _pool(self.slot_transform(token_embeddings), token_mask, self.pooling)

