"""The paper's answer check, accuracy, mean chain length and mean +/- 95% CI across seeds."""

from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence

from colar_core.text import ANSWER_PREFIX


def extract_answer(text: str) -> str:
    """The part of a model's output that is scored, exactly as the reference extracts it
    (``LitCoTModelBase.extract_answer_from_output``: ``text.split("Answer:")[1]``): the text after the
    first ``Answer:`` up to the next one if there are several, or the whole output when there is no
    ``Answer:``. Returned as is; :func:`answers_match` cleans it."""
    pieces = text.split(ANSWER_PREFIX)
    return pieces[1] if len(pieces) > 1 else text


def normalize_answer(ans: str, gold: bool = False) -> str:
    """The reference's cleaning (``verify_answer``): strip spaces and newlines at both ends, then
    trailing dots, then (predictions only) trailing dots and newlines, then drop every comma."""
    ans = ans.strip("\n ").rstrip(".")
    if not gold:
        ans = ans.rstrip(".\n")
    return ans.replace(",", "")


def answers_match(pred: Optional[str], gold: str) -> bool:
    """The reference's ``verify_answer``: both sides cleaned (:func:`normalize_answer`), then compared
    as floats when both parse with ``float()``, as strings when the gold one does not parse, and
    never equal when only the gold one parses. ``pred`` None (nothing extracted) never matches."""
    if pred is None:
        return False
    p, g = normalize_answer(pred), normalize_answer(str(gold), gold=True)
    try:
        gf = float(g)
    except ValueError:
        return p == g
    try:
        return float(p) == gf
    except ValueError:
        return False


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
