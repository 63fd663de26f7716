"""Where the local servers bind (issue 23, item 2), without starting one: 127.0.0.1 unless asked
(``--host`` / ``$COLAR_SERVER_HOST``); an address that is not loopback only with MLflow basic auth and a
Prefect API auth string, else refused before anything starts, in one line naming what is missing.

The servers on a non-loopback address, with requests refused without credentials, and the listening
sockets: tests/test_cluster.py (slow, three hosts in network namespaces).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from colar_infra import servers
from colar_infra.backends import ServerSettings, bind_problems, is_loopback
from colar_infra.secrets import mask_secrets
from flows import cli

AUTH = "colar-bind-test-auth-string"
ADDRESS = "10.213.254.1"  # never bound here: every case is refused before a server starts


@pytest.fixture
def home(tmp_path, monkeypatch):
    """An empty colar home, no server variables and no credentials; a server start fails the test at once
    (nothing here may start one)."""
    path = tmp_path / "home"
    monkeypatch.setenv("COLAR_HOME", str(path))
    for var in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                "PREFECT_API_AUTH_STRING", "PREFECT_SERVER_API_AUTH_STRING", "COLAR_SERVER_HOST",
                "COLAR_MLFLOW_AUTH", "COLAR_BACKEND", "COLAR_DB_URL"):
        monkeypatch.delenv(var, raising=False)

    def no_start(server, *args, **kwargs):
        raise AssertionError(f"the {server.name} server was started, bound to {server.host}")

    monkeypatch.setattr(servers, "_start", no_start)
    return path


def _nothing_started(home: Path) -> None:
    assert not (home / "servers.json").exists()
    assert not list(home.glob("*.log")) if home.exists() else True


def _refused(capsys, argv: list[str]) -> str:
    rc = cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == cli.EXIT_CONFIG, err
    assert len(err.splitlines()) == 1, err
    assert f"refusing to bind the servers to {argv[argv.index('--host') + 1] if '--host' in argv else ADDRESS}" in err
    return err


def test_a_non_loopback_host_without_authentication_is_refused_naming_all_that_is_missing(home, capsys):
    err = _refused(capsys, ["servers", "start", "--host", ADDRESS])
    assert "colar servers: " in err and "(not loopback)" in err
    assert "--mlflow-auth basic-auth" in err and "$COLAR_MLFLOW_AUTH=basic-auth" in err
    assert "$MLFLOW_TRACKING_USERNAME and $MLFLOW_TRACKING_PASSWORD" in err
    assert "$PREFECT_API_AUTH_STRING" in err
    _nothing_started(home)


def test_every_interface_counts_as_not_loopback(home, capsys):
    assert "$PREFECT_API_AUTH_STRING" in _refused(capsys, ["servers", "start", "--host", "0.0.0.0"])
    _nothing_started(home)


def test_mlflow_auth_alone_is_not_enough(home, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "pw-for-bind-test")
    err = _refused(capsys, ["servers", "start", "--host", ADDRESS, "--mlflow-auth", "basic-auth"])
    assert err.endswith("missing: $PREFECT_API_AUTH_STRING (Prefect's API auth string)")
    _nothing_started(home)


def test_the_prefect_auth_string_alone_is_not_enough(home, capsys, monkeypatch):
    monkeypatch.setenv("PREFECT_API_AUTH_STRING", AUTH)
    err = _refused(capsys, ["servers", "start", "--host", ADDRESS])
    assert "MLflow basic auth" in err and "PREFECT_API_AUTH_STRING" not in err
    assert AUTH not in err
    _nothing_started(home)


def test_colar_run_is_refused_the_same_way_through_the_variable(home, capsys, monkeypatch):
    """``$COLAR_SERVER_HOST`` is the flag's variable; ``colar run`` refuses before any server or stage starts."""
    monkeypatch.setenv("COLAR_SERVER_HOST", ADDRESS)
    monkeypatch.setenv("COLAR_MLFLOW_AUTH", "basic-auth")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "pw-for-bind-test")
    started = time.monotonic()
    err = _refused(capsys, ["run", "--set", "name=bind-refused"])
    assert err.startswith("colar run: ") and "$PREFECT_API_AUTH_STRING" in err
    assert time.monotonic() - started < 30
    _nothing_started(home)


def test_with_both_authentications_nothing_is_missing(home, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "pw-for-bind-test")
    monkeypatch.setenv("PREFECT_API_AUTH_STRING", AUTH)
    assert bind_problems(ServerSettings(host=ADDRESS, mlflow_auth="basic-auth")) == []
    monkeypatch.delenv("PREFECT_API_AUTH_STRING")
    monkeypatch.setenv("PREFECT_SERVER_API_AUTH_STRING", AUTH)  # Prefect's own server variable counts too
    assert bind_problems(ServerSettings(host=ADDRESS, mlflow_auth="basic-auth")) == []


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "localhost"])
def test_loopback_needs_no_authentication(home, host):
    assert is_loopback(host)
    assert bind_problems(ServerSettings(host=host)) == []


