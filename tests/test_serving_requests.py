"""What a served model accepts per request, checked without a server (the HTTP side, status 400 and its
one-line body, is in tests/test_serving.py, slow)."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("params, words", [
    ({"compression_factor": 0}, "compression factors must be >= 1"),
    ({"compression_factor": -5}, "compression factors must be >= 1"),
    ({"compression_factor": 1000}, "above the trained maximum 3"),
    ({"max_latents": 0}, "max_latents: must be >= 1"),
    ({"max_latents": -1}, "max_latents: must be >= 1"),
    ({"seed": "x"}, "are integers"),
])
def test_a_request_outside_the_trained_factors_or_without_latents_is_a_400_with_one_line(params, words):
    """Issue 22 items 13-14: c = -5, 0 or 1000 answered 200; max_latents 0 answered 400 with a pydantic trace."""
    from mlflow.exceptions import MlflowException

    from tasks.pyfunc_model import request_settings

    with pytest.raises(MlflowException, match=words) as err:
        request_settings(params, trained=[1, 2, 3])
    assert err.value.get_http_status_code() == 400 and "\n" not in err.value.message


def test_a_request_within_the_trained_factors_gets_its_settings():
    from tasks.pyfunc_model import request_settings

    c, gen, seed = request_settings({"compression_factor": 3, "max_latents": 5, "seed": 7, "sample": True}, [1, 2, 3])
    assert (c, gen.max_latents, gen.sample_latents, gen.do_sample, seed) == (3, 5, True, True, 7)
    assert request_settings({}, [])[0] == 2  # a model that does not record its factors: any c >= 1
