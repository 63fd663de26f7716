"""Shared test environment and the real MLflow / Prefect servers.

Environment (set when this file is imported, before any test module imports ``prefect``, which
reads its settings at import time):

- telemetry off: ``DO_NOT_TRACK=1``, ``MLFLOW_DISABLE_TELEMETRY=true`` (MLflow ignores
  ``DO_NOT_TRACK=1``; it wants ``true``), ``PREFECT_SERVER_ANALYTICS_ENABLED=false``;
- ``PREFECT_HOME`` and ``COLAR_HOME`` in a temporary directory removed at session end;
- ``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=120`` (the ephemeral server needs ~17 s here);
- ``MLFLOW_TRACKING_URI`` and ``PREFECT_API_URL`` unset: a test never talks to a developer's
  servers by accident (nor with their ``COLAR_DB_URL`` / ``COLAR_BACKEND`` / MLflow credentials).

Servers start lazily, once per session, only when a test asks:

- ``mlflow_server``  -> tracking URI of a real ``mlflow server`` (sqlite in a temp dir). Tests that
  use it (directly or through another fixture) get ``MLFLOW_TRACKING_URI`` set for their duration.
- ``prefect_server`` -> API URL of a real ``prefect server start``, its web UI on (at the URL without
  ``/api``; tests/test_ui_browser.py opens it); ``PREFECT_API_URL`` is set (and Prefect's settings
  refreshed) from then on for the rest of the session.

Both are started by ``colar_infra.servers`` (the code ``colar run`` uses) and stopped at session end.
Add model/data fixtures below the marked line.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

# --------------------------------------------------------------------------------------------
# environment, at import time

_SESSION_TMP = Path(tempfile.mkdtemp(prefix="colar-tests-"))
_TEST_ENV = {
    "DO_NOT_TRACK": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_HOME": str(_SESSION_TMP / "prefect-home"),
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "COLAR_HOME": str(_SESSION_TMP / "colar-home"),
    # Tests never reach a model/dataset hub: only loopback is allowed on these machines.
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}
# A developer's server choices (colar_infra.backends) and MLflow credentials never reach a test's servers.
_UNSET = ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "PREFECT_PROFILE", "COLAR_BACKEND", "COLAR_DB_URL",
          "COLAR_DB_PREFIX", "COLAR_MLFLOW_AUTH", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
          "COLAR_SERVER_HOST", "PREFECT_API_AUTH_STRING", "PREFECT_SERVER_API_AUTH_STRING")

os.environ.update(_TEST_ENV)
for _name in _UNSET:
    os.environ.pop(_name, None)


def _refresh_prefect_settings() -> None:
    """Make an already-imported prefect pick up os.environ changes."""
    context = sys.modules.get("prefect.context")
    if context is not None:
        context.refresh_global_settings_context()


@pytest.fixture(scope="session", autouse=True)
def _test_environment():
    """Re-assert the test environment for the session (a plugin may have changed it)."""
    os.environ.update(_TEST_ENV)
    for name in _UNSET:
        os.environ.pop(name, None)
    _refresh_prefect_settings()
    yield dict(_TEST_ENV)


def pytest_unconfigure(config):
    """Stop servers a test left in the default state dir; remove the temp dir (also after --co)."""
    if (Path(_TEST_ENV["COLAR_HOME"]) / "servers.json").exists():
        from colar_infra.servers import stop_servers

        stop_servers(_TEST_ENV["COLAR_HOME"])
    shutil.rmtree(_SESSION_TMP, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# MLflow


@pytest.fixture(scope="session")
def mlflow_state_dir(tmp_path_factory) -> Path:
    """The session MLflow server's folder (its database and ``mlartifacts/``)."""
    return tmp_path_factory.mktemp("mlflow-server")


@pytest.fixture(scope="session")
def mlflow_server(mlflow_state_dir) -> str:
    """Tracking URI (``http://127.0.0.1:PORT``) of a real MLflow server, one per session."""
    from colar_infra.servers import ensure_mlflow, stop_servers

    state_dir = mlflow_state_dir
    saved = os.environ.pop("MLFLOW_TRACKING_URI", None)  # ensure_mlflow would defer to it
    try:
        uri = ensure_mlflow(state_dir)
    finally:
        if saved is not None:
            os.environ["MLFLOW_TRACKING_URI"] = saved
    yield uri
    stop_servers(state_dir)


