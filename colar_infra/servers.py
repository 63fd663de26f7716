"""Local MLflow and Prefect servers for the pipeline: start once, reuse, stop.

``colar run`` calls :func:`ensure_servers` (or the two ``ensure_*`` functions) before it runs a
flow. Each server is a detached background process (its own session, so it outlives the CLI
command and can be stopped as one process group), bound to 127.0.0.1 on a free port (or to the
address asked for: ``--host`` / ``$COLAR_SERVER_HOST``; one that is not loopback only with both
servers' authentication on, :func:`colar_infra.backends.check_bind`), logging to a file in the state
directory. What was started is recorded in ``<state_dir>/servers.json``; the
next ``colar run`` finds the record, checks the process is alive and answering, and reuses it. A
recorded process is recognised by its identity ``host:pid:start time`` (:mod:`colar_core.procs`), so
a pid reused by another process is not taken for the server (nor stopped).

If ``MLFLOW_TRACKING_URI`` / ``PREFECT_API_URL`` is set, that server is used instead of starting
one, after a quick check that it answers (a wrong URI fails in seconds, naming the URI).

Backends (:mod:`colar_infra.backends`): SQLite files in the state directory by default, or databases
on a PostgreSQL server (``--backend postgres --db-url ...`` / ``$COLAR_DB_URL``); MLflow optionally
with its basic-auth app (``--mlflow-auth basic-auth``). A running server is reused whatever it was
started with, unless a command asks for another backend, auth or host explicitly: then it says so and
stops (it is never restarted under pipelines that may use it).

Prefect API auth: a Prefect server colar starts requires the auth string of
:func:`colar_infra.backends.prefect_server_auth` when one is set (``$PREFECT_API_AUTH_STRING``, what
Prefect's clients send; it reaches the server only through its environment, as
``PREFECT_SERVER_API_AUTH_STRING``). After each start or reuse of such a server colar asks it whether it
accepts the client's string, as it does for MLflow's credentials. ``/api/health`` needs none.

State directory: the colar home (:func:`colar_infra.home.colar_home`: ``$COLAR_HOME`` if set, else
``./.colar``). Layout::

    servers.json            {"mlflow": {pid, url, log, ...}, "prefect": {...}}
    *.lock                  serialise concurrent ``ensure_*``/``stop_servers`` calls
    mlflow.db, mlartifacts/ MLflow backend store (sqlite backend) and proxied artifacts (both backends)
    mlflow-auth.ini, mlflow-auth-secret, mlflow-auth.db   MLflow basic auth (with --mlflow-auth basic-auth)
    mlflow.log, prefect.log server output
    home-id                 the home's id, recorded as the owner of its databases (backend postgres)
    prefect/                PREFECT_HOME of the Prefect server (its sqlite database, sqlite backend)
    prefect/ui/             the Prefect UI's static files, copied there at the first start

Both servers serve their web UI: MLflow at its base URL, Prefect at ``http://127.0.0.1:PORT/``
(``PREFECT_UI_API_URL`` is set to the server's own ``/api``, so the browser's UI talks to the
port the server was started on, not Prefect's default 4200).

This module imports neither mlflow nor prefect (the servers run as subprocesses), so the CLI
starts fast.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import warnings
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterator, Optional, TypeVar

from colar_core.files import atomic_write_json, exclusive_lock
from colar_core.net import free_port
from colar_core.procs import group_processes, identity_alive, process_identity, start_time, stop_processes
from colar_infra.backends import (
    MLFLOW_PG_DRIVER,
    PREFECT_CLIENT_AUTH_ENV,
    PREFECT_PG_DRIVER,
    PREFECT_SERVER_AUTH_ENV,
    DatabaseError,
    ServerSettings,
    check_bind,
    client_credentials,
    ensure_databases,
    mlflow_auth_setup,
    prefect_server_auth,
)
from colar_infra.health import health_url, probe
from colar_infra.home import colar_home
from colar_infra.secrets import mask_url

__all__ = [
    "ServerError",
    "ServerSettings",
    "ensure_mlflow",
    "ensure_prefect",
    "ensure_servers",
    "stop_servers",
    "server_status",
    "use_mlflow",
    "use_prefect",
]

RECORD_FILE = "servers.json"

#: Seconds to wait for a freshly started server to answer its health endpoint.
#: Measured here: MLflow ~9-18 s, Prefect ~11-17 s (slower on a loaded machine). Serving the Prefect
#: UI costs ~0.2 s at the first start in a state dir (copying its static files) and no start time
#: measurable on a busy 2-core machine (medians of 4 starts: 10.4 s with, 11.4 s without).
DEFAULT_START_TIMEOUT_S = 90.0
SERVER_LOCK_TIMEOUT_S = 600.0  # a holder starts a server at most twice (DEFAULT_START_TIMEOUT_S each)
#: Seconds an externally configured server (env var) has to answer before we give up.
EXTERNAL_CHECK_TIMEOUT_S = 3.0

# Telemetry off for every server we start. MLflow only honours DO_NOT_TRACK == "true", hence
# MLFLOW_DISABLE_TELEMETRY as well.
_QUIET_ENV = {
    "DO_NOT_TRACK": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
}

# Popen handles of servers started by this process, so they can be reaped (no zombies, no
# ResourceWarning) when stopped from the same process (tests do this).
_CHILDREN: dict[int, subprocess.Popen] = {}


class ServerError(RuntimeError):
    """A server could not be started or reached."""


# --------------------------------------------------------------------------------------------
# state directory and records


def _state_dir(state_dir: Optional[os.PathLike | str]) -> Path:
    """``state_dir`` (default: the colar home, :func:`colar_infra.home.colar_home`), absolute and created.
    A home it creates is private (0700): it holds the servers' stores, the basic-auth user store included.
    An existing folder keeps the mode its owner gave it."""
    path = (Path(state_dir).expanduser() if state_dir is not None else colar_home()).resolve()
    if not path.is_dir():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.mkdir(mode=0o700, exist_ok=True)
    return path


def _read_records(state_dir: Path) -> dict[str, dict[str, Any]]:
    path = state_dir / RECORD_FILE
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_records(state_dir: Path, records: dict[str, dict[str, Any]]) -> None:
    path = state_dir / RECORD_FILE
    if not records:
        path.unlink(missing_ok=True)
        return
    atomic_write_json(path, records)


@contextlib.contextmanager
def _locked(state_dir: Path, name: str) -> Iterator[None]:
    """Exclusive lock ``state_dir/<name>.lock`` across processes (so two ``colar run`` do not both
    start a server). One lock per server, plus ``servers`` around edits of the record file. A waiter
    logs the holder and gives up after ``SERVER_LOCK_TIMEOUT_S``, naming it."""
    with exclusive_lock(state_dir / f"{name}.lock", timeout_s=SERVER_LOCK_TIMEOUT_S, holder=f"colar servers: {name}"):
        yield


def _get_record(state_dir: Path, name: str) -> Optional[dict[str, Any]]:
    return _read_records(state_dir).get(name)


def _set_record(state_dir: Path, name: str, rec: Optional[dict[str, Any]]) -> None:
    with _locked(state_dir, "servers"):
        records = _read_records(state_dir)
        if rec is None:
            records.pop(name, None)
        else:
            records[name] = rec
        _write_records(state_dir, records)


# --------------------------------------------------------------------------------------------
# the two servers


def _base_env(drop: tuple[str, ...] = ()) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(_QUIET_ENV)
    return env


def _connect_host(host: str) -> str:
    """Where to reach a server bound to ``host`` (a wildcard bind is reached via loopback)."""
    return "127.0.0.1" if host in ("", "0.0.0.0") else host


@dataclass(frozen=True)
class _Server(ABC):
    """One local server to start or reuse in ``state_dir``, bound to ``host``, with ``settings``: what
    differs between MLflow and Prefect. The rest (lock, record, reuse, start, health wait) is
    :func:`_ensure`'s."""

    name: ClassVar[str]  # its key in servers.json; <name>.log and <name>.lock in the state dir
    health_path: ClassVar[str]  # answers 2xx once the server is up (relative to its base URL)
    url_suffix: ClassVar[str] = ""  # the URL callers get: the base URL and this

    state_dir: Path
    host: str
    settings: ServerSettings
    host_asked: bool = False  # a running server bound elsewhere is refused (not reused, not restarted)

    @abstractmethod
    def command(self, port: int) -> list[str]:
        """The command line that starts the server on ``port``."""

    @abstractmethod
    def env(self, port: int) -> dict[str, str]:
        """The environment it starts with on ``port``."""

    def prepare(self) -> dict[str, str]:
        """Run under the lock before a start (create databases, auth files...); returns more environment."""
        return {}

    @abstractmethod
    def identity(self) -> dict[str, str]:
        """Where it stores (backend, database, auth): recorded; a reused server must match it in the
        keys of :meth:`explicit`, else :class:`ServerError`."""

    def explicit(self) -> frozenset[str]:
        """The identity keys the caller asked for (flags or ``COLAR_*`` variables)."""
        asked = self.settings.backend is not None or self.settings.db_url is not None
        return frozenset({"backend", "database"} if asked else ())

    def options(self) -> dict[str, Any]:
        """Other settings, recorded: a reused server started with others is reused with a warning."""
        return {}


