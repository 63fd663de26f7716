"""The promotion gate: whether a pipeline run's registered model takes the alias ``candidate``.

Every run registers its model as one version (a retry of the run reuses it); the alias moves only
under ``tracking.promotion``:

* ``rule: always`` -- every finished run takes it (the behaviour before the gate);
* ``rule: better`` (default) -- the run takes it when there is no candidate yet, or when

  - both were measured on the same evaluation set: the content digest of the set behind ``metric``
    (the parent runs' tags ``colar.eval.digest`` for the primary set, ``colar.eval.digest.<set>`` for
    a named one: :func:`digest_tag`) is the same; a different or missing digest is a refusal that says
    so (with each side's ``n_questions``), whatever the numbers;
  - its ``metric`` (an accuracy, e.g. ``accuracy/c2`` of the primary test set) beats the candidate's by
    more than the candidate's 95% interval over questions (``accuracy_qci95/...``: it widens as the
    questions get fewer and is not 0 with one seed, unlike the paper's interval over seeds,
    ``accuracy_ci95/...``, which Table 1 shows);
  - and its chain at that setting is no longer (``mean_latents/...``, or ``mean_tokens/...`` for a text mode).

A non-finite accuracy never takes the alias (under either rule), and under ``better`` a comparison that
lacks one of its numbers or holds a non-finite one (the candidate's accuracy or interval, either chain
length) is a refusal naming what is missing: the alias never moves by default.

:func:`decide` is pure (metrics and digests in, decision out), so the rule is tested without servers;
the report stage reads the candidate, decides and moves the alias while it holds the registered
model's lock (:mod:`colar_infra.tracking.model_lock`), so two runs deciding at once cannot both read
the old candidate, and records the decision on the parent run (tags ``colar.promotion.*``) and in Prefect.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Mapping, Optional

__all__ = ["Decision", "decide", "digest_tag", "length_metric"]

#: How much longer (in latents or tokens) a new chain may be and still count as "no longer":
#: means over hundreds of questions and seeds differ by float noise even for equal models.
LENGTH_SLACK = 1e-6


@dataclass(frozen=True)
class Decision:
    """The gate's answer and the numbers it compared (for the run's tags and the Prefect artifact)."""

    promote: bool
    reason: str
    metric: str
    new: Optional[float] = None
    old: Optional[float] = None
    old_qci95: Optional[float] = None
    new_length: Optional[float] = None
    old_length: Optional[float] = None
    new_n_questions: Optional[float] = None
    old_n_questions: Optional[float] = None
    new_digest: Optional[str] = None
    old_digest: Optional[str] = None

    def tags(self) -> dict[str, str]:
        """``colar.promotion.*`` tags: decision, reason and each number (and set digest) compared."""
        tags = {"colar.promotion.decision": "promoted" if self.promote else "kept",
                "colar.promotion.reason": self.reason[:5000], "colar.promotion.metric": self.metric}
        for name in ("new", "old", "old_qci95", "new_length", "old_length", "new_n_questions", "old_n_questions"):
            if (value := getattr(self, name)) is not None:
                tags[f"colar.promotion.{name}"] = f"{value:.6g}"
        for name in ("new_digest", "old_digest"):
            if (text := getattr(self, name)) is not None:
                tags[f"colar.promotion.{name}"] = text
        return tags


def digest_tag(metric: str) -> str:
    """The parent-run tag that holds the content digest of the set ``metric`` was measured on:
    ``accuracy/c2`` (the primary set, as the unnamed metrics) -> ``colar.eval.digest``;
    ``accuracy/svamp/c2`` -> ``colar.eval.digest.svamp``."""
    parts = metric.split("/")
    return f"colar.eval.digest.{parts[1]}" if len(parts) == 3 else "colar.eval.digest"


def _count(metrics: Mapping[str, float], metric: str) -> Optional[float]:
    name = metric.replace("accuracy/", "n_questions/", 1)
    return float(metrics[name]) if name in metrics else None


def _questions(n: Optional[float]) -> str:
    return "an unknown number of questions" if n is None else f"{n:.0f} questions"


def length_metric(metric: str) -> tuple[str, str]:
    """The chain-length metrics that go with an accuracy metric: ``accuracy/c2`` ->
    (``mean_latents/c2``, ``mean_tokens/c2``); the first one present is used."""
    rest = metric.partition("/")[2]
    return f"mean_latents/{rest}", f"mean_tokens/{rest}"


def _length(metrics: Mapping[str, float], metric: str) -> Optional[float]:
    for name in length_metric(metric):
        if name in metrics:
            return float(metrics[name])
    return None


def _finite(value: Optional[float]) -> bool:
    return value is not None and math.isfinite(value)


def decide(new: Mapping[str, float], current: Optional[Mapping[str, float]], *,
           rule: Literal["always", "better"] = "better", metric: str = "accuracy/c2",
           current_version: Optional[str] = None, new_digest: Optional[str] = None,
           current_digest: Optional[str] = None) -> Decision:
    """Whether the run whose metrics are ``new`` takes the alias from the candidate whose run's
    metrics are ``current`` (None: there is no candidate). ``new_digest`` / ``current_digest``: the
    content digests of the evaluation set each was measured on (:func:`digest_tag`). See the module
    docstring for the rule.

    A non-finite accuracy (NaN, inf) never takes the alias, whatever the rule; under ``better``, two
    runs measured on different sets (or either without a digest) are not compared, and a comparison
    that lacks a number (the candidate's accuracy, its interval over questions, either chain length)
    or holds a non-finite one is a refusal that says which, never a silent pass."""
    who = f"version {current_version}" if current_version else "the current candidate"
    value = new.get(metric)
    if value is not None and not math.isfinite(float(value)):
        return Decision(False, f"this run's {metric} is {float(value)}, not a finite accuracy: {who} stays", metric)
    if rule == "always":
        return Decision(True, "rule 'always': every run takes the alias", metric, value)
    if current is None:
        return Decision(True, "no candidate yet", metric, value)
    if value is None:
        return Decision(False, f"this run has no {metric}: {who} stays", metric)
    acc_new = float(value)
    n_new, n_old = _count(new, metric), _count(current, metric)
    tag = digest_tag(metric)
    if new_digest is None or current_digest is None or new_digest != current_digest:
        if new_digest is None or current_digest is None:
            lacking = " and ".join(w for w, d in (("this run", new_digest), (who, current_digest)) if d is None)
            why = f"{lacking} {'has' if ' and ' not in lacking else 'have'} no digest of its evaluation set ({tag})"
        else:
            why = (f"measured on different evaluation sets: this run on {_questions(n_new)} (set digest "
                   f"{new_digest[:12]}), {who} on {_questions(n_old)} (set digest {current_digest[:12]})")
        return Decision(False, f"not comparable: {why}; {who} stays (rule 'always' moves the alias regardless)",
                        metric, acc_new, new_n_questions=n_new, old_n_questions=n_old, new_digest=new_digest,
                        old_digest=current_digest)
    ci_name = metric.replace("accuracy/", "accuracy_qci95/", 1)
    acc_old = float(current[metric]) if metric in current else None
    ci_old = float(current[ci_name]) if ci_name in current else None
    len_new, len_old = _length(new, metric), _length(current, metric)

    def decision(promote: bool, reason: str) -> Decision:
        return Decision(promote, reason, metric, acc_new, acc_old, ci_old, len_new, len_old, n_new, n_old,
                        new_digest, current_digest)

    missing = [what for what, v in ((f"{who}'s {metric}", acc_old), (f"{who}'s {ci_name}", ci_old),
                                    (f"this run's chain length at {metric}", len_new),
                                    (f"{who}'s chain length at {metric}", len_old)) if not _finite(v)]
    if missing:
        return decision(False, f"not comparable: {', '.join(missing)} missing or not finite; {who} stays "
                        "(rule 'always' moves the alias regardless)")
    assert acc_old is not None and ci_old is not None and len_new is not None and len_old is not None
    interval = f"95% interval over {_questions(n_old)} ({ci_old:.4f})"
    if acc_new <= acc_old + ci_old:
        return decision(False, f"{metric} {acc_new:.4f} does not beat {who}'s {acc_old:.4f} by more than its "
                        f"{interval}")
    if len_new > len_old + LENGTH_SLACK:
        return decision(False, f"{metric} {acc_new:.4f} beats {who}'s {acc_old:.4f} (+-{ci_old:.4f}) but its chain is "
                        f"longer ({len_new:.2f} against {len_old:.2f})")
    return decision(True, f"{metric} {acc_new:.4f} beats {who}'s {acc_old:.4f} by more than its {interval} "
                    "on the same evaluation set, with a chain no longer")
