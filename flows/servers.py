"""Local MLflow and Prefect servers for the pipeline: start once, reuse, stop.

``colar run`` calls :func:`ensure_servers` (or the two ``ensure_*`` functions) before it runs a
flow. Each server is a detached background process (its own session, so it outlives the CLI
command and can be stopped as one process group), bound to 127.0.0.1 on a free port, logging to
a file in the state directory. What was started is recorded in ``<state_dir>/servers.json``; the
next ``colar run`` finds the record, checks the process is alive and answering, and reuses it.

If ``MLFLOW_TRACKING_URI`` / ``PREFECT_API_URL`` is set, that server is used instead of starting
one, after a quick check that it answers (a wrong URI fails in seconds, naming the URI).

Backends (:mod:`colar.flows.backends`): SQLite files in the state directory by default, or databases
on a PostgreSQL server (``--backend postgres --db-url ...`` / ``$COLAR_DB_URL``); MLflow optionally
with its basic-auth app (``--mlflow-auth basic-auth``). A running server is reused whatever it was
started with, unless a command asks for another backend or auth explicitly: then it says so and
stops (it is never restarted under pipelines that may use it).

State directory: ``$COLAR_HOME`` if set, else ``./.colar``. Layout::

    servers.json            {"mlflow": {pid, url, log, ...}, "prefect": {...}}
    *.lock                  serialise concurrent ``ensure_*``/``stop_servers`` calls
    mlflow.db, mlartifacts/ MLflow backend store (sqlite backend) and proxied artifacts (both backends)
    mlflow-auth.ini, mlflow-auth-secret, mlflow-auth.db   MLflow basic auth (with --mlflow-auth basic-auth)
    mlflow.log, prefect.log server output
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
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from colar.flows.backends import (MLFLOW_PG_DRIVER, PREFECT_PG_DRIVER, DatabaseError, ServerSettings, client_credentials,
                                  ensure_databases, mlflow_auth_setup)
from colar.flows.locks import exclusive_lock
from colar.tasks.params import mask_url

__all__ = [
    "ServerError",
    "ServerSettings",
    "default_state_dir",
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


def default_state_dir() -> Path:
    """``$COLAR_HOME`` if set, else ``./.colar`` under the current directory."""
    env = os.environ.get("COLAR_HOME")
    return Path(env).expanduser() if env else Path.cwd() / ".colar"


def _state_dir(state_dir: Optional[os.PathLike | str]) -> Path:
    path = Path(state_dir).expanduser() if state_dir is not None else default_state_dir()
    path = path.resolve()
    path.mkdir(parents=True, exist_ok=True)
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
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(records, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


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
# processes, ports, health


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _connect_host(host: str) -> str:
    """Where to reach a server bound to ``host`` (a wildcard bind is reached via loopback)."""
    return "127.0.0.1" if host in ("", "0.0.0.0") else host


def _pid_alive(pid: int) -> bool:
    """True if ``pid`` runs and is not a zombie."""
    child = _CHILDREN.get(pid)
    if child is not None and child.poll() is not None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # killpg succeeds while only zombies remain; look for a live member.
    try:
        for stat_path in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat_path.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            # fields: state ppid pgrp ...
            if int(fields[2]) == pgid and fields[0] != "Z":
                return True
        return False
    except OSError:
        return True


def _is_our_process(pid: int, rec: dict[str, Any], marker: str) -> bool:
    """Guard against a recycled pid: the process must run the recorded command line (or, for
    records without one, a command naming the server)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
    except OSError:
        return True  # no /proc: trust the pid
    argv_s = [a.decode(errors="replace") for a in argv]
    cmd = rec.get("cmd")
    if isinstance(cmd, list) and cmd:
        return argv_s == [str(c) for c in cmd]
    return any(marker in a for a in argv_s)


def _http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (local URLs)
            return 200 <= resp.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _wait_healthy(url: str, timeout_s: float, proc: Optional[subprocess.Popen] = None) -> bool:
    """Poll ``url`` until it answers 2xx; False on timeout or when ``proc`` exits."""
    deadline = time.monotonic() + timeout_s
    while True:
        if _http_ok(url, timeout=min(2.0, max(0.2, deadline - time.monotonic()))):
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


def _health_url(base: str, path: str) -> str:
    return base.rstrip("/") + "/" + path.lstrip("/")


def _check_external(name: str, env_var: str, url: str, health_path: str, timeout_s: float) -> str:
    if not url.startswith(("http://", "https://")):
        return url  # e.g. sqlite:///... for MLflow: nothing to probe
    health = _health_url(url, health_path)
    if _wait_healthy(health, timeout_s):
        return url
    raise ServerError(  # the URL may carry credentials (http://user:pw@host): never printed as given
        f"{name} server at {mask_url(url)} (from ${env_var}) does not answer: GET {mask_url(health)} failed for "
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
        )
    _CHILDREN[proc.pid] = proc
    return proc


