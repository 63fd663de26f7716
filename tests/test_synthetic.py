"""The built-in synthetic task: deterministic, distinct, valid, truly chained, difficulty-aware."""
import re
from collections import Counter

import pytest

from colar_core.data import builtin_splits, generate_problems, validate_record

_EQ = re.compile(r"^(\d+)([-+*/])(\d+)=(\d+)$")


def test_generation_is_deterministic_per_seed():
    a = generate_problems(300, seed=3, difficulty="medium")
    assert a == generate_problems(300, seed=3, difficulty="medium")
    assert a != generate_problems(300, seed=4, difficulty="medium")
    assert generate_problems(50, seed=3, difficulty="medium") == a[:50]  # a prefix of the stream


@pytest.mark.parametrize("difficulty", ["easy", "medium", "hard", 1, 5])
def test_every_record_passes_reader_validation_and_is_a_chain(difficulty):
    for r in generate_problems(500, seed=1, difficulty=difficulty):
        assert validate_record(r.id, r.question, list(r.steps), r.answer, "synthetic", None) == r
        previous = None
        for step in r.steps:
            m = _EQ.match(step)
            assert m, step  # exact "a*b=c" form, no spaces, integers only
            a, b, c = int(m[1]), int(m[3]), int(m[4])
            if previous is not None:
                assert a == previous, f"step {step} does not use the previous result in {r.steps}"
            assert 0 <= c <= 999 and a <= 999 and b <= 999
            previous = c
        assert r.answer == str(previous)
        if len(r.steps) >= 2:
            assert any(op in s for s in r.steps for op in "*/"), r.steps


def test_difficulty_sets_step_counts_and_number_ranges():
    easy = generate_problems(1000, seed=0, difficulty="easy")
    hard = generate_problems(1000, seed=0, difficulty="hard")
    easy_counts = Counter(len(r.steps) for r in easy)
    hard_counts = Counter(len(r.steps) for r in hard)
    assert set(easy_counts) == {2, 3} and easy_counts[3] > easy_counts[2]
    assert set(hard_counts) == {3, 4, 5, 6}
    def numbers(recs):
        return [int(n) for r in recs for s in r.steps for n in re.findall(r"\d+", s)]

    assert max(numbers(easy)) <= 200 and max(numbers(hard)) > 500
    assert {len(r.steps) for r in generate_problems(300, seed=0, difficulty=4)} <= {2, 3, 4}
    with pytest.raises(ValueError):
        generate_problems(1, seed=0, difficulty="impossible")


def test_builtin_splits_have_no_duplicate_questions_and_stable_eval_sets():
    splits = builtin_splits(2000, 200, 200, seed=7)
    assert {k: len(v) for k, v in splits.items()} == {"train": 2000, "val": 200, "test": 200}
    questions = [r.question for split in splits.values() for r in split]
    assert len(questions) == len(set(questions))
    assert splits["train"][0].id == "train-0" and splits["test"][5].id == "test-5"
    bigger = builtin_splits(3000, 200, 200, seed=7)
    assert bigger["test"] == splits["test"] and bigger["val"] == splits["val"]
    assert builtin_splits(2000, 200, 200, seed=7) == splits


def test_questions_are_diverse():
    easy = generate_problems(10_000, seed=0, difficulty="easy")  # raises if it cannot find 10k distinct
    assert len({r.question for r in easy}) == 10_000
    names = Counter(r.question.split()[0] for r in easy)
    assert len(names) >= 20
    hard = generate_problems(30_000, seed=0, difficulty="hard")
    assert len({r.question for r in hard}) == 30_000
