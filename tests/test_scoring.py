"""The paper's answer check and the seed statistics."""

import math

import pytest

from colar_core.scoring import accuracy, answers_match, extract_answer, mean_ci95


@pytest.mark.parametrize("text,expected", [
    ("Answer:18", "18"), ("Answer: 1,200.\n", "1200"), ("x###Answer:3.5", "3.5"), ("no answer", None),
    ("Answer:1 Answer:2", "2"),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_answers_compare_as_floats_when_both_parse_else_as_strings():
    assert answers_match("18.0", "18") and answers_match("1,000", "1000")
    assert not answers_match("17", "18") and not answers_match(None, "18")
    assert answers_match("abc", "abc") and not answers_match("abc", "abd")


def test_accuracy_and_length_check():
    assert accuracy(["1", "2", None, "4"], ["1", "2", "3", "5"]) == 0.5
    with pytest.raises(ValueError):
        accuracy(["1"], ["1", "2"])


def test_mean_ci95_uses_sample_std():
    m, half = mean_ci95([0.4, 0.5, 0.6])
    assert m == pytest.approx(0.5)
    assert half == pytest.approx(1.96 * 0.1 / math.sqrt(3))
    assert mean_ci95([0.7]) == (0.7, 0.0)
