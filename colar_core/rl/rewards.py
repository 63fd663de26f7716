"""Reward functions of the RL stage: small, pure, one number per rollout.

* :func:`correctness` - 1.0 if the predicted answer matches the gold one (``scoring.answers_match``:
  floats when both parse, else strings, after the paper's normalisation), else 0.0 (reference).
* :func:`length_bonus` - a bonus that only a *correct* rollout earns, larger for shorter chains:

  - ``linear``:  ``correct * (1 - min(n, max_latents) / max_latents)``, in ``[0, 1)``: one latent
    fewer is worth ``1 / max_latents``. Gentle; the default form.
  - ``inverse``: ``correct / n`` (the paper's optional "divided by #L"), in ``(0, 1]``: 1 latent
    earns 1, 2 latents 0.5. Strong; it can trade accuracy for length.

  Both are exactly 0 for a wrong answer, so a wrong rollout never gets any reward, and with
  non-negative weights a correct rollout always out-scores a wrong one (its total is at least
  ``weights.correct``). Among correct rollouts of one question, shorter ones score higher: after
  group normalisation that is what shortens chains.
* :func:`combine` - ``sum_k weights[k] * parts[k]``.
* :func:`compute_rewards` - all of the above for a batch of rollouts, as lists.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

from colar_core.scoring import answers_match


def correctness(pred: Optional[str], gold: str) -> float:
    """1.0 when ``pred`` matches ``gold``, else 0.0 (no answer counts as wrong)."""
    return 1.0 if answers_match(pred, gold) else 0.0


def length_bonus(correct: float, n_latents: int, max_latents: int, form: str = "linear") -> float:
    """Bonus of a chain of ``n_latents`` latents; 0 unless ``correct`` (see the module docstring)."""
    if max_latents < 1:
        raise ValueError(f"max_latents must be >= 1, got {max_latents}")
    if correct <= 0:
        return 0.0
    n = max(1, int(n_latents))
    if form == "linear":
        return float(correct) * (1.0 - min(n, max_latents) / max_latents)
    if form == "inverse":
        return float(correct) / n
    raise ValueError(f"length form must be 'linear' or 'inverse', got {form!r}")


def combine(parts: Mapping[str, Sequence[float]], weights: Mapping[str, float]) -> list[float]:
    """Weighted sum of reward parts, rollout by rollout. Every part needs a weight (0 drops it)."""
    missing = set(parts) - set(weights)
    if missing:
        raise KeyError(f"no weight for reward part(s) {sorted(missing)}")
    lengths = {len(v) for v in parts.values()}
    if len(lengths) > 1:
        raise ValueError(f"reward parts have different lengths {sorted(lengths)}")
    n = lengths.pop() if lengths else 0
    return [sum(float(weights[k]) * float(v[i]) for k, v in parts.items()) for i in range(n)]


def compute_rewards(
    preds: Sequence[Optional[str]],
    golds: Sequence[str],
    n_latents: Sequence[int],
    max_latents: int,
    correct_weight: float = 1.0,
    length_weight: float = 0.0,
    length_form: str = "linear",
) -> dict[str, list[float]]:
    """Reward parts and their weighted ``total`` for a batch of rollouts.

    Returns ``{"correct": [...], "length": [...], "total": [...]}`` (one value per rollout).
    """
    if not (len(preds) == len(golds) == len(n_latents)):
        raise ValueError(f"{len(preds)} predictions, {len(golds)} golds, {len(n_latents)} lengths")
    correct = [correctness(p, g) for p, g in zip(preds, golds)]
    length = [length_bonus(c, n, max_latents, length_form) for c, n in zip(correct, n_latents)]
    parts = {"correct": correct, "length": length}
    total = combine(parts, {"correct": correct_weight, "length": length_weight})
    return {**parts, "total": total}
