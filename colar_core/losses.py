"""Loss terms of CoLaR SFT and the Gaussian log-density that RL reuses."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def gaussian_log_prob(mean: torch.Tensor, log_std: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Log-density of ``x`` under a diagonal Gaussian, averaged over the last dim.

    Equals ``Normal(mean, log_std.exp()).log_prob(x).mean(-1)``, written out so it stays cheap and
    differentiable in all three arguments.
    """
    z = (x - mean) * torch.exp(-log_std)
    return (-0.5 * z.pow(2) - log_std - _HALF_LOG_2PI).mean(-1)


def gaussian_entropy(log_std: torch.Tensor) -> torch.Tensor:
    """Entropy per dimension of a diagonal Gaussian, averaged over the last dim."""
    return (log_std + 0.5 + _HALF_LOG_2PI).mean(-1)


def latent_loss(
    mean: torch.Tensor,
    log_std: torch.Tensor,
    target: torch.Tensor,
    kind: str = "soft_mse",
    deterministic: bool = False,
    generator: Optional[torch.Generator] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Latent loss over ``[N, H]`` predictions of scaled targets.

    ``soft_mse``: MSE of a reparameterised sample against the target (reference default on GSM).
    ``nll``: negative Gaussian log-density of the target, mean over dims (reference on MATH).
    Deterministic heads use the MSE of the mean for either kind.
    Returns ``(loss, entropy, sample)``; the entropy term is returned, not applied.
    """
    entropy = gaussian_entropy(log_std).mean()
    if deterministic:
        return F.mse_loss(mean.float(), target.float()), entropy, mean
    if kind == "soft_mse":
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        sample = mean + noise * log_std.exp()
        return F.mse_loss(sample.float(), target.float()), entropy, sample
    if kind == "nll":
        return -gaussian_log_prob(mean.float(), log_std.float(), target.float()).mean(), entropy, mean
    raise ValueError(f"latent loss must be 'soft_mse' or 'nll', got {kind!r}")


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean CE over ``[N, V]`` logits of already-selected labelled positions (fp32 for stability)."""
    if labels.numel() == 0:
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), labels)