@dataclass(frozen=True)
class _Mlflow(_Server):
    """``mlflow server`` with its backend store in ``state_dir/mlflow.db`` (sqlite) or the database
    ``<db_prefix>_mlflow`` (postgres; created if missing), proxied artifacts in ``state_dir/mlartifacts``,
    one worker and job execution off (keeps memory low); with ``mlflow_auth="basic-auth"`` as
    ``--app-name basic-auth`` (see :mod:`colar_infra.backends`)."""

    name: ClassVar[str] = "mlflow"
    health_path: ClassVar[str] = "health"

    @property
    def backend_store(self) -> str:
        pg = self.settings.pg
        return (pg.url(self.settings.database("mlflow"), driver=MLFLOW_PG_DRIVER) if pg is not None
                else f"sqlite:///{self.state_dir / 'mlflow.db'}")

    @property
    def artifacts(self) -> Path:
        return self.state_dir / "mlartifacts"

    def command(self, port: int) -> list[str]:
        return [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", self.backend_store,
            "--artifacts-destination", str(self.artifacts),
            "--host", self.host,
            "--port", str(port),
            "--workers", "1",
            *(["--app-name", "basic-auth"] if self.settings.effective_auth == "basic-auth" else []),
        ]

    def env(self, port: int) -> dict[str, str]:
        env = _base_env(drop=("MLFLOW_TRACKING_URI", "MLFLOW_BACKEND_STORE_URI", "MLFLOW_AUTH_CONFIG_PATH"))
        # Background job runner (GenAI judges/optimisation) is not used by colar; it costs ~8 processes.
        env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
        return env

    def prepare(self) -> dict[str, str]:
        more = {}
        pg = self.settings.pg
        if pg is not None:
            ensure_databases(self.settings, ("mlflow",), self.state_dir)
            more.update(pg.env())
        if self.settings.effective_auth == "basic-auth":
            more.update(mlflow_auth_setup(self.state_dir, self.settings)[0])
        return more

    def identity(self) -> dict[str, str]:
        return {"backend": self.settings.effective_backend, "database": self.backend_store,
                "backend_store_uri": self.backend_store, "auth": self.settings.effective_auth}

    def explicit(self) -> frozenset[str]:
        return super().explicit() | ({"auth"} if self.settings.mlflow_auth is not None else set())

    def options(self) -> dict[str, Any]:
        return {"artifacts_destination": str(self.artifacts)}


