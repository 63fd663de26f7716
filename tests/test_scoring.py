"""The paper's answer check and the seed statistics."""

import math

import pytest

from colar_core.scoring import accuracy, answers_match, extract_answer, mean_ci95


@pytest.mark.parametrize("text,expected", [
    ("Answer:18", "18"), ("Answer: 1,200.\n", " 1,200.\n"), ("x###Answer:3.5", "3.5"),
    ("no answer", "no answer"),  # no 'Answer:': the whole output is scored (reference)
    ("Answer:1 Answer:2", "1 "),  # several: the text after the first, up to the next (split(...)[1])
    ("18", "18"), ("", ""),
])
def test_extract_answer_as_the_reference(text, expected):
    assert extract_answer(text) == expected


def test_answers_compare_as_floats_when_both_parse_else_as_strings():
    assert answers_match("18.0", "18") and answers_match("1,000", "1000")
    assert not answers_match("17", "18") and not answers_match(None, "18")
    assert answers_match("abc", "abc") and not answers_match("abc", "abd")


def _reference_verify(gt_answer: str, pred_answer: str) -> float:
    """The reference's verify_answer, written out."""
    gt_answer = gt_answer.strip("\n ").rstrip(".").replace(",", "")
    pred_answer = pred_answer.strip("\n ").rstrip(".").rstrip(".\n").replace(",", "")
    try:
        gt_answer = float(gt_answer)
        pred_answer = float(pred_answer)
    except ValueError:
        pass
    return float(gt_answer == pred_answer)


@pytest.mark.parametrize("output,gold", [
    ("18", "18"), ("Answer:18", "18"), ("Answer: 18.\n", "18"), ("Answer:1,200", "1200"), ("Answer:18\n.", "18"),
    ("Answer:1 Answer:2", "1"), ("Answer:1 Answer:2", "2"), ("x = 3", "3"), ("no answer", "no answer"),
    ("Answer:nan", "nan"), ("Answer:inf", "inf"), ("Answer:abc", "18"), ("Answer:18", "abc"), ("Answer:abc", "abc"),
    ("Answer: abc .", "abc"), ("Answer:5 . .", "5"), ("Answer:1_000", "1000"), ("Answer:\t7", "7"),
    ("Answer:7\t", "7."), ("Answer:3.50", "3.5"), ("", ""), ("Answer:", "0"),
])
def test_scoring_equals_the_references_extract_and_verify(output, gold):
    ref = _reference_verify(gold, output.split("Answer:")[1] if "Answer:" in output else output)
    assert answers_match(extract_answer(output), gold) == bool(ref)


def test_scoring_rules_that_differ_from_the_old_check():
    assert answers_match(extract_answer("18"), "18")  # no 'Answer:' -> whole output
    assert answers_match(extract_answer("Answer:18 Answer:5"), "18")  # the first one counts
    assert not answers_match(extract_answer("Answer:nan"), "nan")  # float('nan') != float('nan'), as the reference
    assert not answers_match(extract_answer("Answer: abc ."), "abc")  # cleaned once: 'abc ' != 'abc'


def test_accuracy_and_length_check():
    assert accuracy(["1", "2", None, "4"], ["1", "2", "3", "5"]) == 0.5
    with pytest.raises(ValueError):
        accuracy(["1"], ["1", "2"])


def test_mean_ci95_uses_sample_std():
    m, half = mean_ci95([0.4, 0.5, 0.6])
    assert m == pytest.approx(0.5)
    assert half == pytest.approx(1.96 * 0.1 / math.sqrt(3))
    assert mean_ci95([0.7]) == (0.7, 0.0)
