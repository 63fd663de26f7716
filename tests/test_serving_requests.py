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

    choice, gen, seed = request_settings({"compression_factor": 3, "max_latents": 5, "seed": 7, "sample": True},
                                         [1, 2, 3])
    assert (choice.compression_factor, gen.max_latents, gen.sample_latents, gen.do_sample, seed) == (3, 5, True, True, 7)
    assert request_settings({}, [])[0].compression_factor == 2  # a model that does not record its factors: any c >= 1


# --------------------------------------------------------------------------------------------
# Issue 22, item 15: the caps on one request, the request's deadline, and SIGTERM.


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A tiny untrained model folder (it never stops on its own: every row runs to max_latents)."""
    import torch

    from bench.tiny import tiny_model, tiny_tokenizer

    torch.manual_seed(0)
    tok = tiny_tokenizer()
    model = tiny_model(tok)
    model.state.trained_compression_factors = [1, 2, 3]
    folder = tmp_path_factory.mktemp("pyfunc") / "model"
    model.save_pretrained(folder, tok)
    return str(folder)


def _loaded(folder: str, model_config: dict | None = None):
    from types import SimpleNamespace

    from tasks.pyfunc_model import ColarPyfunc

    pyfunc = ColarPyfunc()
    pyfunc.load_context(SimpleNamespace(artifacts={"colar_model": folder}, model_config=model_config or {}))
    return pyfunc


def _questions(n: int) -> list[str]:
    from bench.tiny import PROBLEMS

    return [PROBLEMS[i % len(PROBLEMS)].question for i in range(n)]


def test_a_request_above_the_servers_caps_is_a_400_naming_the_cap(tiny_model_dir, monkeypatch, one_thread):
    """max_latents=10000000 (or an enormous batch) used to run for as long as it took; the caps are the
    loader's (model_config, else COLAR_SERVE_MAX_LATENTS / COLAR_SERVE_MAX_ROWS, else 1024 each)."""
    import pandas as pd
    from mlflow.exceptions import MlflowException

    from tasks.pyfunc_model import request_settings

    monkeypatch.delenv("COLAR_SERVE_MAX_LATENTS", raising=False)
    monkeypatch.delenv("COLAR_SERVE_MAX_ROWS", raising=False)
    assert _loaded(tiny_model_dir).limits == {"serve_max_latents": 1024, "serve_max_rows": 1024}
    with pytest.raises(MlflowException, match=r"^max_latents: at most 1024 on this server .*got 10000000$") as err:
        request_settings({"max_latents": 10_000_000}, [1, 2, 3], max_latents_cap=1024)
    assert err.value.get_http_status_code() == 400 and "\n" not in err.value.message

    pyfunc = _loaded(tiny_model_dir, {"serve_max_latents": 5, "serve_max_rows": 2})
    with pytest.raises(MlflowException, match=r"max_latents: at most 5 on this server .*got 6") as err:
        pyfunc.predict(None, pd.DataFrame({"question": _questions(1)}), params={"max_latents": 6})
    assert err.value.get_http_status_code() == 400
    with pytest.raises(MlflowException, match=r"questions: at most 2 rows per request .*got 3") as err:
        pyfunc.predict(None, pd.DataFrame({"question": _questions(3)}), params={"max_latents": 2})
    assert err.value.get_http_status_code() == 400 and "\n" not in err.value.message
    out = pyfunc.predict(None, pd.DataFrame({"question": _questions(2)}), params={"max_latents": 5})
    assert out["n_latents"].tolist() == [5, 5]  # at the caps: answered

    # the environment sets them for `mlflow models serve`; the loader's model_config wins over it
    monkeypatch.setenv("COLAR_SERVE_MAX_LATENTS", "7")
    monkeypatch.setenv("COLAR_SERVE_MAX_ROWS", "3")
    assert _loaded(tiny_model_dir).limits == {"serve_max_latents": 7, "serve_max_rows": 3}
    assert _loaded(tiny_model_dir, {"serve_max_rows": 9}).limits == {"serve_max_latents": 7, "serve_max_rows": 9}