#: Prefect UI settings (both spellings) taken out of the environment a local server inherits: a
#: developer's setting for another server must not point this one's UI elsewhere.
_PREFECT_UI_ENV = (
    "PREFECT_UI_ENABLED", "PREFECT_SERVER_UI_ENABLED", "PREFECT_UI_API_URL", "PREFECT_SERVER_UI_API_URL",
    "PREFECT_UI_STATIC_DIRECTORY", "PREFECT_SERVER_UI_STATIC_DIRECTORY", "PREFECT_UI_SERVE_BASE",
    "PREFECT_SERVER_UI_SERVE_BASE",
)


@dataclass(frozen=True)
class _Prefect(_Server):
    """``prefect server start`` with ``PREFECT_HOME=state_dir/prefect``, analytics off and the UI on at
    ``http://127.0.0.1:PORT/`` (its static files in ``state_dir/prefect/ui``, not in the installed package,
    which may be read-only; ``PREFECT_UI_API_URL`` = this server's ``/api``: Prefect's default would send
    the browser to port 4200). Its database: the sqlite file in ``PREFECT_HOME`` or, for backend postgres,
    ``postgresql+asyncpg://.../<db_prefix>_prefect`` (created if missing) in
    ``PREFECT_SERVER_DATABASE_CONNECTION_URL``."""

    name: ClassVar[str] = "prefect"
    health_path: ClassVar[str] = "api/health"
    url_suffix: ClassVar[str] = "/api"

    @property
    def home(self) -> Path:
        return self.state_dir / "prefect"

    @property
    def database(self) -> str:
        pg = self.settings.pg
        return (pg.url(self.settings.database("prefect"), driver=PREFECT_PG_DRIVER) if pg is not None
                else f"sqlite+aiosqlite:///{self.home / 'prefect.db'}")

    def command(self, port: int) -> list[str]:
        return [sys.executable, "-m", "prefect", "server", "start", "--host", self.host, "--port", str(port)]

    def env(self, port: int) -> dict[str, str]:
        inherited_db = tuple(k for k in os.environ
                             if k.startswith(("PREFECT_SERVER_DATABASE_", "PREFECT_API_DATABASE_")))
        env = _base_env(drop=("PREFECT_API_URL", "PREFECT_PROFILE", PREFECT_SERVER_AUTH_ENV, PREFECT_CLIENT_AUTH_ENV)
                        + _PREFECT_UI_ENV + inherited_db)
        if (auth := prefect_server_auth()) is not None:  # in its environment only: never on a command line
            env[PREFECT_SERVER_AUTH_ENV] = env[PREFECT_CLIENT_AUTH_ENV] = auth  # the server's own clients too
        env.update({
            "PREFECT_HOME": str(self.home),
            "PREFECT_SERVER_UI_ENABLED": "true",
            "PREFECT_SERVER_UI_STATIC_DIRECTORY": str(self.home / "ui"),
            "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false",
            # What the browser's UI calls. Without it Prefect derives it from PREFECT_SERVER_API_PORT
            # (default 4200), which `--port` does not set: the UI would load but talk to another port.
            "PREFECT_SERVER_UI_API_URL": f"http://{_connect_host(self.host)}:{port}/api",
        })
        return env

    def prepare(self) -> dict[str, str]:
        pg = self.settings.pg
        if pg is None:
            return {}
        ensure_databases(self.settings, ("prefect",), self.state_dir)
        return {"PREFECT_SERVER_DATABASE_CONNECTION_URL": self.database, **pg.env()}

    def identity(self) -> dict[str, str]:
        return {"backend": self.settings.effective_backend, "database": self.database,
                "auth": "auth-string" if prefect_server_auth() is not None else "none"}

    def options(self) -> dict[str, Any]:
        return {"prefect_home": str(self.home), "ui": True}


