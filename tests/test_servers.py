"""colar_infra.servers: local MLflow / Prefect servers start detached on 127.0.0.1, are reused, stop."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from colar_core.net import free_port
from colar_core.procs import group_processes, process_identity
from colar_infra import servers
from colar_infra.servers import ServerError, ensure_mlflow, ensure_prefect, server_status, stop_servers


def _listen_addresses(port: int) -> set[str]:
    """IP addresses with a socket listening on ``port`` (from /proc/net/tcp{,6})."""
    found = set()
    for table, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state = fields[1], fields[3]
            ip_hex, port_hex = local.split(":")
            if state != "0A" or int(port_hex, 16) != port:  # 0A = LISTEN
                continue
            raw = bytes.fromhex(ip_hex)
            if v6:
                raw = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
                found.add(socket.inet_ntop(socket.AF_INET6, raw))
            else:
                found.add(socket.inet_ntoa(raw[::-1]))
    return found


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def _pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    return not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"


@pytest.fixture
def no_external_servers(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)


@pytest.mark.slow
def test_mlflow_server_starts_on_loopback_is_reused_and_stops(tmp_path, no_external_servers):
    t0 = time.monotonic()
    uri = ensure_mlflow(tmp_path)
    started_s = time.monotonic() - t0
    print(f"mlflow server start: {started_s:.1f} s")

    assert re.fullmatch(r"http://127\.0\.0\.1:\d+", uri)
    assert _answers(uri + "/health")
    record = json.loads((tmp_path / "servers.json").read_text())["mlflow"]
    assert record["url"] == uri and record["log"] == str(tmp_path / "mlflow.log")
    assert record["backend_store_uri"] == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert _listen_addresses(record["port"]) == {"127.0.0.1"}

    t0 = time.monotonic()
    assert ensure_mlflow(tmp_path) == uri  # second `colar run`: reuse, no new process
    assert time.monotonic() - t0 < 3.0
    assert json.loads((tmp_path / "servers.json").read_text())["mlflow"]["pid"] == record["pid"]
    status = server_status(tmp_path)["mlflow"]
    assert status["alive"] and status["healthy"]
    # what the server writes is its owner's alone (issue 22, item 11)
    assert stat.S_IMODE((tmp_path / "mlflow.db").stat().st_mode) == 0o600

    assert stop_servers(tmp_path) == ["mlflow"]
    assert _pid_gone(record["pid"])
    assert not _answers(uri + "/health")
    assert not (tmp_path / "servers.json").exists()
    assert server_status(tmp_path) == {}


@pytest.mark.slow
def test_prefect_server_starts_on_loopback_is_reused_and_stops(tmp_path, no_external_servers):
    t0 = time.monotonic()
    url = ensure_prefect(tmp_path)
    print(f"prefect server start: {time.monotonic() - t0:.1f} s")

    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/api", url)
    assert _answers(url + "/health")
    record = json.loads((tmp_path / "servers.json").read_text())["prefect"]
    assert record["prefect_home"] == str(tmp_path.resolve() / "prefect")
    assert _listen_addresses(record["port"]) == {"127.0.0.1"}
    assert ensure_prefect(tmp_path) == url

    assert stop_servers(tmp_path, names=["prefect"]) == ["prefect"]
    assert _pid_gone(record["pid"])
    assert not _answers(url + "/health")


@pytest.mark.slow
def test_prefect_server_serves_its_ui_talking_to_its_own_port(tmp_path, no_external_servers):
    url = ensure_prefect(tmp_path)
    try:
        base = url.removesuffix("/api")
        with urllib.request.urlopen(base + "/ui-settings", timeout=5) as r:
            assert json.loads(r.read())["api_url"] == url  # not Prefect's default port 4200
        # The link `colar run` prints opens the UI's page (it answered {"detail":"Not Found"} with the UI off).
        page = urllib.request.Request(base + "/runs/flow-run/00000000-0000-0000-0000-000000000000",
                                      headers={"Accept": "text/html"})
        with urllib.request.urlopen(page, timeout=5) as r:
            assert r.status == 200 and "<html" in r.read().decode().lower()
        assert (tmp_path / "prefect" / "ui").is_dir()  # its static files in the state dir, not site-packages

        # A server recorded without the UI (started by an older colar) is reused, not killed under the
        # pipelines that may use it, with a warning saying how to restart it.
        records = json.loads((tmp_path / "servers.json").read_text())
        del records["prefect"]["ui"]
        (tmp_path / "servers.json").write_text(json.dumps(records))
        with pytest.warns(RuntimeWarning, match=r"started with other settings \(ui;.*colar servers stop"):
            assert ensure_prefect(tmp_path) == url
        assert json.loads((tmp_path / "servers.json").read_text())["prefect"]["pid"] == records["prefect"]["pid"]
    finally:
        stop_servers(tmp_path)


def test_server_that_dies_at_start_reports_its_log(tmp_path, monkeypatch, no_external_servers):
    # stand-in for a server that cannot bind: the servers are started as `sys.executable -m ...`
    fake = tmp_path / "fake-python"
    fake.write_text("#!/bin/sh\necho \"$@\"\necho 'ERROR: [Errno 98] address already in use' >&2\nexit 3\n")
    fake.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(fake))
    t0 = time.monotonic()
    with pytest.raises(ServerError, match="address already in use") as err:
        ensure_mlflow(tmp_path / "state")
    assert time.monotonic() - t0 < 10
    message = str(err.value)
    assert "exited" in message and str(tmp_path / "state" / "mlflow.log") in message
    assert "--host 127.0.0.1" in message  # the log tail shows the command it was given
    assert not (tmp_path / "state" / "servers.json").exists()


def test_dead_mlflow_tracking_uri_fails_fast_naming_it(monkeypatch, tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    t0 = time.monotonic()
    with pytest.raises(ServerError, match=re.escape(uri)):
        ensure_mlflow(tmp_path)
    assert time.monotonic() - t0 < 10
    assert not (tmp_path / "servers.json").exists()  # nothing started


def test_dead_prefect_api_url_fails_fast_naming_it(monkeypatch, tmp_path):
    url = f"http://127.0.0.1:{free_port()}/api"
    monkeypatch.setenv("PREFECT_API_URL", url)
    t0 = time.monotonic()
    with pytest.raises(ServerError, match=re.escape(url)):
        ensure_prefect(tmp_path)
    assert time.monotonic() - t0 < 10


def test_live_mlflow_tracking_uri_is_used_instead_of_starting_one(mlflow_server, tmp_path):
    assert os.environ["MLFLOW_TRACKING_URI"] == mlflow_server
    assert ensure_mlflow(tmp_path) == mlflow_server
    assert not (tmp_path / "servers.json").exists()


def test_dead_record_is_reported_and_dropped(tmp_path):
    dead = {"pid": 2**22 + 12345, "pgid": 2**22 + 12345, "host": "127.0.0.1", "port": 1,
            "base_url": "http://127.0.0.1:1", "url": "http://127.0.0.1:1", "log": "x"}
    (tmp_path / "servers.json").write_text(json.dumps({"mlflow": dead}))
    assert server_status(tmp_path)["mlflow"]["alive"] is False
    assert stop_servers(tmp_path) == []
    assert not (tmp_path / "servers.json").exists()


def test_the_state_dir_defaults_to_the_colar_home(monkeypatch, tmp_path):
    record = {"mlflow": {"pid": 2**22 + 12345, "host": "127.0.0.1", "base_url": "http://127.0.0.1:1"}}
    for home in (tmp_path / "home", tmp_path / ".colar"):
        home.mkdir()
        (home / "servers.json").write_text(json.dumps(record))
    monkeypatch.setenv("COLAR_HOME", str(tmp_path / "home"))
    assert list(server_status()) == ["mlflow"]
    assert stop_servers() == [] and not (tmp_path / "home" / "servers.json").exists()
    monkeypatch.delenv("COLAR_HOME")
    monkeypatch.chdir(tmp_path)
    assert list(server_status()) == ["mlflow"]  # ./.colar
    assert stop_servers() == [] and not (tmp_path / ".colar" / "servers.json").exists()


@pytest.fixture
def process_group():
    """A stand-in server: a shell leading its own process group, with a child in that group."""
    proc = subprocess.Popen(["sh", "-c", "sleep 60 & wait"], start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while len(group_processes(proc.pid)) < 2:
            assert time.monotonic() < deadline, "the child never started"
            time.sleep(0.05)
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the shell and its child
        proc.wait()


def _record(proc: subprocess.Popen, **fields) -> dict:
    return {"pid": proc.pid, "pgid": proc.pid, "host": "127.0.0.1", "port": 1, "base_url": "http://127.0.0.1:1",
            "url": "http://127.0.0.1:1", "log": "x", **fields}


def test_a_recorded_server_is_its_process_not_its_pid(tmp_path, process_group):
    """The record's identity (host:pid:start) decides: the same pid with another start time is another
    process (a recycled pid), which is neither reported alive nor stopped. The right one is stopped with
    its whole process group."""
    members = group_processes(process_group.pid)
    host, pid, start = process_identity(process_group.pid).split(":")
    recycled = _record(process_group, identity=f"{host}:{pid}:{int(start) - 1}")
    (tmp_path / "servers.json").write_text(json.dumps({"mlflow": recycled}))
    assert server_status(tmp_path)["mlflow"]["alive"] is False
    assert stop_servers(tmp_path) == [] and not (tmp_path / "servers.json").exists()
    assert sorted(group_processes(process_group.pid)) == sorted(members)  # left alone

    ours = _record(process_group, identity=process_identity(process_group.pid))
    (tmp_path / "servers.json").write_text(json.dumps({"mlflow": ours}))
    status = server_status(tmp_path)["mlflow"]
    assert status["alive"] is True and status["healthy"] is False  # nothing answers on port 1
    assert stop_servers(tmp_path, timeout_s=5) == ["mlflow"]
    assert group_processes(process_group.pid) == [] and all(_pid_gone(p) for p in members)


def test_records_without_an_identity_are_recognised_by_their_start_time(tmp_path, process_group):
    """Records written before identities were recorded: the pid's process is the server if it started
    within the record's start-up window (``startup_s`` before ``started_at``); one that started later
    is a recycled pid."""
    now = time.time()
    for answered, ours in ((now + 0.5, True), (now - 3600, False), (now + 3600, False)):
        old = _record(process_group, started_at=answered, startup_s=1.0, cmd=["mlflow", "server"])
        (tmp_path / "servers.json").write_text(json.dumps({"mlflow": old}))
        assert server_status(tmp_path)["mlflow"]["alive"] is ours, answered - now
    assert stop_servers(tmp_path, timeout_s=5) == []  # the last record is not it: left alone
    assert group_processes(process_group.pid) != []


def test_use_prefect_reaches_already_imported_prefect():
    import prefect.context
    from prefect.settings import PREFECT_API_URL

    before = os.environ.get("PREFECT_API_URL")
    url = "http://127.0.0.1:9/api"
    try:
        servers.use_prefect(url)  # os.environ alone would not reach the imported prefect
        assert PREFECT_API_URL.value() == url
    finally:
        if before is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = before
        prefect.context.refresh_global_settings_context()
    assert PREFECT_API_URL.value() == before


@pytest.mark.slow
def test_prefect_server_fixture_runs_flows_against_it(prefect_server):
    from prefect import flow, task
    from prefect.client.orchestration import get_client

    @task
    def double(x: int) -> int:
        return 2 * x

    @flow
    def tiny(x: int) -> int:
        return double(x)

    assert os.environ["PREFECT_API_URL"] == prefect_server
    assert tiny(21) == 42
    with get_client(sync_client=True) as client:
        assert str(client.api_url).rstrip("/") == prefect_server
        assert [r.name for r in client.read_flow_runs()] != []


def test_a_colar_home_it_creates_is_private_and_an_existing_one_keeps_its_mode(tmp_path):
    """Issue 22 item 11: the home (with mlflow.db and mlflow-auth.db in it) was created 0755."""
    from colar_infra.servers import _state_dir

    assert stat.S_IMODE(_state_dir(tmp_path / "a" / "home").stat().st_mode) == 0o700
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    assert stat.S_IMODE(_state_dir(shared).stat().st_mode) == 0o755
