"""The latent head: a diagonal-Gaussian policy over the next compressed embedding.

Architecture (reference): Linear(H -> I), GELU, Linear(I -> I), LayerNorm, then two linear heads
for the mean and the log-std. Its outputs live in *scaled* space: targets are compressed
embeddings divided by the model's embedding scale, and samples are multiplied back by it.
The deterministic variant has sigma ~ 0: it returns the mean, and its latent loss is the MSE.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

LOG_STD_MIN, LOG_STD_MAX = -10.0, 2.0


class LatentHead(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: Optional[int] = None, deterministic: bool = False):
        super().__init__()
        inter = intermediate_size or hidden_size
        self.hidden_size, self.intermediate_size, self.deterministic = hidden_size, inter, deterministic
        self.trunk = nn.Sequential(
            nn.Linear(hidden_size, inter), nn.GELU(), nn.Linear(inter, inter), nn.LayerNorm(inter)
        )
        self.mean = nn.Linear(inter, hidden_size)
        self.log_std = nn.Linear(inter, hidden_size)

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-std (clamped to a sane range) of the next scaled compressed embedding."""
        z = self.trunk(hidden)
        mean = self.mean(z)
        if self.deterministic:
            return mean, torch.full_like(mean, LOG_STD_MIN)
        return mean, self.log_std(z).clamp(LOG_STD_MIN, LOG_STD_MAX)

    def sample(
        self, hidden: torch.Tensor, sample: bool = True, generator: Optional[torch.Generator] = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A reparameterised sample (the mean when ``sample`` is False or the head is deterministic).

        Returns ``(latent, mean, log_std)`` in scaled space.
        """
        mean, log_std = self(hidden)
        if not sample or self.deterministic:
            return mean, mean, log_std
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean + noise * log_std.exp(), mean, log_std