_S = TypeVar("_S", bound=_Server)

#: Health path of each server, by record name (for :func:`server_status`).
_HEALTH_PATHS = {kind.name: kind.health_path for kind in (_Mlflow, _Prefect)}


# --------------------------------------------------------------------------------------------
# processes and health


def _server_identity(rec: dict[str, Any]) -> str:
    """The recorded server's process identity, ``host:pid:start`` (:mod:`colar_core.procs`); ``""`` when
    it cannot be told. Records written before identities were recorded have the pid and the wall time
    the server first answered (``started_at``, ``startup_s`` after it was started): the process with
    that pid is the server if it started within that window (a recycled pid started later)."""
    if isinstance(rec.get("identity"), str):
        return rec["identity"]
    pid, answered, startup = rec.get("pid"), rec.get("started_at"), rec.get("startup_s")
    if not (isinstance(pid, int) and isinstance(answered, (int, float)) and isinstance(startup, (int, float))):
        return ""
    started = start_time(pid)
    # a start time is counted from a boot time in whole seconds: a little slack on both sides
    if started is not None and answered - startup - 2.0 <= started <= answered + 1.0:
        return process_identity(pid)
    return ""


def _recorded_alive(rec: dict[str, Any]) -> bool:
    """True if the recorded server's process runs on this host (its pid not taken by another process)."""
    return identity_alive(_server_identity(rec))


def _stop_group(pid: int, pgid: int, grace_s: float) -> None:
    """Stop the server ``pid`` and the rest of its process group ``pgid`` (SIGTERM, SIGKILL after
    ``grace_s``: :func:`colar_core.procs.stop_processes`), reaping it if this process started it."""
    child = _CHILDREN.pop(pid, None)
    stop_processes(lambda: group_processes(pgid), grace_s, reap=child.poll if child is not None else None)
    if child is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=1.0)


def _wait_healthy(url: Optional[str], timeout_s: float, proc: Optional[subprocess.Popen] = None) -> bool:
    """Poll ``url`` until it answers 2xx; False on timeout, when ``proc`` exits, or at once for no URL."""
    if url is None:
        return False
    deadline = time.monotonic() + timeout_s
    while True:
        if probe(url, min(2.0, max(0.2, deadline - time.monotonic())), ok_only=True):
            return True
        if proc is not None and proc.poll() is not None:
            return False
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.25)


