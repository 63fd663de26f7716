"""Record round-trips, DataError messages, and the equation checker."""
import pickle

import pytest

from colar_core.data import DataError, Record, check_equation, parse_number


def test_record_round_trips_through_dict():
    r = Record(id="a:1", question="Q?", steps=("1+1=2", "2*3=6"), answer="6")
    d = r.to_dict()
    assert d == {"id": "a:1", "question": "Q?", "steps": ["1+1=2", "2*3=6"], "answer": "6"}
    assert Record.from_dict(d) == r
    assert isinstance(Record.from_dict(d).steps, tuple)


def test_data_error_message_names_source_line_and_field():
    err = DataError("data/train.jsonl", 7, "steps[1]", "equation '2+2=5' evaluates to 4, not 5")
    assert str(err) == "data/train.jsonl:7: field 'steps[1]': equation '2+2=5' evaluates to 4, not 5"
    assert (err.source, err.line, err.field) == ("data/train.jsonl", 7, "steps[1]")
    assert isinstance(err, ValueError)
    assert str(DataError("f.txt", None, "answer", "bad")) == "f.txt: field 'answer': bad"
    assert str(pickle.loads(pickle.dumps(err))) == str(err)


@pytest.mark.parametrize("eq", [
    "16-3-4=9", "2/.5=4", "3/4=3/4", "10/3=3.33", "2/3=.67", "100/3=33", "(2+3)*4=20",
    "5*-2=-10", "12*0.10=1.20", "08*2=16", "1.5+3+5.5=10", "9=9",
])
def test_valid_equations_pass(eq):
    check_equation(eq)


@pytest.mark.parametrize("eq, reason", [
    ("2+2=5", "evaluates to 4, not 5"),
    ("990+10=1010", "evaluates to 1000, not 1010"),
    ("1/0=3", "divides by zero"),
    ("2+2", "exactly one '='"),
    ("1=1=1", "exactly one '='"),
    ("a+1=2", "unsupported characters"),
    ("2**3=8", "does not parse"),
    ("=4", "empty expression"),
    ("__import__('os')=1", "unsupported characters"),
])
def test_invalid_equations_fail_with_reason(eq, reason):
    with pytest.raises(ValueError, match=None) as info:
        check_equation(eq)
    assert reason in str(info.value)


def test_parse_number_handles_commas_dots_and_rejects_text():
    assert parse_number("1,450,000") == 1450000
    assert parse_number(" 18. ") == 18
    assert parse_number("-3.5") == -3.5
    assert parse_number(".5") == 0.5
    for bad in ["", "abc", "nan", "inf", "1e5", "$5", "3/4"]:
        assert parse_number(bad) is None, bad