def _terminate_group(pid: int, pgid: int, timeout_s: float) -> None:
    """SIGTERM the process group, SIGKILL what is left after ``timeout_s``."""

    def signal_group(sig: int) -> None:
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            pass
        except PermissionError:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def wait_gone(wait_s: float) -> bool:
        deadline = time.monotonic() + wait_s
        while True:
            child = _CHILDREN.get(pid)
            if child is not None:
                child.poll()  # reap the leader if it is ours, so it is not counted as alive
            if not _group_alive(pgid):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.1)

    signal_group(signal.SIGTERM)
    if not wait_gone(timeout_s):
        signal_group(signal.SIGKILL)
        wait_gone(5.0)
    child = _CHILDREN.pop(pid, None)
    if child is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=1.0)


def _recorded_alive(rec: dict[str, Any], marker: str) -> bool:
    pid = rec.get("pid")
    return isinstance(pid, int) and _pid_alive(pid) and _is_our_process(pid, rec, marker)


# --------------------------------------------------------------------------------------------
# generic ensure


def _ensure(
    *,
    name: str,
    state_dir: Path,
    host: str,
    port: Optional[int],
    build_cmd,  # (port) -> list[str]
    env: dict[str, str],
    port_env=None,  # (port) -> dict[str, str]: environment that depends on the port, or None
    health_path: str,
    marker: str,
    url_suffix: str,
    timeout_s: float,
    extra: dict[str, Any],
    identity: Optional[dict[str, str]] = None,
    explicit: frozenset[str] = frozenset(),
    before_start: Optional[Callable[[], dict[str, str]]] = None,
) -> str:
    """``identity``: what the server stores where (backend, database, auth), recorded; a reused server
    must match it in the ``explicit`` keys (those the caller asked for), else :class:`ServerError`.
    ``before_start``: run under the lock before a start (create databases...); returns more environment."""
    identity = identity or {}
    with _locked(state_dir, name):
        rec = _get_record(state_dir, name)
        if rec:
            same_place = rec.get("host") == host and (port is None or rec.get("port") == port)
            if _recorded_alive(rec, marker):
                # Alive: reuse it if it answers (waiting in case it is still starting).
                if same_place and _wait_healthy(_health_url(rec["base_url"], health_path), timeout_s):
                    _refuse_if_other_identity(name, rec, identity, explicit)
                    _warn_if_outdated(name, rec, extra)
                    return rec["url"]
                _terminate_group(rec["pid"], rec.get("pgid", rec["pid"]), timeout_s=10.0)
            _set_record(state_dir, name, None)

        if before_start is not None:
            try:
                env = {**env, **before_start()}
            except DatabaseError as err:
                raise ServerError(f"{name} server not started: {err}") from None
        log_path = state_dir / f"{name}.log"
        last_error = ""
        for attempt in range(2):  # a free port can be taken between probing and binding: retry once
            use_port = port if port is not None else _free_port(host)
            base_url = f"http://{_connect_host(host)}:{use_port}"
            cmd = build_cmd(use_port)
            log_offset = log_path.stat().st_size if log_path.exists() else 0
            started = time.monotonic()
            proc = _spawn(cmd, {**env, **(port_env(use_port) if port_env else {})}, log_path, cwd=state_dir)
            try:
                healthy = _wait_healthy(_health_url(base_url, health_path), timeout_s, proc)
            except BaseException:  # Ctrl-C while waiting: do not leave an unrecorded server behind
                _terminate_group(proc.pid, proc.pid, timeout_s=5.0)
                raise
            if healthy:
                rec = {
                    "pid": proc.pid,
                    "pgid": os.getpgid(proc.pid),
                    "host": host,
                    "port": use_port,
                    "base_url": base_url,
                    "url": base_url + url_suffix,
                    "log": str(log_path),
                    "cmd": cmd,
                    "started_at": time.time(),
                    "startup_s": round(time.monotonic() - started, 2),
                    **identity,
                    **extra,
                }
                _set_record(state_dir, name, rec)
                return rec["url"]
            died = proc.poll() is not None
            _terminate_group(proc.pid, proc.pid, timeout_s=5.0)
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


def _refuse_if_other_identity(name: str, rec: dict[str, Any], identity: dict[str, str], explicit) -> None:
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


def _base_env(drop: tuple[str, ...] = ()) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(_QUIET_ENV)
    return env


# --------------------------------------------------------------------------------------------
# public API


def _settings(settings: Optional[ServerSettings]) -> ServerSettings:
    return settings if settings is not None else ServerSettings.from_env()