def _log_tail(path: Path, since: int = 0, lines: int = 30) -> str:
    """Last ``lines`` lines written to ``path`` after byte offset ``since``."""
    try:
        with open(path, "rb") as fh:
            fh.seek(since)
            text = fh.read().decode(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def _check_external(name: str, env_var: str, url: str, health_path: str, timeout_s: float) -> str:
    health = health_url(url, health_path)
    if health is None:
        return url  # e.g. sqlite:///... for MLflow: nothing to probe
    if _wait_healthy(health, timeout_s):
        return url
    raise ServerError(  # the URL may carry credentials (http://user:pw@host): never printed as given
        f"{name} server at {mask_url(url)} (from ${env_var}) does not answer: GET {health} failed for "
        f"{timeout_s:.0f} s. Start it, fix ${env_var}, or unset it to let colar start a local one."
    )


def _spawn(cmd: list[str], env: dict[str, str], log_path: Path, cwd: Path) -> subprocess.Popen:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {mask_url(' '.join(cmd))}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=str(cwd),
            start_new_session=True,  # own process group; survives the CLI; stoppable as a group
            close_fds=True,
            umask=0o077,  # what the server writes (SQLite stores, the basic-auth user store, artifacts) is 0600
        )
    _CHILDREN[proc.pid] = proc
    return proc


# --------------------------------------------------------------------------------------------
# generic ensure


def _ensure(server: _Server, port: Optional[int], timeout_s: float) -> str:
    """The URL of ``server``, answering: the recorded one if it is alive and answers (and matches what was
    asked for), else a new one. A recorded one that is alive but silent, or on another port than asked
    for, is stopped; one that answers bound to another host than asked for is refused."""
    name, state_dir = server.name, server.state_dir
    with _locked(state_dir, name):
        rec = _get_record(state_dir, name)
        if rec:
            same_port = port is None or rec.get("port") == port
            if _recorded_alive(rec):
                # Alive: reuse it if it answers (waiting in case it is still starting), wherever it is bound
                # unless a host was asked for: one bound elsewhere is then refused, not restarted.
                if same_port and _wait_healthy(health_url(rec["base_url"], server.health_path), timeout_s):
                    if server.host_asked and rec.get("host") != server.host:
                        raise ServerError(
                            f"the running {name} server (pid {rec.get('pid')}, {mask_url(str(rec.get('base_url')))}) "
                            f"is bound to {rec.get('host')}; this command asks for host {server.host}. Stop it with "
                            "`colar servers stop` (when no pipeline uses it) or leave --host out to use it as it is.")
                    _refuse_if_other_identity(name, rec, server.identity(), server.explicit())
                    _warn_if_outdated(name, rec, server.options())
                    return rec["url"]
                _stop_group(rec["pid"], rec.get("pgid", rec["pid"]), grace_s=10.0)
            _set_record(state_dir, name, None)
        try:
            prepared = server.prepare()
        except DatabaseError as err:
            raise ServerError(f"{name} server not started: {err}") from None
        return _start(server, port, timeout_s, prepared)


def _start(server: _Server, port: Optional[int], timeout_s: float, more_env: dict[str, str]) -> str:
    """Start ``server`` (on a free port unless ``port``), wait until it answers and record it; return its URL.
    A server that exits or stays silent is stopped and reported with the tail of its log."""
    name, state_dir, host = server.name, server.state_dir, server.host
    log_path = state_dir / f"{name}.log"
    last_error = ""
    for _attempt in range(2):  # a free port can be taken between probing and binding: retry once
        use_port = port if port is not None else free_port(host)
        base_url = f"http://{_connect_host(host)}:{use_port}"
        cmd = server.command(use_port)
        log_offset = log_path.stat().st_size if log_path.exists() else 0
        started = time.monotonic()
        proc = _spawn(cmd, {**server.env(use_port), **more_env}, log_path, cwd=state_dir)
        identity = process_identity(proc.pid)
        try:
            healthy = _wait_healthy(health_url(base_url, server.health_path), timeout_s, proc)
        except BaseException:  # Ctrl-C while waiting: do not leave an unrecorded server behind
            _stop_group(proc.pid, proc.pid, grace_s=5.0)
            raise
        if healthy:
            rec = {
                "pid": proc.pid,
                "pgid": os.getpgid(proc.pid),
                "identity": identity,
                "host": host,
                "port": use_port,
                "base_url": base_url,
                "url": base_url + server.url_suffix,
                "log": str(log_path),
                "cmd": cmd,
                "started_at": time.time(),
                "startup_s": round(time.monotonic() - started, 2),
                **server.identity(),
                **server.options(),
            }
            _set_record(state_dir, name, rec)
            return rec["url"]
        died = proc.poll() is not None
        _stop_group(proc.pid, proc.pid, grace_s=5.0)
        tail = _log_tail(log_path, since=log_offset)
        last_error = (
            f"{name} server {'exited' if died else f'did not answer within {timeout_s:.0f} s'} "
            f"(command: {' '.join(cmd)}).\nLog {log_path} (last lines):\n{tail}"
        )
        port_clash = "address already in use" in tail.lower() or "errno 98" in tail.lower()
        if not (died and port_clash and port is None):
            break
    raise ServerError(last_error)


