"""Merging token embeddings into compressed embeddings, as tensor operations.

Each group of up to ``r`` consecutive reasoning-token embeddings becomes one compressed
embedding: the sum of its real tokens divided by sqrt(n real tokens) (paper default, keeps the
norm of a sum of near-independent vectors close to one token's) or their mean (the weaker
ablation). Pad slots are zeroed before the sum, and an all-pad group merges to zeros.
"""

from __future__ import annotations

import torch

POOLINGS = ("sqrt", "mean")


def merge_groups(token_embeddings: torch.Tensor, token_mask: torch.Tensor, pooling: str = "sqrt") -> torch.Tensor:
    """``[B, G, r, H]`` embeddings and ``[B, G, r]`` mask -> ``[B, G, H]`` compressed embeddings."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    mask = token_mask.to(token_embeddings.dtype).unsqueeze(-1)
    summed = (token_embeddings * mask).sum(dim=-2)
    count = mask.sum(dim=-2).clamp(min=1.0)
    return summed / (count.sqrt() if pooling == "sqrt" else count)
