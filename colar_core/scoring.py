"""The paper's answer check, accuracy, mean chain length, and two 95% intervals of an accuracy:

- :func:`mean_ci95`, over seeds (the paper's Table 1: the spread of the accuracy between sampling
  seeds, 0 with one seed, blind to how many questions were asked);
- :func:`question_ci95`, over questions (what the promotion gate compares: how far the accuracy could
  move on another draw of questions of the same kind, seeds included, so 8 questions give a wide one).
"""

from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence

# extract_answer lives with the text format (inference reads answers with it, without the scoring code);
# it is re-exported here, where the reference's answer check reads it.
from colar_core.text import extract_answer

__all__ = ["accuracy", "answers_match", "extract_answer", "mean", "mean_ci95", "normalize_answer", "question_ci95"]


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


def question_ci95(correct: Sequence[Sequence[bool]]) -> float:
    """Half-width of a 95% interval of the accuracy that accounts for the number of questions:
    ``correct[s][i]`` is whether seed ``s`` answered question ``i``. Each question's accuracy is
    averaged over the seeds, and the half-width is 1.96 * sd / sqrt(n) over those n per-question
    values (sample sd, n-1): the standard error of a mean clustered by question, so the spread between
    questions and what the seeds add both count. With one seed it is the binomial normal interval
    1.96 * sqrt(p (1 - p) / (n - 1)) (0 when every answer is right or every one wrong: a Wald interval).
    Under two questions there is no spread to measure: 1.0, an interval as wide as accuracy itself."""
    if not correct:
        raise ValueError("question_ci95 needs at least one seed")
    n = len(correct[0])
    if any(len(seed) != n for seed in correct):
        raise ValueError(f"question_ci95: every seed must answer the same questions, got {[len(s) for s in correct]}")
    if n < 2:
        return 1.0
    per_question = [sum(bool(seed[i]) for seed in correct) / len(correct) for i in range(n)]
    m = sum(per_question) / n
    var = sum((p - m) ** 2 for p in per_question) / (n - 1)
    return 1.96 * math.sqrt(var) / math.sqrt(n)
