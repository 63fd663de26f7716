"""The speed/accuracy frontier a model was evaluated on, and the rule that picks a compression factor
from it for a budget (issue 26, item 4).

A :class:`Frontier` holds, for each compression factor ``c`` the evaluate stage measured, the accuracy
with its two 95 % intervals, the mean number of latents (#L) and the milliseconds per question, plus
what they were measured on (the primary test set's name and its number of questions). It is built
from the evaluate stage's metrics (:meth:`Frontier.from_metrics`: the names without a set, which are
the primary set's: ``accuracy/c{c}``, ``accuracy_ci95/c{c}``, ``accuracy_qci95/c{c}``,
``mean_latents/c{c}``, ``sec_per_question/c{c}``, ``n_questions/c{c}``) and travels as JSON
(:meth:`Frontier.to_json`, :meth:`Frontier.from_json`) with the logged model.

What the time means: the wall time of decoding at evaluation, per question and sampling seed, on the
machine and device that ran the evaluate stage, with questions decoded in batches of
``eval.generation.batch_size`` (64 by default). It is a measure of throughput there, not the latency
of one request on the machine that serves: a server on other hardware, or a request of one question
(no batch to share each decoder step with), takes a different time per question. The rule compares
factors with each other by it; it promises no response time.

:func:`choose` is the rule (pure: no I/O, no clock):

- ``latency_budget_ms``: the most accurate factor whose time fits (``ms_per_question <= budget``);
  equal accuracies: the faster, then the smaller factor.
- ``min_accuracy`` (a fraction, 0 to 1): the fastest factor whose accuracy meets it
  (``accuracy >= min_accuracy``, within 1e-9 for float rounding); equal times: the more accurate,
  then the smaller factor.
- A budget nothing meets: the fastest factor (equal times: the more accurate, then the smaller),
  with a warning that says so. Accuracies are the point estimates; the interval is reported, not used.
- Exactly one of the two: both, or neither, is a ValueError, as is a budget <= 0 (or not finite)
  and a ``min_accuracy`` outside 0..1.

:func:`given` describes a factor asked for by name (or the default) in the same terms.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal, Mapping, Optional, TypeGuard

from pydantic import BaseModel, ConfigDict, Field, field_validator

#: The file name of a frontier next to a logged model.
FILE_NAME = "frontier.json"
#: How the times of a frontier were measured (written into the JSON, for whoever reads it there).
TIMING = ("wall time of decoding at evaluation, per question and sampling seed, on the machine that ran the "
          "evaluate stage, questions decoded in batches of eval.generation.batch_size; not the latency of "
          "one request on the serving machine")
#: How close an accuracy may fall below ``min_accuracy`` and still meet it (float rounding of a mean).
ACCURACY_TOLERANCE = 1e-9
_PRIMARY_ACCURACY = re.compile(r"accuracy/c(?P<c>[0-9]+)")


class FrontierPoint(BaseModel):
    """One compression factor as the evaluate stage measured it on the primary test set."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    compression_factor: int = Field(ge=1)
    accuracy: float = Field(ge=0.0, le=1.0, description="Mean over seeds of the fraction answered right.")
    accuracy_ci95: Optional[float] = Field(None, ge=0.0, description="95 % half-width over seeds (Table 1's).")
    accuracy_qci95: Optional[float] = Field(None, ge=0.0, description="95 % half-width over questions.")
    mean_latents: float = Field(ge=0.0, description="Mean number of latents (#L) per question.")
    ms_per_question: float = Field(ge=0.0, description="Milliseconds of decoding per question (module docstring).")
    n_questions: Optional[int] = Field(None, ge=0, description="Questions scored.")

    def describe(self) -> str:
        """``c=2: accuracy 61.0 % ± 4.2, #L 12.3, 42.1 ms per question``: the interval is the one over
        questions when known, else the one over seeds."""
        ci = self.accuracy_qci95 if self.accuracy_qci95 is not None else self.accuracy_ci95
        interval = f" ± {100 * ci:.1f}" if ci is not None else ""
        return (f"c={self.compression_factor}: accuracy {100 * self.accuracy:.1f} %{interval}, "
                f"#L {self.mean_latents:.1f}, {_ms(self.ms_per_question)} ms per question")