#: What records written before backends existed mean: a sqlite store, no auth.
_LEGACY_IDENTITY = {"backend": "sqlite", "auth": "none"}


def _refuse_if_other_identity(name: str, rec: dict[str, Any], identity: dict[str, str],
                              explicit: frozenset[str]) -> None:
    """A running server stores elsewhere than asked (e.g. sqlite when postgres was asked for): say so
    instead of silently using it, and do not restart it (other pipelines may be using it)."""
    differ = [k for k in sorted(explicit & identity.keys())
              if k in rec or k in _LEGACY_IDENTITY
              if rec.get(k, _LEGACY_IDENTITY.get(k)) != identity[k]]
    if differ:
        running = ", ".join(f"{k} {mask_url(str(rec.get(k, _LEGACY_IDENTITY.get(k))))}" for k in differ)
        asked = ", ".join(f"{k} {mask_url(identity[k])}" for k in differ)
        raise ServerError(f"the running {name} server (pid {rec.get('pid')}, {mask_url(str(rec.get('base_url')))}) "
                          f"has {running}; this command asks for {asked}. Stop it with `colar servers stop` "
                          "(when no pipeline uses it) or leave the backend options out to use it as it is.")


def _warn_if_outdated(name: str, rec: dict[str, Any], extra: dict[str, Any]) -> None:
    """Warn when a reused server was started with other settings (e.g. a Prefect server an older colar
    started with its UI off). It is not restarted: other pipelines may be using it."""
    differ = sorted(k for k, v in extra.items() if rec.get(k) != v)
    if differ:
        warnings.warn(f"the running {name} server (pid {rec.get('pid')}, {mask_url(str(rec.get('base_url')))}) was "
                      f"started with other settings ({', '.join(differ)}; e.g. without the Prefect UI); it is reused "
                      "as it is. `colar servers stop` (when no pipeline uses it) lets the next command start it anew.",
                      RuntimeWarning, stacklevel=3)


# --------------------------------------------------------------------------------------------
# public API


def _settings(settings: Optional[ServerSettings]) -> ServerSettings:
    return settings if settings is not None else ServerSettings.from_env()


def _server(kind: type[_S], state_dir: Optional[os.PathLike | str], host: Optional[str],
            settings: ServerSettings) -> _S:
    """``kind`` in ``state_dir`` bound to ``host`` (default: the settings' host, else 127.0.0.1)."""
    asked = host or settings.host
    return kind(_state_dir(state_dir), asked or settings.effective_host, settings, host_asked=asked is not None)


def ensure_mlflow(
    state_dir: Optional[os.PathLike | str] = None,
    host: Optional[str] = None,
    port: Optional[int] = None,
    *,
    timeout_s: float = DEFAULT_START_TIMEOUT_S,
    settings: Optional[ServerSettings] = None,
) -> str:
    """Return a tracking URI of an MLflow server that answers, starting one if needed.

    ``$MLFLOW_TRACKING_URI`` wins if set (checked to answer within a few seconds, else
    :class:`ServerError` naming it). Otherwise reuse the server recorded in ``state_dir``, or start
    one (:class:`_Mlflow`; a basic-auth server is then asked whether it accepts the client's credentials).
    ``settings`` default: :meth:`ServerSettings.from_env`. ``host`` (default ``settings.host``): where a new
    server is bound (127.0.0.1 when neither says); one that is not loopback needs basic auth
    (:func:`~colar_infra.backends.check_bind`, a ``ConfigError`` naming what is missing).
    """
    external = os.environ.get("MLFLOW_TRACKING_URI")
    if external:
        return _check_external("MLflow", "MLFLOW_TRACKING_URI", external, "health", EXTERNAL_CHECK_TIMEOUT_S)
    settings = _settings(settings)
    server = _server(_Mlflow, state_dir, host, settings)
    check_bind(settings, server.host, prefect=False)
    url = _ensure(server, port, timeout_s)
    if (_get_record(server.state_dir, server.name) or {}).get("auth") == "basic-auth":
        _check_mlflow_credentials(url)
    return url