def _torch_threads(n: int):
    """Run with ``torch.set_num_threads(n)``, restored afterwards. Tiny models gain nothing from
    intra-op threads, and on a busy 2-core runner two spinning threads made steps ~10x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(autouse=True, scope="module")
def _one_thread_modules(request):
    """A test module marked ``pytestmark = pytest.mark.one_torch_thread`` runs all of its tests, and its
    module-scoped fixtures, on one torch thread (module scope: set up before those fixtures). For a
    single test use :func:`one_thread`."""
    if request.node.get_closest_marker("one_torch_thread") is not None:
        yield from _torch_threads(1)
    else:
        yield


@pytest.fixture
def one_thread():
    """One torch thread for a single test."""
    yield from _torch_threads(1)


@pytest.fixture(autouse=True)
def _mlflow_tracking_env(request, monkeypatch):
    """``MLFLOW_TRACKING_URI`` = the session server for tests that use ``mlflow_server``, unset
    otherwise; afterwards end a leftover active run and clear ``mlflow.set_tracking_uri``."""
    if "mlflow_server" in request.fixturenames:
        uri = request.getfixturevalue("mlflow_server")
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    else:
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield
    mlflow = sys.modules.get("mlflow")
    if mlflow is not None:
        try:
            while mlflow.active_run() is not None:
                mlflow.end_run()
        except Exception:  # noqa: BLE001 - server gone: nothing to end
            pass
        mlflow.set_tracking_uri(None)


# --------------------------------------------------------------------------------------------
# Prefect


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory) -> str:
    """API URL (``http://127.0.0.1:PORT/api``) of a real Prefect server, one per session, started as
    ``colar run`` starts it (:func:`~colar_infra.servers.ensure_prefect`): its UI at the URL without
    ``/api``, talking to this port (``PREFECT_UI_API_URL``).

    From the first test that uses it, ``PREFECT_API_URL`` points at it for the rest of the session
    (Prefect's global settings are refreshed so already-imported prefect sees it).
    """
    from colar_infra.servers import ensure_prefect, stop_servers

    state_dir = tmp_path_factory.mktemp("prefect-server")
    os.environ.pop("PREFECT_API_URL", None)
    url = ensure_prefect(state_dir)
    os.environ["PREFECT_API_URL"] = url
    _refresh_prefect_settings()
    yield url
    # Send the logs Prefect still holds while the server is up; otherwise its log worker retries
    # the dead server for about a minute at interpreter exit.
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()
    os.environ.pop("PREFECT_API_URL", None)
    _refresh_prefect_settings()
    stop_servers(state_dir)


# --------------------------------------------------------------------------------------------
# fault injection


@pytest.fixture
def fail_stage_once(monkeypatch):
    """``fail_stage_once("sft-colar", 3)``: the first run of that training stage raises at step 3;
    later runs (a Prefect retry, ``colar retry``) go through.

    It wraps ``tasks.training.training_callbacks``, which builds every training stage's
    callback list; Prefect runs tasks in threads of this process, so the patch reaches them.
    """
    from tasks import training
    from tests.helpers import CrashAt

    def arm(stage: str, step: int) -> None:
        build, armed = training.training_callbacks, []

        def with_crash(name: str, *args, **kwargs) -> list:
            callbacks = build(name, *args, **kwargs)
            if name == stage and not armed:
                armed.append(name)
                callbacks.append(CrashAt(step))
            return callbacks

        monkeypatch.setattr(training, "training_callbacks", with_crash)

    return arm


@pytest.fixture
def at_training_step(monkeypatch):
    """``at_training_step("sft-colar", 3, action)``: in the first run of that training stage, call
    ``action(callbacks)`` at step 3 (``callbacks``: the stage's callback list, the MLflow metrics
    callback first). Later runs of the stage are left alone. Same hook as :func:`fail_stage_once`."""
    from tasks import training
    from tests.helpers import AtStep

    def arm(stage: str, step: int, action) -> None:
        build, armed = training.training_callbacks, []

        def with_action(name: str, *args, **kwargs) -> list:
            callbacks = build(name, *args, **kwargs)
            if name == stage and not armed:
                armed.append(name)
                callbacks.append(AtStep(step, lambda: action(callbacks)))
            return callbacks

        monkeypatch.setattr(training, "training_callbacks", with_action)

    return arm


@pytest.fixture
def fail_once(monkeypatch):
    """``fail_once(module, "name", exc)``: the first call of ``module.name`` raises ``exc``; later calls
    (a Prefect retry of the task that made it) go through. Returns the list of calls made."""

    def arm(module, name: str, exc: BaseException) -> list:
        real, calls = getattr(module, name), []

        def once(*args, **kwargs):
            calls.append(args)
            if len(calls) == 1:
                raise exc
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, once)
        return calls

    return arm


# --------------------------------------------------------------------------------------------
# add model / data fixtures below