@pytest.mark.parametrize("env, config, words", [
    ({"COLAR_SERVE_MAX_ROWS": "0"}, {}, "COLAR_SERVE_MAX_ROWS: must be a whole number >= 1, got '0'"),
    ({"COLAR_SERVE_MAX_LATENTS": "lots"}, {}, "COLAR_SERVE_MAX_LATENTS: must be a whole number >= 1, got 'lots'"),
    ({}, {"serve_max_latents": 2.5}, "model_config serve_max_latents: must be a whole number >= 1, got 2.5"),
    ({}, {"serve_max_rows": True}, "model_config serve_max_rows: must be a whole number >= 1, got True"),
])
def test_a_bad_cap_stops_the_model_from_loading_with_where_it_came_from(env, config, words, monkeypatch):
    from tasks.pyfunc_model import serving_limits

    for name in ("COLAR_SERVE_MAX_LATENTS", "COLAR_SERVE_MAX_ROWS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=words.replace(".", r"\.")):
        serving_limits(config)


def test_a_served_request_stops_its_generation_at_the_servers_timeout(tiny_model_dir, monkeypatch, one_thread):
    """The scoring server answers 504 after MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT seconds but cannot stop
    the thread that predicts: the generation used to run on to max_latents (a core and memory for as long
    as that took). Now it stops within one step of that timeout; outside a scoring server no deadline applies."""
    import time

    import pandas as pd
    from mlflow.exceptions import MlflowException

    import tasks.pyfunc_model as pyfunc_model

    monkeypatch.delenv(pyfunc_model.SCORING_SERVER_MARK, raising=False)
    assert _loaded(tiny_model_dir).timeout_s is None
    monkeypatch.setenv(pyfunc_model.SCORING_SERVER_MARK, tiny_model_dir)  # as `mlflow models serve` sets it
    monkeypatch.setenv("MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT", "7")
    pyfunc = _loaded(tiny_model_dir)
    assert pyfunc.timeout_s == 7.0

    pyfunc.timeout_s = 0.3  # 1024 latents take ~2 s on this model
    started = time.monotonic()
    with pytest.raises(MlflowException, match=r"^stopped: the request ran past the server's request timeout of 0.3 s"
                       ) as err:
        pyfunc.predict(None, pd.DataFrame({"question": _questions(1)}), params={"max_latents": 1024})
    took = time.monotonic() - started
    assert err.value.get_http_status_code() == 504
    assert took < 0.3 + 1.0, f"stopped {took:.2f} s after it started"


def test_a_request_in_progress_stops_when_the_server_is_shutting_down(tiny_model_dir, monkeypatch, one_thread):
    import threading

    import pandas as pd
    from mlflow.exceptions import MlflowException

    import tasks.pyfunc_model as pyfunc_model

    stopping = threading.Event()
    monkeypatch.setattr(pyfunc_model, "server_shutting_down", stopping.is_set)
    pyfunc = _loaded(tiny_model_dir)
    threading.Timer(0.2, stopping.set).start()
    with pytest.raises(MlflowException, match="stopped: the server is shutting down") as err:
        pyfunc.predict(None, pd.DataFrame({"question": _questions(1)}), params={"max_latents": 1024})
    assert err.value.get_http_status_code() == 503


def test_the_server_is_shutting_down_once_uvicorn_handled_sigterm():
    """What uvicorn's SIGTERM / SIGINT handler does (its Server.handle_exit sets should_exit) is seen from
    the thread that predicts; any other handler (no server, or not uvicorn's) is not a shutdown."""
    import signal
    import threading

    import uvicorn

    from tasks.pyfunc_model import server_shutting_down

    saved = signal.getsignal(signal.SIGTERM)
    server = uvicorn.Server(uvicorn.Config(app=None))
    try:
        assert not server_shutting_down()
        signal.signal(signal.SIGTERM, server.handle_exit)  # as uvicorn's Server.capture_signals does
        assert not server_shutting_down()
        server.handle_exit(signal.SIGTERM, None)
        seen: list[bool] = []
        thread = threading.Thread(target=lambda: seen.append(server_shutting_down()))
        thread.start()
        thread.join()
        assert server.should_exit and seen == [True]
        signal.signal(signal.SIGTERM, lambda signum, frame: None)
        assert not server_shutting_down()
    finally:
        signal.signal(signal.SIGTERM, saved)


# --------------------------------------------------------------------------------------------
# Issue 26, item 4: a latency budget or a minimum accuracy chooses the factor from the model's frontier.


def _frontier():
    """c=1: 80 %, 30 ms; c=2: 70 %, 20 ms; c=3: 50 %, 10 ms per question at evaluation."""
    from colar_core.frontier import Frontier, FrontierPoint

    return Frontier(set_name="test", points=tuple(
        FrontierPoint(compression_factor=c, accuracy=acc, accuracy_qci95=0.05, mean_latents=12.0 / c,
                      ms_per_question=ms, n_questions=40) for c, acc, ms in ((1, 0.8, 30.0), (2, 0.7, 20.0),
                                                                             (3, 0.5, 10.0))))


#: What MLflow hands predict for the params a request left out (the signature's defaults).
NOT_GIVEN = {"compression_factor": None, "latency_budget_ms": None, "min_accuracy": None, "seed": 0,
             "max_latents": 64, "sample": False}


@pytest.mark.parametrize("params, c, warned", [
    ({"latency_budget_ms": 25}, 2, False),
    ({"latency_budget_ms": 1000.0}, 1, False),
    ({"min_accuracy": 0.75}, 1, False),
    ({"min_accuracy": 0.5}, 3, False),
    ({"latency_budget_ms": 1}, 3, True),
    ({"min_accuracy": 0.99}, 3, True),
    ({"compression_factor": 1}, 1, False),
    ({}, 2, False),
])
def test_a_budget_chooses_the_factor_from_the_frontier(params, c, warned):
    from tasks.pyfunc_model import request_settings

    choice, _, _ = request_settings({**NOT_GIVEN, **params}, [1, 2, 3], frontier=_frontier())
    assert choice.compression_factor == c and bool(choice.warning) == warned, choice
    assert choice.reason.startswith(next(iter(params), "compression_factor 2 (the default"))


@pytest.mark.parametrize("params, words", [
    ({"latency_budget_ms": 50, "min_accuracy": 0.5}, "latency_budget_ms and min_accuracy: give at most one of"),
    ({"compression_factor": 2, "latency_budget_ms": 50}, "compression_factor and latency_budget_ms: give at most one"),
    ({"compression_factor": 2, "min_accuracy": 0.5}, "compression_factor and min_accuracy: give at most one"),
    ({"latency_budget_ms": 0}, "latency_budget_ms: must be a number of milliseconds > 0, got 0"),
    ({"latency_budget_ms": -3}, "latency_budget_ms: must be a number of milliseconds > 0, got -3"),
    ({"min_accuracy": 1.5}, "min_accuracy: a fraction from 0 to 1"),
    ({"latency_budget_ms": "fast"}, "latency_budget_ms: a number, got 'fast'"),
    ({"compression_factor": 2.5}, "compression_factor: compression_factor, max_latents and seed are integers"),
])
def test_a_budget_request_that_means_nothing_is_a_400_with_one_line(params, words):
    from mlflow.exceptions import MlflowException

    from tasks.pyfunc_model import request_settings

    with pytest.raises(MlflowException, match=words) as err:
        request_settings({**NOT_GIVEN, **params}, [1, 2, 3], frontier=_frontier())
    assert err.value.get_http_status_code() == 400 and "\n" not in err.value.message


def test_a_model_without_a_frontier_refuses_a_budget_and_serves_a_factor():
    """A model logged before issue 26 (or with no timed factor) has no frontier to choose from."""
    from mlflow.exceptions import MlflowException

    from tasks.pyfunc_model import request_settings

    for params in ({"latency_budget_ms": 50}, {"min_accuracy": 0.5}):
        with pytest.raises(MlflowException, match=rf"^{next(iter(params))}: this model was logged without a "
                           "frontier .* give compression_factor instead$") as err:
            request_settings({**NOT_GIVEN, **params}, [1, 2, 3])
        assert err.value.get_http_status_code() == 400
    choice, _, _ = request_settings({**NOT_GIVEN, "compression_factor": 3}, [1, 2, 3])
    assert (choice.compression_factor, choice.reason, choice.warning) == (3, "compression_factor 3 as asked", "")


def test_a_chosen_factor_beyond_the_trained_ones_is_refused():
    """A frontier is measured on the model it is logged with; one that names a factor above the trained
    maximum (a hand-made file) still cannot make the model run it."""
    from mlflow.exceptions import MlflowException

    from tasks.pyfunc_model import request_settings

    with pytest.raises(MlflowException, match="above the trained maximum 2") as err:
        request_settings({"latency_budget_ms": 15}, [1, 2], frontier=_frontier())
    assert err.value.get_http_status_code() == 400


def test_each_answer_says_which_factor_it_used_and_why(tiny_model_dir, tmp_path, one_thread):
    """predict's rows carry compression_factor, why and warning; the frontier comes from the model's
    artifact ``frontier`` (a missing artifact: no frontier; a broken file: the model does not load)."""
    from types import SimpleNamespace

    import pandas as pd

    from tasks.pyfunc_model import ColarPyfunc

    path = tmp_path / "frontier.json"
    path.write_text(_frontier().to_json())
    pyfunc = ColarPyfunc()
    pyfunc.load_context(SimpleNamespace(artifacts={"colar_model": tiny_model_dir, "frontier": str(path)},
                                        model_config={}))
    assert pyfunc.frontier == _frontier()
    out = pyfunc.predict(None, pd.DataFrame({"question": _questions(2)}),
                         params={**NOT_GIVEN, "latency_budget_ms": 25, "max_latents": 2})
    assert list(out.columns) == ["answer", "n_latents", "text", "compression_factor", "why", "warning"]
    assert out["compression_factor"].tolist() == [2, 2] and out["warning"].tolist() == ["", ""]
    assert out["why"][0].startswith("latency_budget_ms 25: the most accurate of the 2 of 3 factors")
    out = pyfunc.predict(None, pd.DataFrame({"question": _questions(1)}),
                         params={**NOT_GIVEN, "latency_budget_ms": 1, "max_latents": 2})
    assert out["compression_factor"].tolist() == [3] and out["warning"][0].startswith(
        "no compression factor meets latency_budget_ms 1")

    assert _loaded(tiny_model_dir).frontier is None
    path.write_text('{"format": 1, "points": []}')
    with pytest.raises(ValueError):
        pyfunc.load_context(SimpleNamespace(artifacts={"colar_model": tiny_model_dir, "frontier": str(path)},
                                            model_config={}))