class Frontier(BaseModel):
    """Each measured compression factor (:class:`FrontierPoint`, by increasing factor) and what they
    were measured on."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal[1] = 1
    set_name: Optional[str] = Field(None, description="The primary test set the points were measured on.")
    timing: str = Field(TIMING, description="How ms_per_question was measured.")
    points: tuple[FrontierPoint, ...] = Field(min_length=1)

    @field_validator("points")
    @classmethod
    def _one_point_per_factor(cls, points: tuple[FrontierPoint, ...]) -> tuple[FrontierPoint, ...]:
        factors = [p.compression_factor for p in points]
        if len(set(factors)) != len(factors):
            raise ValueError(f"one point per compression factor, got factors {factors}")
        return tuple(sorted(points, key=lambda p: p.compression_factor))

    @classmethod
    def from_metrics(cls, metrics: Mapping[str, float], set_name: Optional[str] = None) -> Optional[Frontier]:
        """The frontier of the evaluate stage's ``metrics`` (the primary set's names, without a set:
        module docstring); ``set_name``: that set's name. A factor needs its accuracy, mean #L and
        time; its intervals and question count are kept when present. None when no factor has all three
        (metrics from before timings, or a run that evaluated no latent reasoning)."""
        points = []
        for key in metrics:
            m = _PRIMARY_ACCURACY.fullmatch(key)
            if not m:
                continue
            c = m["c"]
            needed = (f"accuracy/c{c}", f"mean_latents/c{c}", f"sec_per_question/c{c}")
            if not all(_finite(metrics.get(name)) for name in needed):
                continue
            n = metrics.get(f"n_questions/c{c}")
            points.append(FrontierPoint(
                compression_factor=int(c), accuracy=float(metrics[f"accuracy/c{c}"]),
                accuracy_ci95=_optional(metrics.get(f"accuracy_ci95/c{c}")),
                accuracy_qci95=_optional(metrics.get(f"accuracy_qci95/c{c}")),
                mean_latents=float(metrics[f"mean_latents/c{c}"]),
                ms_per_question=1000.0 * float(metrics[f"sec_per_question/c{c}"]),
                n_questions=int(n) if _finite(n) else None))
        return cls(set_name=set_name, points=tuple(points)) if points else None

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)

    @classmethod
    def from_json(cls, text: str) -> Frontier:
        """A frontier from :meth:`to_json`'s text; pydantic's ValidationError (a ValueError) when it
        is not one."""
        return cls.model_validate_json(text)

    def point(self, compression_factor: int) -> Optional[FrontierPoint]:
        return next((p for p in self.points if p.compression_factor == compression_factor), None)

    def measured_on(self) -> str:
        """``gsm8k, 500 questions``: what the points were measured on, as far as known."""
        counts = {p.n_questions for p in self.points if p.n_questions is not None}
        parts = [self.set_name or "the primary test set"]
        if len(counts) == 1:
            parts.append(f"{counts.pop()} questions")
        return ", ".join(parts)


@dataclass(frozen=True)
class Choice:
    """The factor a request runs at, why (one line), and a warning (empty when none)."""

    compression_factor: int
    reason: str
    warning: str = ""


def _fastest_key(p: FrontierPoint) -> tuple[float, float, int]:
    return (p.ms_per_question, -p.accuracy, p.compression_factor)


def _most_accurate_key(p: FrontierPoint) -> tuple[float, float, int]:
    return (-p.accuracy, p.ms_per_question, p.compression_factor)


def choose(frontier: Frontier, latency_budget_ms: Optional[float] = None,
           min_accuracy: Optional[float] = None) -> Choice:
    """The factor of ``frontier`` for a latency budget or a minimum accuracy: exactly one of them
    (module docstring for the rule, its ties and its errors)."""
    if (latency_budget_ms is None) == (min_accuracy is None):
        raise ValueError("give exactly one of latency_budget_ms and min_accuracy, got "
                         + ("both" if latency_budget_ms is not None else "neither"))
    where = f"measured at evaluation on {frontier.measured_on()}"
    fastest = min(frontier.points, key=_fastest_key)
    if latency_budget_ms is not None:
        budget = float(latency_budget_ms)
        if not math.isfinite(budget) or budget <= 0:
            raise ValueError(f"latency_budget_ms: must be a number of milliseconds > 0, got {latency_budget_ms!r}")
        fits = [p for p in frontier.points if p.ms_per_question <= budget]
        if fits:
            best = min(fits, key=_most_accurate_key)
            return Choice(best.compression_factor,
                          f"latency_budget_ms {budget:g}: the most accurate of the {len(fits)} of "
                          f"{len(frontier.points)} factors whose time fits ({best.describe()}; {where})")
        return Choice(fastest.compression_factor,
                      f"latency_budget_ms {budget:g}: no factor's time fits, so the fastest "
                      f"({fastest.describe()}; {where})",
                      f"no compression factor meets latency_budget_ms {budget:g}: the fastest, "
                      f"c={fastest.compression_factor}, took {_ms(fastest.ms_per_question)} ms per question "
                      "at evaluation; answered with it")
    assert min_accuracy is not None
    wanted = float(min_accuracy)
    if not math.isfinite(wanted) or not 0.0 <= wanted <= 1.0:
        raise ValueError(f"min_accuracy: a fraction from 0 to 1 (0.6 for 60 %), got {min_accuracy!r}")
    meets = [p for p in frontier.points if p.accuracy >= wanted - ACCURACY_TOLERANCE]
    if meets:
        best = min(meets, key=_fastest_key)
        return Choice(best.compression_factor,
                      f"min_accuracy {wanted:g}: the fastest of the {len(meets)} of {len(frontier.points)} "
                      f"factors whose accuracy meets it ({best.describe()}; {where})")
    top = min(frontier.points, key=_most_accurate_key)
    return Choice(fastest.compression_factor,
                  f"min_accuracy {wanted:g}: no factor's accuracy meets it, so the fastest "
                  f"({fastest.describe()}; {where})",
                  f"no compression factor meets min_accuracy {wanted:g}: the most accurate, "
                  f"c={top.compression_factor}, had {100 * top.accuracy:.1f} % at evaluation; answered with "
                  f"the fastest, c={fastest.compression_factor}")


def given(frontier: Optional[Frontier], compression_factor: int, default: bool = False) -> Choice:
    """A factor the request named (``default``: the one used when it named none), described with its
    numbers from ``frontier`` when they are there."""
    said = (f"compression_factor {compression_factor} (the default: no compression_factor, latency_budget_ms "
            "or min_accuracy given)" if default else f"compression_factor {compression_factor} as asked")
    point = frontier.point(compression_factor) if frontier is not None else None
    if point is not None and frontier is not None:
        return Choice(compression_factor, f"{said} ({point.describe()}; measured at evaluation on "
                                          f"{frontier.measured_on()})")
    if frontier is not None:
        return Choice(compression_factor, f"{said} (not measured at evaluation)")
    return Choice(compression_factor, said)


def _ms(value: float) -> str:
    return f"{value:.4g}"


def _finite(value: object) -> TypeGuard[float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _optional(value: object) -> Optional[float]:
    return float(value) if _finite(value) else None