#: An MLflow REST call any authenticated user may make: the credentials check after start / reuse.
_AUTH_PROBE = "api/2.0/mlflow/experiments/search?max_results=1"


def _check_mlflow_credentials(url: str, timeout_s: float = 10.0) -> None:
    """The basic-auth server at ``url`` accepts ``MLFLOW_TRACKING_USERNAME`` / ``_PASSWORD``, else
    :class:`ServerError` saying which is wrong (never the password)."""
    creds = client_credentials()
    if creds is None:
        raise ServerError(f"the MLflow server at {mask_url(url)} asks for credentials (basic auth): set "
                          "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD")
    token = base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode()
    refused = _refused_code(f"{url}/{_AUTH_PROBE}", {"Authorization": f"Basic {token}"}, "MLflow", url,
                            "the credentials check", timeout_s)
    if refused is not None:
        raise ServerError(
            f"the MLflow server at {mask_url(url)} refuses MLFLOW_TRACKING_USERNAME={creds[0]!r} with "
            f"MLFLOW_TRACKING_PASSWORD (HTTP {refused}). Its admin user was created with the credentials "
            "of its first start; use those, or change the password through MLflow's users API.")


def _refused_code(probe_url: str, headers: dict[str, str], server: str, url: str, check: str,
                  timeout_s: float) -> Optional[int]:
    """GET ``probe_url`` with ``headers`` (the credentials of ``check`` against the ``server`` at ``url``):
    None when it answers, the HTTP status (401 or 403) when it refuses them, else :class:`ServerError`
    naming the check."""
    request = urllib.request.Request(probe_url, headers=headers)  # noqa: S310 - the server colar started
    try:
        with urllib.request.urlopen(request, timeout=timeout_s):  # noqa: S310 (the server colar started)
            return None
    except urllib.error.HTTPError as err:
        if err.code in (401, 403):
            return err.code
        raise ServerError(f"the {server} server at {mask_url(url)} failed {check}: HTTP {err.code}") from None
    except (urllib.error.URLError, OSError) as err:
        raise ServerError(f"the {server} server at {mask_url(url)} failed {check}: {err}") from None


def ensure_prefect(
    state_dir: Optional[os.PathLike | str] = None,
    host: Optional[str] = None,
    port: Optional[int] = None,
    *,
    timeout_s: float = DEFAULT_START_TIMEOUT_S,
    settings: Optional[ServerSettings] = None,
) -> str:
    """Return the API URL (``http://127.0.0.1:PORT/api``) of a Prefect server, starting one if needed.

    ``$PREFECT_API_URL`` wins if set (checked via ``/health``). Otherwise reuse the recorded server
    or start one (:class:`_Prefect`). Callers then point flows at it with :func:`use_prefect` (setting
    ``os.environ`` alone is not enough once ``prefect`` has been imported: it reads settings at import time).
    ``host``: as for :func:`ensure_mlflow`; one that is not loopback needs an auth string
    (:func:`~colar_infra.backends.prefect_server_auth`). A server started with one is asked whether it
    accepts ``$PREFECT_API_AUTH_STRING``, after each start or reuse.
    """
    external = os.environ.get("PREFECT_API_URL")
    if external:
        return _check_external("Prefect", "PREFECT_API_URL", external, "health", EXTERNAL_CHECK_TIMEOUT_S)
    settings = _settings(settings)
    server = _server(_Prefect, state_dir, host, settings)
    check_bind(settings, server.host, mlflow=False)
    server.home.mkdir(parents=True, exist_ok=True)
    url = _ensure(server, port, timeout_s)
    if (_get_record(server.state_dir, server.name) or {}).get("auth") == "auth-string":
        _check_prefect_auth(url)
    return url


#: A Prefect API call that needs the auth string when the server has one (only health and ready do not).
_PREFECT_AUTH_PROBE = "admin/version"


