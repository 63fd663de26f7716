"""The two intervals of an accuracy (over seeds: the paper's; over questions: the promotion gate's),
the number of questions and the content digest of an evaluation set (issue 22, item 7). No model is
decoded: the sweep's ``generate`` answers from a table."""

from __future__ import annotations

import math

import pytest

from colar_core import evaluation
from colar_core.data.records import Record
from colar_core.evaluation import average_over_sets, eval_set_digest, evaluate_text, for_set
from colar_core.inference import Generation
from colar_core.scoring import mean_ci95, question_ci95

RECORDS = [Record(id=f"q{i}", question=f"What is {i} + 1?", steps=(f"{i}+1={i + 1}",), answer=str(i + 1))
           for i in range(10)]


def _answering(monkeypatch, right: dict[int, set[int]]) -> None:
    """Make the sweep's decoding answer question i right under seed s when i is in ``right[s]``."""
    def generate(model, encoder, questions, mode, compression, gen, seed=0):
        return [Generation(text="", answer=(r.answer if i in right[seed] else "-1"), n_tokens=3)
                for i, r in enumerate(RECORDS[: len(questions)])]

    monkeypatch.setattr(evaluation, "generate", generate)


def test_one_seed_gives_a_binomial_interval_over_questions_where_the_seeds_interval_is_zero(monkeypatch):
    """`eval.seeds: [0]` gave accuracy_ci95 0.0 whatever the number of questions; accuracy_qci95 is the
    binomial normal interval 1.96 sqrt(p(1-p)/(n-1)), and n_questions says how many were asked."""
    _answering(monkeypatch, {0: {0, 1, 2, 3}})
    metrics, _ = evaluate_text(None, None, RECORDS, "cot", [0])
    assert metrics["accuracy/cot"] == pytest.approx(0.4)
    assert metrics["accuracy_ci95/cot"] == 0.0
    assert metrics["accuracy_qci95/cot"] == pytest.approx(1.96 * math.sqrt(0.4 * 0.6 / 9))
    assert metrics["n_questions/cot"] == 10.0
    # fewer questions, wider interval; the same accuracy on 5 questions
    _answering(monkeypatch, {0: {0, 1}})
    small, _ = evaluate_text(None, None, RECORDS[:5], "cot", [0])
    assert small["accuracy/cot"] == pytest.approx(0.4) and small["n_questions/cot"] == 5.0
    assert small["accuracy_qci95/cot"] > metrics["accuracy_qci95/cot"]


def test_several_seeds_cluster_by_question(monkeypatch):
    """Each question's accuracy is averaged over the seeds first; the interval is over questions.
    accuracy_ci95 stays the paper's interval over the per-seed accuracies."""
    right = {0: {0, 1, 2, 3, 4}, 1: {0, 1, 2, 5, 6, 7}}
    _answering(monkeypatch, right)
    metrics, _ = evaluate_text(None, None, RECORDS, "nocot", [0, 1])
    per_question = [sum(i in right[s] for s in (0, 1)) / 2 for i in range(10)]
    mean = sum(per_question) / 10
    sd = math.sqrt(sum((p - mean) ** 2 for p in per_question) / 9)
    assert metrics["accuracy/nocot"] == pytest.approx(0.55) == pytest.approx(mean)
    assert metrics["accuracy_qci95/nocot"] == pytest.approx(1.96 * sd / math.sqrt(10))
    assert metrics["accuracy_ci95/nocot"] == pytest.approx(mean_ci95([0.5, 0.6])[1])


def test_question_interval_edge_cases():
    assert question_ci95([[True]]) == 1.0  # one question: no spread to measure, as wide as accuracy
    assert question_ci95([[True, True, True]]) == 0.0  # all right: a Wald interval is 0
    with pytest.raises(ValueError, match="same questions"):
        question_ci95([[True, False], [True]])
    with pytest.raises(ValueError):
        question_ci95([])


def test_the_set_digest_names_the_questions_and_answers_scored():
    digest = eval_set_digest(RECORDS)
    assert len(digest) == 64 and digest == eval_set_digest(list(reversed(RECORDS)))  # order does not matter
    renamed = [Record(id=f"other-{r.id}", question=r.question, steps=(), answer=r.answer) for r in RECORDS]
    assert eval_set_digest(renamed) == digest  # nor ids or reasoning steps
    assert eval_set_digest(RECORDS[:8]) != digest  # fewer questions: another set
    wrong = [*RECORDS[:-1], Record(id="q9", question=RECORDS[-1].question, steps=(), answer="11.5")]
    assert eval_set_digest(wrong) != digest  # another expected answer: another set


def test_intervals_and_question_counts_have_no_average_and_table1_keeps_its_columns():
    """The new names go through the per-set naming, are not averaged over sets, and Table 1 (and what
    reads it: the plot, the Prefect table, bench/table1.py) reads the paper's interval as before."""
    from tasks.table1 import per_set_values, table1

    block = {"accuracy/c2": 0.5, "accuracy_ci95/c2": 0.01, "mean_latents/c2": 6.0, "sec_per_question/c2": 0.01}
    extra = {"accuracy_qci95/c2": 0.2, "n_questions/c2": 40.0}
    metrics = {**for_set({**block, **extra}, "a"), **for_set({**block, **extra}, "b")}
    assert set(metrics) >= {"accuracy_qci95/a/c2", "n_questions/b/c2"}
    averages = average_over_sets(metrics, ["a", "b"])
    assert set(averages) == {"accuracy/avg/c2", "mean_latents/avg/c2", "sec_per_question/avg/c2"}
    plain = {**for_set(block, "a"), **for_set(block, "b")}
    assert per_set_values({**metrics, **averages}) == per_set_values({**plain, **average_over_sets(plain, ["a", "b"])})
    assert table1({**metrics, **averages}).equals(table1({**plain, **average_over_sets(plain, ["a", "b"])}))