def test_the_default_is_loopback_and_other_names_are_not(home):
    assert ServerSettings.from_env().effective_host == "127.0.0.1"
    assert bind_problems(ServerSettings()) == []
    assert not is_loopback("db.internal") and not is_loopback("0.0.0.0") and not is_loopback(ADDRESS)


@pytest.mark.parametrize("bad", ["::1", "a b", "http://10.0.0.1", "10.0.0.1:5000"])
def test_a_host_that_is_no_ipv4_address_or_name_is_a_config_error_naming_the_flag(home, capsys, bad):
    assert cli.main(["servers", "start", "--host", bad]) == cli.EXIT_CONFIG
    err = capsys.readouterr().err
    assert "host (--host / $COLAR_SERVER_HOST)" in err, err
    _nothing_started(home)


def test_a_running_server_bound_elsewhere_is_refused_when_a_host_is_asked_and_reused_when_not(
        home, monkeypatch):
    """A host asked for that differs from the running server's: refused, the server left alone (other
    pipelines may use it). No host asked: the running server is reused wherever it is bound."""
    home.mkdir(mode=0o700)
    rec = {"pid": os.getpid(), "pgid": os.getpgid(0), "host": ADDRESS, "port": 5999,
           "base_url": f"http://{ADDRESS}:5999", "url": f"http://{ADDRESS}:5999", "auth": "none",
           "backend": "sqlite", "artifacts_destination": str(home.resolve() / "mlartifacts")}
    (home / "servers.json").write_text(json.dumps({"mlflow": rec}))
    monkeypatch.setattr(servers, "_recorded_alive", lambda r: True)
    monkeypatch.setattr(servers, "_wait_healthy", lambda *a, **k: True)
    stopped = []
    monkeypatch.setattr(servers, "_stop_group", lambda *a, **k: stopped.append(a))
    with pytest.raises(servers.ServerError, match=rf"bound to {ADDRESS}; this command asks for host 127\.0\.0\.2"):
        servers.ensure_mlflow(settings=ServerSettings(host="127.0.0.2"))
    assert servers.ensure_mlflow(settings=ServerSettings()) == rec["url"]
    assert stopped == []


def test_the_prefect_server_gets_the_auth_string_in_its_environment_only(home, monkeypatch):
    monkeypatch.setenv("PREFECT_API_AUTH_STRING", AUTH)
    server = servers._Prefect(home, ADDRESS, ServerSettings(host=ADDRESS))
    env, cmd = server.env(4321), server.command(4321)
    assert env["PREFECT_SERVER_API_AUTH_STRING"] == AUTH and env["PREFECT_API_AUTH_STRING"] == AUTH
    assert AUTH not in " ".join(cmd) and "--host" in cmd and ADDRESS in cmd
    assert server.identity()["auth"] == "auth-string"
    assert env["PREFECT_SERVER_UI_API_URL"] == f"http://{ADDRESS}:4321/api"
    monkeypatch.setenv("PREFECT_SERVER_API_AUTH_STRING", AUTH + "-server")  # Prefect's own wins for the server
    assert server.env(4321)["PREFECT_SERVER_API_AUTH_STRING"] == AUTH + "-server"


def test_the_prefect_auth_string_is_masked_like_a_password(monkeypatch):
    monkeypatch.setenv("PREFECT_API_AUTH_STRING", AUTH)
    assert AUTH not in mask_secrets(f"log line with {AUTH} in it")
    assert mask_secrets(AUTH) == "***"


@pytest.fixture
def prefect_stub():
    """An HTTP server on 127.0.0.1 that answers ``/api/admin/version`` as a Prefect server started with
    the auth string :data:`AUTH` does: 200 with ``Authorization: Basic base64(AUTH)``, else 401."""
    import base64
    import http.server
    import threading

    expected = "Basic " + base64.b64encode(AUTH.encode()).decode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the http.server API
            ok = self.path == "/api/admin/version" and self.headers.get("Authorization") == expected
            self.send_response(200 if ok else 401)
            self.end_headers()
            self.wfile.write(b'"3.8.8"' if ok else b'{"exception_message": "Unauthorized"}')

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/api"
    server.shutdown()
    server.server_close()


def test_a_prefect_server_with_an_auth_string_is_checked_against_the_clients(prefect_stub, monkeypatch):
    """After a start or reuse of a Prefect server that requires an auth string: a client without one, or
    with another, is stopped with a message naming the variable (never the string)."""
    monkeypatch.delenv("PREFECT_API_AUTH_STRING", raising=False)
    with pytest.raises(servers.ServerError, match=r"asks for an API auth string: set \$PREFECT_API_AUTH_STRING"):
        servers._check_prefect_auth(prefect_stub)
    monkeypatch.setenv("PREFECT_API_AUTH_STRING", AUTH + "-other")
    with pytest.raises(servers.ServerError, match=r"refuses \$PREFECT_API_AUTH_STRING \(HTTP 401\)") as err:
        servers._check_prefect_auth(prefect_stub)
    assert AUTH not in str(err.value)
    monkeypatch.setenv("PREFECT_API_AUTH_STRING", AUTH)
    servers._check_prefect_auth(prefect_stub)  # accepted: no error