def _check_prefect_auth(url: str, timeout_s: float = 10.0) -> None:
    """The Prefect server at ``url`` (its API URL) accepts ``$PREFECT_API_AUTH_STRING``, else
    :class:`ServerError` saying what to set (never the string)."""
    auth = os.environ.get(PREFECT_CLIENT_AUTH_ENV)
    headers = {"Authorization": "Basic " + base64.b64encode(auth.encode()).decode()} if auth else {}
    refused = _refused_code(f"{url}/{_PREFECT_AUTH_PROBE}", headers, "Prefect", url, "the auth check", timeout_s)
    if refused is not None:
        what = (f"refuses ${PREFECT_CLIENT_AUTH_ENV}" if auth else
                f"asks for an API auth string: set ${PREFECT_CLIENT_AUTH_ENV}")
        raise ServerError(f"the Prefect server at {mask_url(url)} {what} (HTTP {refused}); it requires the "
                          f"string it was started with (${PREFECT_CLIENT_AUTH_ENV} or "
                          f"${PREFECT_SERVER_AUTH_ENV} of that start)")


def use_mlflow(tracking_uri: str) -> None:
    """Point this process (and its children) at ``tracking_uri``."""
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    mlflow = sys.modules.get("mlflow")
    if mlflow is not None:
        mlflow.set_tracking_uri(tracking_uri)


def use_prefect(api_url: str) -> None:
    """Point this process (and its children) at the Prefect API ``api_url``.

    Sets ``PREFECT_API_URL`` and, if ``prefect`` is already imported, refreshes its global settings
    (it snapshots the environment at import). Code running inside an explicit
    ``temporary_settings``/flow context keeps that context's settings.
    """
    os.environ["PREFECT_API_URL"] = api_url
    context = sys.modules.get("prefect.context")
    if context is not None:
        context.refresh_global_settings_context()


def ensure_servers(
    state_dir: Optional[os.PathLike | str] = None,
    *,
    apply_env: bool = True,
    settings: Optional[ServerSettings] = None,
) -> dict[str, str]:
    """Ensure both servers (started in parallel); with ``apply_env`` point this process at them.
    ``settings`` (backend, database, MLflow auth, host) default: :meth:`ServerSettings.from_env`. A host
    that is not loopback without both servers' authentication is refused before either starts
    (:func:`~colar_infra.backends.check_bind`).

    Returns ``{"mlflow": tracking_uri, "prefect": api_url}``.
    """
    settings = _settings(settings)
    check_bind(settings, mlflow=not os.environ.get("MLFLOW_TRACKING_URI"),
               prefect=not os.environ.get("PREFECT_API_URL"))
    # Servers named by MLFLOW_TRACKING_URI / PREFECT_API_URL are only probed (seconds): probe them
    # first, so a dead one fails the command at once instead of after the other server has started.
    if os.environ.get("MLFLOW_TRACKING_URI"):
        ensure_mlflow(state_dir)
    if os.environ.get("PREFECT_API_URL"):
        ensure_prefect(state_dir)
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="colar-servers") as pool:
        mlflow_f = pool.submit(ensure_mlflow, state_dir, settings=settings)
        prefect_f = pool.submit(ensure_prefect, state_dir, settings=settings)
        urls = {"mlflow": mlflow_f.result(), "prefect": prefect_f.result()}
    if apply_env:
        use_mlflow(urls["mlflow"])
        use_prefect(urls["prefect"])
    return urls


def stop_servers(
    state_dir: Optional[os.PathLike | str] = None,
    names: Optional[list[str]] = None,
    *,
    timeout_s: float = 15.0,
) -> list[str]:
    """Stop the recorded servers (all, or ``names``) and remove their records. Returns the names stopped.

    Each server's process group gets SIGTERM, then SIGKILL after ``timeout_s``. Servers given by
    environment variables are never touched.
    """
    sd = _state_dir(state_dir)
    stopped: list[str] = []
    for name in sorted(_read_records(sd)):
        if names is not None and name not in names:
            continue
        with _locked(sd, name):
            rec = _get_record(sd, name)
            if rec and _recorded_alive(rec):
                _stop_group(rec["pid"], rec.get("pgid", rec["pid"]), timeout_s)
                stopped.append(name)
            _set_record(sd, name, None)
    return stopped


def server_status(state_dir: Optional[os.PathLike | str] = None) -> dict[str, dict[str, Any]]:
    """Recorded servers with ``alive`` (process runs) and ``healthy`` (answers) added."""
    sd = _state_dir(state_dir)
    out: dict[str, dict[str, Any]] = {}
    for name, rec in _read_records(sd).items():
        alive = _recorded_alive(rec)
        health = health_url(str(rec.get("base_url", "")), _HEALTH_PATHS.get(name, "health"))
        healthy = alive and health is not None and probe(health, 2.0, ok_only=True)
        out[name] = {**rec, "alive": alive, "healthy": healthy}
    return out
