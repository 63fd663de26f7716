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
