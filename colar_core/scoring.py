"""The paper's answer check, accuracy, mean chain length and mean +/- 95% CI across seeds."""

from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence

from colar_core.text import ANSWER_PREFIX


def extract_answer(text: str) -> Optional[str]:
    """Text after the last ``Answer:``, cleaned as the reference does; None when there is none."""
    if ANSWER_PREFIX not in text:
        return None
    return normalize_answer(text.rsplit(ANSWER_PREFIX, 1)[1])


def normalize_answer(ans: str) -> str:
    """Strip spaces and newlines, a trailing '.', and thousands commas."""
    ans = ans.strip().replace(",", "")
    while ans.endswith("."):
        ans = ans[:-1].rstrip()
    return ans.strip()


def _as_float(s: str) -> Optional[float]:
    try:
        value = float(s)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def answers_match(pred: Optional[str], gold: str) -> bool:
    """Compare as floats when both parse, else as strings (after normalisation)."""
    if pred is None:
        return False
    p, g = normalize_answer(pred), normalize_answer(str(gold))
    pf, gf = _as_float(p), _as_float(g)
    if pf is not None and gf is not None:
        return pf == gf
    return p == g


def accuracy(preds: Sequence[Optional[str]], golds: Sequence[str]) -> float:
    if len(preds) != len(golds):
        raise ValueError(f"{len(preds)} predictions for {len(golds)} gold answers")
    if not golds:
        return 0.0
    return sum(answers_match(p, g) for p, g in zip(preds, golds)) / len(golds)


def mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def mean_ci95(values: Sequence[float]) -> tuple[float, float]:
    """Mean and half-width 1.96 * std / sqrt(n) (sample std, n-1), as the paper reports over seeds."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_ci95 needs at least one value")
    m = sum(values) / n
    if n == 1:
        return m, 0.0
    var = sum((v - m) ** 2 for v in values) / (n - 1)
    return m, 1.96 * math.sqrt(var) / math.sqrt(n)
