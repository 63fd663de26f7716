"""The projection a continuous thought may pass through, and how a model gets one.

A continuous thought is the backbone's last hidden state at the newest position, fed back as the
next input embedding (Coconut, Distill). Optionally it first goes through :class:`ThoughtProjection`
(the reference's ``MLPProjector``: Linear-GELU-Linear at the hidden size). The thought loop itself,
shared by training and inference, is :func:`colar_core.inference.feed_thoughts`.
"""

from __future__ import annotations

from torch import nn


class ThoughtProjection(nn.Module):
    """Linear -> GELU -> Linear, hidden size to hidden size."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.GELU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, x):
        return self.proj(x)


def attach_projection(model) -> ThoughtProjection:
    """Give ``model`` (a ColarModel) a fresh projection as ``model.thought_projection`` (a submodule:
    trained, checkpointed and saved with it) and record it in ``model.state``; returns it."""
    weight = model.latent_head.mean.weight
    proj = ThoughtProjection(model.state.hidden_size).to(device=weight.device, dtype=weight.dtype)
    model.thought_projection = proj
    model.state.thought_projection = True
    return proj
