"""The frontier a model is logged with and the rule that picks a compression factor for a budget
(issue 26, item 4): colar_core.frontier, pure, no MLflow (the served side is in
tests/test_serving_requests.py and, over HTTP, tests/test_serving.py)."""

from __future__ import annotations

import math

import pytest


def _metrics() -> dict[str, float]:
    """The evaluate stage's metrics for factors 1-3 on the primary set (and on a second set 'svamp',
    the average over sets and a CoT baseline, none of which is the frontier)."""
    m: dict[str, float] = {}
    for c, acc, ci, qci, latents, sec in ((1, 0.80, 0.02, 0.05, 30.0, 0.030), (2, 0.70, 0.01, 0.06, 15.0, 0.020),
                                         (3, 0.50, 0.0, 0.07, 10.0, 0.010)):
        m.update({f"accuracy/c{c}": acc, f"accuracy_ci95/c{c}": ci, f"accuracy_qci95/c{c}": qci,
                  f"mean_latents/c{c}": latents, f"sec_per_question/c{c}": sec, f"n_questions/c{c}": 200.0,
                  f"accuracy/svamp/c{c}": 0.1, f"sec_per_question/svamp/c{c}": 9.0,
                  f"mean_latents/svamp/c{c}": 1.0, f"accuracy/avg/c{c}": 0.2})
    m.update({"accuracy/cot": 0.9, "mean_tokens/cot": 40.0, "sec_per_question/cot": 0.05})
    return m


def _frontier(*points: tuple[int, float, float]):
    """A frontier of (c, accuracy, ms per question) points."""
    from colar_core.frontier import Frontier, FrontierPoint

    return Frontier(set_name="test", points=tuple(
        FrontierPoint(compression_factor=c, accuracy=acc, mean_latents=10.0 / c, ms_per_question=ms, n_questions=50)
        for c, acc, ms in points))


def test_the_frontier_is_built_from_the_primary_sets_metrics_and_survives_json():
    from colar_core.frontier import Frontier

    frontier = Frontier.from_metrics(_metrics(), set_name="gsm8k")
    assert frontier is not None and frontier.set_name == "gsm8k"
    assert [p.compression_factor for p in frontier.points] == [1, 2, 3]
    p2 = frontier.point(2)
    assert p2 is not None
    assert (p2.accuracy, p2.accuracy_ci95, p2.accuracy_qci95, p2.mean_latents, p2.n_questions) == \
        (0.70, 0.01, 0.06, 15.0, 200)
    assert math.isclose(p2.ms_per_question, 20.0)  # seconds in the metrics, milliseconds here
    assert frontier.measured_on() == "gsm8k, 200 questions"
    assert "batch_size" in frontier.timing and "evaluate stage" in frontier.timing

    again = Frontier.from_json(frontier.to_json())
    assert again == frontier

    # a factor without a time (or #L) is not on it; no factor at all: no frontier
    partial = {k: v for k, v in _metrics().items() if k != "sec_per_question/c3"}
    got = Frontier.from_metrics(partial)
    assert got is not None and [p.compression_factor for p in got.points] == [1, 2]
    assert got.set_name is None and got.measured_on() == "the primary test set, 200 questions"
    assert Frontier.from_metrics({"accuracy/cot": 0.9, "accuracy/svamp/c2": 0.5}) is None
    assert Frontier.from_metrics({"accuracy/c2": 0.5, "mean_latents/c2": 3.0, "sec_per_question/c2": math.nan}) is None


@pytest.mark.parametrize("text", [
    "not json",
    '{"format": 1, "points": []}',
    '{"format": 2, "points": [{"compression_factor": 1, "accuracy": 0.5, "mean_latents": 1, "ms_per_question": 1}]}',
    '{"format": 1, "points": [{"compression_factor": 1, "accuracy": 1.5, "mean_latents": 1, "ms_per_question": 1}]}',
    '{"format": 1, "points": [{"compression_factor": 1, "accuracy": 0.5, "mean_latents": 1, "ms_per_question": 1},'
    ' {"compression_factor": 1, "accuracy": 0.6, "mean_latents": 1, "ms_per_question": 2}]}',
])
def test_a_file_that_is_not_a_frontier_is_refused(text):
    from colar_core.frontier import Frontier

    with pytest.raises(ValueError):
        Frontier.from_json(text)


def test_a_latency_budget_gets_the_most_accurate_factor_whose_time_fits():
    from colar_core.frontier import choose

    frontier = _frontier((1, 0.80, 30.0), (2, 0.70, 20.0), (3, 0.50, 10.0))
    for budget, c in ((1000, 1), (30, 1), (29.9, 2), (20, 2), (15, 3), (10, 3)):  # fits: time <= budget
        choice = choose(frontier, latency_budget_ms=budget)
        assert (choice.compression_factor, choice.warning) == (c, ""), (budget, choice)
    choice = choose(frontier, latency_budget_ms=25)
    assert choice.reason.startswith("latency_budget_ms 25: the most accurate of the 2 of 3 factors whose time fits")
    assert "c=2: accuracy 70.0 %" in choice.reason and "20 ms per question" in choice.reason
    assert "measured at evaluation on test, 50 questions" in choice.reason

    # equal accuracies: the faster; equal accuracies and times: the smaller factor
    assert choose(_frontier((1, 0.7, 30.0), (2, 0.7, 20.0), (3, 0.5, 10.0)), latency_budget_ms=40).compression_factor == 2
    assert choose(_frontier((1, 0.5, 9.0), (2, 0.7, 20.0), (3, 0.7, 20.0)), latency_budget_ms=40).compression_factor == 2