def _explicit(settings: ServerSettings, auth: bool) -> frozenset[str]:
    """The identity keys the caller asked for (flags or ``COLAR_*`` variables)."""
    keys = set()
    if settings.backend is not None or settings.db_url is not None:
        keys |= {"backend", "database"}
    if auth and settings.mlflow_auth is not None:
        keys.add("auth")
    return frozenset(keys)


def ensure_mlflow(
    state_dir: Optional[os.PathLike | str] = None,
    host: str = "127.0.0.1",
    port: Optional[int] = None,
    *,
    timeout_s: float = DEFAULT_START_TIMEOUT_S,
    settings: Optional[ServerSettings] = None,
) -> str:
    """Return a tracking URI of an MLflow server that answers, starting one if needed.

    ``$MLFLOW_TRACKING_URI`` wins if set (checked to answer within a few seconds, else
    :class:`ServerError` naming it). Otherwise reuse the server recorded in ``state_dir``, or start
    ``mlflow server`` with its backend store in ``state_dir/mlflow.db`` (sqlite) or the database
    ``<db_prefix>_mlflow`` (postgres; created if missing), proxied artifacts in
    ``state_dir/mlartifacts``, one worker and job execution off (keeps memory low); with
    ``mlflow_auth="basic-auth"`` as ``--app-name basic-auth`` (see :mod:`colar.flows.backends`).
    ``settings`` default: :meth:`ServerSettings.from_env`.
    """
    external = os.environ.get("MLFLOW_TRACKING_URI")
    if external:
        return _check_external("MLflow", "MLFLOW_TRACKING_URI", external, "health", EXTERNAL_CHECK_TIMEOUT_S)

    settings = _settings(settings)
    sd = _state_dir(state_dir)
    pg = settings.pg
    backend = (pg.url(settings.database("mlflow"), driver=MLFLOW_PG_DRIVER) if pg is not None
               else f"sqlite:///{sd / 'mlflow.db'}")
    artifacts = sd / "mlartifacts"
    auth = settings.effective_auth

    def build_cmd(p: int) -> list[str]:
        return [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", backend,
            "--artifacts-destination", str(artifacts),
            "--host", host,
            "--port", str(p),
            "--workers", "1",
            *(["--app-name", "basic-auth"] if auth == "basic-auth" else []),
        ]

    def before_start() -> dict[str, str]:
        more = {}
        if pg is not None:
            ensure_databases(settings, ("mlflow",))
            more.update(pg.env())
        if auth == "basic-auth":
            more.update(mlflow_auth_setup(sd, settings)[0])
        return more

    env = _base_env(drop=("MLFLOW_TRACKING_URI", "MLFLOW_BACKEND_STORE_URI", "MLFLOW_AUTH_CONFIG_PATH"))
    # Background job runner (GenAI judges/optimisation) is not used by colar; it costs ~8 processes.
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    url = _ensure(
        name="mlflow",
        state_dir=sd,
        host=host,
        port=port,
        build_cmd=build_cmd,
        env=env,
        health_path="health",
        marker="mlflow",
        url_suffix="",
        timeout_s=timeout_s,
        extra={"artifacts_destination": str(artifacts)},
        identity={"backend": settings.effective_backend, "database": backend, "backend_store_uri": backend, "auth": auth},
        explicit=_explicit(settings, auth=True),
        before_start=before_start,
    )
    rec = _get_record(sd, "mlflow") or {}
    if rec.get("auth") == "basic-auth":
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
    request = urllib.request.Request(_health_url(url, _AUTH_PROBE), headers={"Authorization": f"Basic {token}"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s):  # noqa: S310 (the server colar started)
            return
    except urllib.error.HTTPError as err:
        if err.code in (401, 403):
            raise ServerError(
                f"the MLflow server at {mask_url(url)} refuses MLFLOW_TRACKING_USERNAME={creds[0]!r} with "
                f"MLFLOW_TRACKING_PASSWORD (HTTP {err.code}). Its admin user was created with the credentials "
                "of its first start; use those, or change the password through MLflow's users API.") from None
        raise ServerError(f"the MLflow server at {mask_url(url)} failed the credentials check: HTTP {err.code}") from None
    except (urllib.error.URLError, OSError) as err:
        raise ServerError(f"the MLflow server at {mask_url(url)} failed the credentials check: {err}") from None


def ensure_prefect(
    state_dir: Optional[os.PathLike | str] = None,
    host: str = "127.0.0.1",
    port: Optional[int] = None,
    *,
    timeout_s: float = DEFAULT_START_TIMEOUT_S,
    settings: Optional[ServerSettings] = None,
) -> str:
    """Return the API URL (``http://127.0.0.1:PORT/api``) of a Prefect server, starting one if needed.

    ``$PREFECT_API_URL`` wins if set (checked via ``/health``). Otherwise reuse the recorded server
    or start ``prefect server start`` with ``PREFECT_HOME=state_dir/prefect``, analytics off and the
    UI on at ``http://127.0.0.1:PORT/`` (its static files in ``state_dir/prefect/ui``, not in the
    installed package, which may be read-only; ``PREFECT_UI_API_URL`` = this server's ``/api``:
    Prefect's default would send the browser to port 4200). Its database: the sqlite file in
    ``PREFECT_HOME`` or, for backend postgres, ``postgresql+asyncpg://.../<db_prefix>_prefect``
    (created if missing) in ``PREFECT_SERVER_DATABASE_CONNECTION_URL``.
    Callers then point flows at it with :func:`use_prefect` (setting ``os.environ`` alone is not
    enough once ``prefect`` has been imported: it reads settings at import time).
    """
    external = os.environ.get("PREFECT_API_URL")
    if external:
        return _check_external("Prefect", "PREFECT_API_URL", external, "health", EXTERNAL_CHECK_TIMEOUT_S)

    settings = _settings(settings)
    sd = _state_dir(state_dir)
    home = sd / "prefect"
    home.mkdir(parents=True, exist_ok=True)
    pg = settings.pg
    database = (pg.url(settings.database("prefect"), driver=PREFECT_PG_DRIVER) if pg is not None
                else f"sqlite+aiosqlite:///{home / 'prefect.db'}")

    def build_cmd(p: int) -> list[str]:
        return [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(p)]

    def before_start() -> dict[str, str]:
        if pg is None:
            return {}
        ensure_databases(settings, ("prefect",))
        return {"PREFECT_SERVER_DATABASE_CONNECTION_URL": database, **pg.env()}

    inherited_db = tuple(k for k in os.environ if k.startswith(("PREFECT_SERVER_DATABASE_", "PREFECT_API_DATABASE_")))
    env = _base_env(drop=("PREFECT_API_URL", "PREFECT_PROFILE") + _PREFECT_UI_ENV + inherited_db)
    env.update(
        {
            "PREFECT_HOME": str(home),
            "PREFECT_SERVER_UI_ENABLED": "true",
            "PREFECT_SERVER_UI_STATIC_DIRECTORY": str(home / "ui"),
            "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false",
        }
    )

    def port_env(p: int) -> dict[str, str]:
        # What the browser's UI calls. Without it Prefect derives it from PREFECT_SERVER_API_PORT
        # (default 4200), which `--port` does not set: the UI would load but talk to another port.
        return {"PREFECT_SERVER_UI_API_URL": f"http://{_connect_host(host)}:{p}/api"}

    return _ensure(
        name="prefect",
        state_dir=sd,
        host=host,
        port=port,
        build_cmd=build_cmd,
        env=env,
        port_env=port_env,
        health_path="api/health",
        marker="prefect",
        url_suffix="/api",
        timeout_s=timeout_s,
        extra={"prefect_home": str(home), "ui": True},
        identity={"backend": settings.effective_backend, "database": database},
        explicit=_explicit(settings, auth=False),
        before_start=before_start,
    )


#: Prefect UI settings (both spellings) taken out of the environment a local server inherits: a
#: developer's setting for another server must not point this one's UI elsewhere.
_PREFECT_UI_ENV = (
    "PREFECT_UI_ENABLED", "PREFECT_SERVER_UI_ENABLED", "PREFECT_UI_API_URL", "PREFECT_SERVER_UI_API_URL",
    "PREFECT_UI_STATIC_DIRECTORY", "PREFECT_SERVER_UI_STATIC_DIRECTORY", "PREFECT_UI_SERVE_BASE",
    "PREFECT_SERVER_UI_SERVE_BASE",
)


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
    ``settings`` (backend, database, MLflow auth) default: :meth:`ServerSettings.from_env`.

    Returns ``{"mlflow": tracking_uri, "prefect": api_url}``.
    """
    settings = _settings(settings)
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
            if rec and _recorded_alive(rec, name):
                _terminate_group(rec["pid"], rec.get("pgid", rec["pid"]), timeout_s)
                stopped.append(name)
            _set_record(sd, name, None)
    return stopped


def server_status(state_dir: Optional[os.PathLike | str] = None) -> dict[str, dict[str, Any]]:
    """Recorded servers with ``alive`` (process runs) and ``healthy`` (answers) added."""
    sd = _state_dir(state_dir)
    out: dict[str, dict[str, Any]] = {}
    health = {"mlflow": "health", "prefect": "api/health"}
    for name, rec in _read_records(sd).items():
        alive = _recorded_alive(rec, name)
        healthy = alive and _http_ok(_health_url(rec.get("base_url", ""), health.get(name, "health")), timeout=2.0)
        out[name] = {**rec, "alive": alive, "healthy": healthy}
    return out