def test_a_minimum_accuracy_gets_the_fastest_factor_that_meets_it():
    from colar_core.frontier import choose

    frontier = _frontier((1, 0.80, 30.0), (2, 0.70, 20.0), (3, 0.50, 10.0))
    for wanted, c in ((0.0, 3), (0.5, 3), (0.51, 2), (0.7, 2), (0.75, 1), (0.8, 1)):  # meets: accuracy >= it
        choice = choose(frontier, min_accuracy=wanted)
        assert (choice.compression_factor, choice.warning) == (c, ""), (wanted, choice)
    assert choose(frontier, min_accuracy=0.7).reason.startswith(
        "min_accuracy 0.7: the fastest of the 2 of 3 factors whose accuracy meets it (c=2")
    # a mean over seeds a hair below the asked accuracy still meets it (float rounding)
    assert choose(_frontier((1, 0.7 - 1e-12, 30.0), (3, 0.5, 10.0)), min_accuracy=0.7).compression_factor == 1
    # equal times: the more accurate; equal times and accuracies: the smaller factor
    assert choose(_frontier((1, 0.8, 10.0), (2, 0.7, 10.0), (3, 0.5, 30.0)), min_accuracy=0.6).compression_factor == 1
    assert choose(_frontier((1, 0.9, 50.0), (2, 0.7, 10.0), (3, 0.7, 10.0)), min_accuracy=0.6).compression_factor == 2


def test_a_budget_nothing_meets_gets_the_fastest_factor_and_a_warning():
    from colar_core.frontier import choose

    frontier = _frontier((1, 0.80, 30.0), (2, 0.70, 20.0), (3, 0.50, 10.0))
    choice = choose(frontier, latency_budget_ms=5)
    assert choice.compression_factor == 3
    assert choice.reason.startswith("latency_budget_ms 5: no factor's time fits, so the fastest (c=3")
    assert choice.warning == ("no compression factor meets latency_budget_ms 5: the fastest, c=3, took 10 ms per "
                              "question at evaluation; answered with it")
    choice = choose(frontier, min_accuracy=0.95)
    assert choice.compression_factor == 3
    assert choice.warning == ("no compression factor meets min_accuracy 0.95: the most accurate, c=1, had 80.0 % "
                              "at evaluation; answered with the fastest, c=3")
    # equal fastest times: the more accurate of them
    assert choose(_frontier((1, 0.8, 30.0), (2, 0.6, 10.0), (3, 0.5, 10.0)), latency_budget_ms=1).compression_factor == 2


@pytest.mark.parametrize("kwargs, words", [
    ({}, "exactly one of latency_budget_ms and min_accuracy, got neither"),
    ({"latency_budget_ms": 50, "min_accuracy": 0.5}, "exactly one of latency_budget_ms and min_accuracy, got both"),
    ({"latency_budget_ms": 0}, "latency_budget_ms: must be a number of milliseconds > 0, got 0"),
    ({"latency_budget_ms": -5.0}, "latency_budget_ms: must be a number of milliseconds > 0, got -5.0"),
    ({"latency_budget_ms": math.nan}, "latency_budget_ms: must be"),
    ({"latency_budget_ms": math.inf}, "latency_budget_ms: must be"),
    ({"min_accuracy": -0.1}, r"min_accuracy: a fraction from 0 to 1 \(0.6 for 60 %\), got -0.1"),
    ({"min_accuracy": 60}, "min_accuracy: a fraction from 0 to 1"),
])
def test_a_budget_that_means_nothing_is_refused(kwargs, words):
    from colar_core.frontier import choose

    with pytest.raises(ValueError, match=words):
        choose(_frontier((1, 0.8, 30.0), (2, 0.7, 20.0)), **kwargs)


def test_a_factor_asked_for_by_name_says_so_with_its_numbers_when_measured():
    from colar_core.frontier import given

    frontier = _frontier((1, 0.80, 30.0), (2, 0.70, 20.0))
    choice = given(frontier, 2)
    assert choice.compression_factor == 2 and choice.warning == ""
    assert choice.reason.startswith("compression_factor 2 as asked (c=2: accuracy 70.0 %")
    assert given(frontier, 3).reason == "compression_factor 3 as asked (not measured at evaluation)"
    assert given(None, 3).reason == "compression_factor 3 as asked"
    assert given(None, 2, default=True).reason == ("compression_factor 2 (the default: no compression_factor, "
                                                   "latency_budget_ms or min_accuracy given)")
