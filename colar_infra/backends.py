"""Where the local servers keep their data, and whether MLflow asks for credentials.

Two backends (:class:`ServerSettings`, read by :mod:`colar_infra.servers` when it starts a server):

``sqlite`` (the default, nothing to set up)
    MLflow's store is ``<COLAR_HOME>/mlflow.db``, Prefect's is the SQLite file in
    ``<COLAR_HOME>/prefect``. Good for one machine and a few pipelines at a time.

``postgres`` (production)
    ``db_url`` names a PostgreSQL *server* (``postgresql://USER[:PASSWORD]@HOST[:PORT][/DB][?PARAMS]``; ``DB``,
    default ``postgres``, is only the database colar connects to for creating the others). colar
    creates one database per server if it is missing: ``<db_prefix>_mlflow`` (MLflow's backend
    store), ``<db_prefix>_prefect`` (Prefect, through ``postgresql+asyncpg``) and, with basic auth,
    ``<db_prefix>_mlflow_auth`` (MLflow's user store). Artifacts stay files:
    ``<COLAR_HOME>/mlartifacts``, served by the MLflow server. A prefix therefore belongs to one colar
    home: the first to use it is recorded as its owner (the comment of each database), and another
    home is refused (:func:`ensure_databases`).

The password of ``db_url`` (``user:PASSWORD@`` or ``?password=PASSWORD``, as libpq reads it) never reaches
a command line, a record, a log or a printed URL: the servers get URLs without it and the password as
``PGPASSWORD`` in their environment (libpq, which MLflow's psycopg2 uses, and asyncpg, which Prefect
uses, both read it).

MLflow basic auth (``mlflow_auth="basic-auth"``) starts MLflow with ``--app-name basic-auth``. Its
admin user is ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``, the same variables the
pipeline's MLflow client sends with every request. MLflow creates the admin at the first start
against an empty user store and ignores the variables afterwards: a changed password is refused by
the running server (colar checks the credentials after each start or reuse and says so).

Every setting has an environment variable; command-line flags win over them:

=====================  ==========================  =========================================
field                  environment variable        flag (``colar servers start`` / ``run``)
=====================  ==========================  =========================================
``backend``            ``COLAR_BACKEND``           ``--backend sqlite|postgres``
``db_url``             ``COLAR_DB_URL``            ``--db-url URL``
``db_prefix``          ``COLAR_DB_PREFIX``         ``--db-prefix NAME``
``mlflow_auth``        ``COLAR_MLFLOW_AUTH``       ``--mlflow-auth none|basic-auth``
``host``               ``COLAR_SERVER_HOST``       ``--host ADDRESS``
=====================  ==========================  =========================================

Binding (``host``): 127.0.0.1 unless asked. An address that is not loopback (another interface's, or
``0.0.0.0``: all of them) is taken only with authentication on both servers (:func:`bind_problems`):
MLflow basic auth with its credentials, and a Prefect API auth string (:func:`prefect_server_auth`:
``PREFECT_API_AUTH_STRING``, what Prefect's clients send; Prefect's own ``PREFECT_SERVER_API_AUTH_STRING``
wins for the server if set). Asked without it, colar refuses before any server starts, naming what is
missing. The auth string travels only in environments, like the MLflow password.

This module imports neither mlflow nor prefect; ``psycopg2`` only when it creates or drops a database.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
import secrets
import urllib.parse
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from pydantic import Field, ValidationError, field_validator, model_validator

from colar_core.config import ConfigError, StrictModel
from colar_core.files import atomic_write_bytes, atomic_write_text
from colar_infra.secrets import mask_url

__all__ = [
    "DatabaseError",
    "MLFLOW_PG_DRIVER",
    "PREFECT_PG_DRIVER",
    "PgServer",
    "PrefixOwnedError",
    "ServerSettings",
    "create_database",
    "drop_database",
    "ensure_databases",
    "bind_problems",
    "check_bind",
    "is_loopback",
    "mlflow_auth_setup",
    "prefect_server_auth",
]

#: Environment variable of each :class:`ServerSettings` field.
ENV_VARS = {
    "backend": "COLAR_BACKEND",
    "db_url": "COLAR_DB_URL",
    "db_prefix": "COLAR_DB_PREFIX",
    "mlflow_auth": "COLAR_MLFLOW_AUTH",
    "host": "COLAR_SERVER_HOST",
}
#: The flag of each field, for error messages.
FLAGS = {"backend": "--backend", "db_url": "--db-url", "db_prefix": "--db-prefix", "mlflow_auth": "--mlflow-auth",
         "host": "--host"}
#: Where a server is bound when no host is asked for.
DEFAULT_HOST = "127.0.0.1"
#: Prefect's variables for the API auth string: what its clients send, and what its server requires.
PREFECT_CLIENT_AUTH_ENV, PREFECT_SERVER_AUTH_ENV = "PREFECT_API_AUTH_STRING", "PREFECT_SERVER_API_AUTH_STRING"
_HOST_NAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")
#: Seconds to wait for the PostgreSQL server when colar creates or drops a database.
CONNECT_TIMEOUT_S = 5
#: SQLAlchemy URL schemes of the two servers' drivers. A bare ``postgresql://`` means psycopg 3 to
#: SQLAlchemy 2.1, which is not installed: MLflow gets psycopg2 (pinned) named explicitly.
MLFLOW_PG_DRIVER, PREFECT_PG_DRIVER = "postgresql+psycopg2", "postgresql+asyncpg"
#: The databases colar keeps on a PostgreSQL server, by role: ``<db_prefix>_<suffix>``.
DATABASE_SUFFIXES = {"mlflow": "mlflow", "prefect": "prefect", "mlflow_auth": "mlflow_auth"}


class DatabaseError(RuntimeError):
    """The PostgreSQL server cannot be reached, or refused to create or drop a database."""


class ServerSettings(StrictModel):
    """How colar starts its local servers. ``None`` fields mean "not asked for": a running server is
    reused whatever it was started with, and a new one gets the default."""

    backend: Optional[Literal["sqlite", "postgres"]] = Field(
        None, description="Where the servers store runs and flow runs: SQLite files in the colar home "
        "(the default) or databases on the PostgreSQL server `db_url`. A `db_url` alone means postgres.")
    db_url: Optional[str] = Field(
        None, description="PostgreSQL server URL, `postgresql://USER[:PASSWORD]@HOST[:PORT][/DB]` (a password "
        "may also be a `?password=` parameter, as libpq reads it); DB (default `postgres`) is where colar connects "
        "to create its own databases. Backend postgres only.")
    db_prefix: str = Field(
        "colar", pattern=r"^[a-z_][a-z0-9_]{0,40}$",
        description="Names of the databases colar creates: `<db_prefix>_mlflow`, `<db_prefix>_prefect`, "
        "`<db_prefix>_mlflow_auth` (lower-case letters, digits, `_`). A prefix belongs to the colar home that "
        "first used it on a server; another home is refused.")
    mlflow_auth: Optional[Literal["none", "basic-auth"]] = Field(
        None, description="`basic-auth`: MLflow's basic-auth app; its admin is MLFLOW_TRACKING_USERNAME / "
        "MLFLOW_TRACKING_PASSWORD, which the pipeline's client sends. Default `none`.")
    host: Optional[str] = Field(
        None, description="The address both servers are bound to (default 127.0.0.1): an IPv4 address of this "
        "machine, a name that resolves to one, or 0.0.0.0 (every interface). One that is not loopback needs "
        "mlflow_auth basic-auth and a Prefect API auth string (PREFECT_API_AUTH_STRING); asked without them, "
        "colar refuses. A running server is reused wherever it is bound unless a host is asked for.")

    @field_validator("host")
    @classmethod
    def _bind_address(cls, host: Optional[str]) -> Optional[str]:
        if host is None:
            return None
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            if not _HOST_NAME.fullmatch(host):
                raise ValueError(f"{host!r} is neither an IPv4 address nor a host name") from None
            return host
        if address.version != 4:
            raise ValueError(f"{host}: an IPv4 address (the servers are bound over IPv4)")
        return host

    @field_validator("db_url")
    @classmethod
    def _postgres_url(cls, url: Optional[str]) -> Optional[str]:
        if url is None:
            return None
        PgServer.parse(url)  # ValueError names what is wrong, without the password
        return url

    @model_validator(mode="after")
    def _backend_matches_url(self) -> "ServerSettings":
        if self.backend == "postgres" and self.db_url is None:
            raise ValueError("backend postgres needs db_url (--db-url or $COLAR_DB_URL), e.g. "
                             "postgresql://postgres@127.0.0.1:5432")
        if self.backend == "sqlite" and self.db_url is not None:
            raise ValueError("db_url is for backend postgres; backend sqlite keeps its files in the colar home")
        return self

    @classmethod
    def from_env(cls, **given: Optional[str]) -> "ServerSettings":
        """Settings from the ``COLAR_*`` variables, overridden by the ``given`` values that are not None.
        A bad value is a :class:`ConfigError` naming the field, its flag and its variable."""
        values = {name: os.environ.get(var) or None for name, var in ENV_VARS.items()}
        values.update({k: v for k, v in given.items() if v is not None})
        values = {k: v for k, v in values.items() if v is not None}
        try:
            return cls(**values)
        except ValidationError as err:
            problems = []
            for e in err.errors():
                name = str(e["loc"][0]) if e["loc"] else ""
                where = f"{name} ({FLAGS[name]} / ${ENV_VARS[name]})" if name in FLAGS else "server settings"
                problems.append(f"{where}: {mask_url(e['msg'].removeprefix('Value error, '))}")
            raise ConfigError("; ".join(problems)) from None

    @property
    def effective_backend(self) -> str:
        """The backend a new server gets."""
        if self.backend:
            return self.backend
        return "postgres" if self.db_url else "sqlite"

    @property
    def effective_auth(self) -> str:
        return self.mlflow_auth or "none"

    @property
    def effective_host(self) -> str:
        """The address a new server is bound to."""
        return self.host or DEFAULT_HOST

    @property
    def pg(self) -> Optional["PgServer"]:
        """The PostgreSQL server, for backend postgres."""
        return PgServer.parse(self.db_url) if self.effective_backend == "postgres" and self.db_url else None

    def database(self, role: str) -> str:
        """Name of the database of ``role`` (``mlflow``, ``prefect``, ``mlflow_auth``)."""
        return f"{self.db_prefix}_{DATABASE_SUFFIXES[role]}"


@dataclass(frozen=True)
class PgServer:
    """A PostgreSQL server from a ``postgresql://`` URL. The password is read where libpq reads it (the
    userinfo, ``user:PASSWORD@``, or a ``password=`` query parameter, which wins; both percent-decoded);
    :meth:`url` never contains it (``query`` is the URL's query without ``password=``): it travels as
    ``PGPASSWORD`` (:meth:`env`)."""

    host: str
    port: int
    user: str
    maintenance_db: str = "postgres"
    password: Optional[str] = field(default=None, repr=False)
    query: str = ""

    @classmethod
    def parse(cls, url: str) -> "PgServer":
        """Errors describe what is wrong without echoing ``url``: a malformed one cannot be masked."""
        parts = urllib.parse.urlsplit(url)
        scheme = parts.scheme.split("+", 1)[0]
        if scheme not in ("postgresql", "postgres"):
            raise ValueError(f"db_url must start with postgresql:// (not {parts.scheme or 'no scheme'}://)")
        if not parts.hostname:
            raise ValueError("db_url names no host (a password with '/', '@' or ':' must be percent-encoded)")
        try:
            port = parts.port or 5432
        except ValueError:
            raise ValueError("db_url has a bad port "
                             "(a password with '/', '@' or ':' must be percent-encoded)") from None
        db = urllib.parse.unquote(parts.path.lstrip("/")) or "postgres"
        if "/" in db:
            raise ValueError("db_url: one database name at most after the host")
        password = urllib.parse.unquote(parts.password) if parts.password is not None else None
        query_password, query = _take_password(parts.query)
        if query_password is not None:  # libpq: a `password=` parameter wins over the userinfo's
            password = query_password
        return cls(host=parts.hostname, port=port, user=urllib.parse.unquote(parts.username or "postgres"),
                   maintenance_db=db, password=password or None, query=query)

    def url(self, database: str, driver: str = "postgresql") -> str:
        """``driver://user@host:port/database`` (no password)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        query = f"?{self.query}" if self.query else ""
        return f"{driver}://{urllib.parse.quote(self.user, safe='')}@{host}:{self.port}/{database}{query}"

    def env(self) -> dict[str, str]:
        """Environment a server process needs to log in: ``PGPASSWORD`` when the URL had a password."""
        return {"PGPASSWORD": self.password} if self.password else {}

    def _connect(self, database: Optional[str] = None):
        try:
            import psycopg2
        except ImportError as err:  # pragma: no cover - a pinned dependency
            raise DatabaseError(f"backend postgres needs psycopg2 (pip install psycopg2-binary): {err}") from None
        try:
            conn = psycopg2.connect(host=self.host, port=self.port, user=self.user, password=self.password,
                                    dbname=database or self.maintenance_db, connect_timeout=CONNECT_TIMEOUT_S)
        except psycopg2.Error as err:
            detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            if self.password:
                detail = detail.replace(self.password, "***")
            raise DatabaseError(f"PostgreSQL at {self.url(database or self.maintenance_db)} cannot be reached: "
                                f"{detail}") from None
        conn.autocommit = True  # CREATE / DROP DATABASE cannot run in a transaction
        return conn

    def exists(self, name: str) -> bool:
        conn = self._connect()
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                return cur.fetchone() is not None
        finally:
            conn.close()


def _take_password(query: str) -> tuple[Optional[str], str]:
    """``(password, rest)`` of a URL's query as libpq reads it: the value of its last ``password``
    parameter (name and value percent-decoded, ``+`` kept as it is; None if there is none) and the
    other parameters as they were written."""
    password, rest = None, []
    for item in query.split("&"):
        name, _, value = item.partition("=")
        if urllib.parse.unquote(name) == "password":
            password = urllib.parse.unquote(value)
        elif item:
            rest.append(item)
    return password, "&".join(rest)


_DB_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def _check_name(name: str) -> str:
    if not _DB_NAME.fullmatch(name):
        raise DatabaseError(f"database name {name!r}: lower-case letters, digits and _ only, at most 63")
    return name


def create_database(pg: PgServer, name: str) -> bool:
    """Create database ``name`` on ``pg`` unless it exists; True if it was created. Two colar processes
    creating it at once are fine (the loser sees it exists)."""
    import psycopg2
    from psycopg2 import errors, sql

    conn = pg._connect()
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (_check_name(name),))
            if cur.fetchone() is not None:
                return False
            try:
                cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
            except (errors.DuplicateDatabase, errors.UniqueViolation):
                return False
            except psycopg2.Error as err:
                raise DatabaseError(f"cannot create database {name} on {pg.url(name)}: "
                                    f"{str(err).strip().splitlines()[0]}") from None
            return True
    finally:
        conn.close()


def drop_database(pg: PgServer, name: str) -> bool:
    """Drop database ``name`` (closing its connections); True if it existed. For tests and clean-ups:
    colar itself never drops a database."""
    import psycopg2
    from psycopg2 import sql

    conn = pg._connect()
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (_check_name(name),))
            if cur.fetchone() is None:
                return False
            try:
                cur.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))
            except psycopg2.Error as err:
                raise DatabaseError(f"cannot drop database {name} on {pg.url(name)}: "
                                    f"{str(err).strip().splitlines()[0]}") from None
            return True
    finally:
        conn.close()


class PrefixOwnedError(DatabaseError):
    """The databases of a prefix belong to another colar home."""


#: The line of a database's comment that names the colar home owning it (other lines are left as they are).
_OWNER_LINE = re.compile(r"^colar home ([0-9a-f]{32}) at (.*)$", re.MULTILINE)


def _owner_lock_key(prefix: str) -> int:
    """The PostgreSQL advisory lock that serialises claims of ``prefix`` (a signed 64-bit number)."""
    return int.from_bytes(hashlib.sha256(f"colar db prefix {prefix}".encode()).digest()[:8], "big", signed=True)


def _with_owner(comment: Optional[str], line: str) -> str:
    """``comment`` with its owner line replaced by ``line`` (lines someone else wrote are kept)."""
    kept = [x for x in (comment or "").splitlines() if x.strip() and not _OWNER_LINE.fullmatch(x)]
    return "\n".join([*kept, line])


def ensure_databases(settings: ServerSettings, roles: tuple[str, ...], home: Path) -> dict[str, str]:
    """Create the databases of ``roles`` that are missing, as the colar home ``home``'s; returns
    ``{role: database name}``.

    The databases of a prefix belong to one colar home: the MLflow runs in ``<prefix>_mlflow`` have their
    artifacts in that home, which no other home can read. Its owner is recorded as the comment of each
    database (``COMMENT ON DATABASE ... IS 'colar home <id> at <host>:<path>'``, :func:`colar_infra.home.home_id`;
    MLflow's and Prefect's tables are not touched, and dropping the databases frees the prefix). A prefix
    whose databases name another home is refused (:class:`PrefixOwnedError`, before anything is created);
    databases without an owner record (made by hand or by an older colar) are claimed, with a warning.
    Claims of one prefix are serialised by an advisory lock on the maintenance database.
    """
    pg = settings.pg
    if pg is None:
        return {}
    import psycopg2
    from psycopg2 import sql

    from colar_infra.home import home_id, home_place

    names = {role: settings.database(role) for role in roles}
    try:
        me, here = home_id(home), home_place(home)
    except (OSError, ValueError) as err:
        raise DatabaseError(f"the colar home's identity, which backend postgres records as the owner of its "
                            f"databases: {err}") from None
    line = f"colar home {me} at {here}"
    every = [settings.database(role) for role in DATABASE_SUFFIXES]
    conn = pg._connect()
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT pg_advisory_lock(%s)", (_owner_lock_key(settings.db_prefix),))  # until close
            cur.execute("SELECT datname, shobj_description(oid, 'pg_database') FROM pg_database "
                        "WHERE datname = ANY(%s)", (every,))
            comments: dict[str, Optional[str]] = dict(cur.fetchall())
            others = {}
            for name, comment in comments.items():
                owner = _OWNER_LINE.search(comment or "")
                if owner and owner.group(1) != me:
                    others[name] = owner.group(2)
            if others:
                listed = ", ".join(sorted(others))
                owner_place = others[sorted(others)[0]]
                owner_host, _, owner_path = owner_place.partition(":")
                free = (f"`COMMENT ON DATABASE {listed} IS NULL`" if len(others) == 1
                        else f"`COMMENT ON DATABASE <name> IS NULL` on each of {listed}")
                raise PrefixOwnedError(
                    f"database prefix {settings.db_prefix!r} on {pg.url(pg.maintenance_db)} belongs to another "
                    f"colar home, {owner_place} (recorded on {listed}); this home is {here}. The runs there have "
                    f"their artifacts in that home, where this one cannot read them. Use another prefix "
                    f"(--db-prefix NAME or $COLAR_DB_PREFIX) or that home (COLAR_HOME={owner_path} on {owner_host}); "
                    f"if that home is gone for good, {free} frees the prefix.")
            claimed = []
            for name in names.values():
                created = create_database(pg, name)
                comment = comments.get(name)
                owner = _OWNER_LINE.search(comment or "")
                if owner and owner.group(0) == line:
                    continue
                try:  # the owner of a database (colar's user, which made it) may comment on it
                    cur.execute(sql.SQL("COMMENT ON DATABASE {} IS {}").format(
                        sql.Identifier(name), sql.Literal(_with_owner(comment, line))))
                except psycopg2.Error as err:
                    warnings.warn(f"cannot record this colar home ({here}) as the owner of database {name}: "
                                  f"{str(err).strip().splitlines()[0]}; another colar home using prefix "
                                  f"{settings.db_prefix!r} on this server will not be refused",
                                  RuntimeWarning, stacklevel=2)
                    continue
                if not created and owner is None:
                    claimed.append(name)
            if claimed:
                warnings.warn(f"database {', '.join(claimed)} had no owner record (made by hand or by an older colar): "
                              f"recorded as this colar home's ({here}); another colar home using prefix "
                              f"{settings.db_prefix!r} on this server is now refused", RuntimeWarning, stacklevel=2)
    finally:
        conn.close()  # ends the session: releases the advisory lock
    return names


# --------------------------------------------------------------------------------------------
# MLflow basic auth

#: MLflow's own variables for the admin user and the key that signs its CSRF tokens.
ADMIN_USER_ENV, ADMIN_PASSWORD_ENV = "MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD"
SECRET_KEY_ENV = "MLFLOW_FLASK_SERVER_SECRET_KEY"
CLIENT_USER_ENV, CLIENT_PASSWORD_ENV = "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"
#: What a user other than the admin may do with an experiment nobody granted them (MLflow's default).
DEFAULT_PERMISSION = "READ"


def client_credentials() -> Optional[tuple[str, str]]:
    """``(MLFLOW_TRACKING_USERNAME, MLFLOW_TRACKING_PASSWORD)`` when both are set."""
    user, password = os.environ.get(CLIENT_USER_ENV), os.environ.get(CLIENT_PASSWORD_ENV)
    return (user, password) if user and password else None


def mlflow_auth_setup(state_dir: Path, settings: ServerSettings) -> tuple[dict[str, str], str]:
    """Files and environment for ``mlflow server --app-name basic-auth``: returns ``(env, user store URI)``.

    Writes ``<state_dir>/mlflow-auth.ini`` (user store, default permission, admin user name: no
    secret) and, once, ``<state_dir>/mlflow-auth-secret`` (mode 0600: the key that signs MLflow's
    CSRF tokens; ``$MLFLOW_FLASK_SERVER_SECRET_KEY`` wins if set). The admin password goes only into
    the server's environment.
    """
    creds = client_credentials()
    if creds is None:
        raise ConfigError(f"mlflow_auth basic-auth (--mlflow-auth / ${ENV_VARS['mlflow_auth']}) needs "
                          f"{CLIENT_USER_ENV} and {CLIENT_PASSWORD_ENV}: they become the MLflow server's admin "
                          "user and are what the pipeline's MLflow client sends")
    user, password = creds
    pg = settings.pg
    if pg is not None:
        store = pg.url(ensure_databases(settings, ("mlflow_auth",), state_dir)["mlflow_auth"],
                       driver=MLFLOW_PG_DRIVER)
    else:
        store = f"sqlite:///{state_dir / 'mlflow-auth.db'}"
    ini = state_dir / "mlflow-auth.ini"
    values = {"default_permission": DEFAULT_PERMISSION, "database_uri": store, "admin_username": user,
              "authorization_function": "mlflow.server.auth:authenticate_request_basic_auth"}
    # MLflow reads the file with configparser's interpolation, where '%' starts a reference: a '%' in a
    # value (user%40server in a database URL, a colar home with '%' in its path) is written '%%'
    atomic_write_text(ini, "\n".join([
        "# Written by colar (colar_infra.backends) at each start of the basic-auth MLflow server.",
        "[mlflow]",
        *(f"{name} = {value.replace('%', '%%')}" for name, value in values.items()),
        "",
    ]))
    env = {
        "MLFLOW_AUTH_CONFIG_PATH": str(ini),
        ADMIN_USER_ENV: user,
        ADMIN_PASSWORD_ENV: password,
        SECRET_KEY_ENV: os.environ.get(SECRET_KEY_ENV) or _flask_secret(state_dir),
        **(pg.env() if pg is not None else {}),
    }
    return env, store


def _flask_secret(state_dir: Path) -> str:
    path = state_dir / "mlflow-auth-secret"
    if not path.exists():  # the caller holds the MLflow server's lock: no other writer
        atomic_write_bytes(path, secrets.token_hex(32).encode(), mode=0o600)
    return path.read_text().strip()


# --------------------------------------------------------------------------------------------
# binding beyond loopback


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or a name) is this machine's loopback: ``localhost`` or 127.0.0.0/8.
    Any other name counts as not loopback (what it resolves to may change), as does ``0.0.0.0``."""
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def prefect_server_auth() -> Optional[str]:
    """The auth string a Prefect server colar starts requires: ``$PREFECT_SERVER_API_AUTH_STRING`` (Prefect's
    own) if set, else ``$PREFECT_API_AUTH_STRING`` (what Prefect's clients send); None when neither is."""
    return os.environ.get(PREFECT_SERVER_AUTH_ENV) or os.environ.get(PREFECT_CLIENT_AUTH_ENV) or None


def bind_problems(settings: ServerSettings, host: Optional[str] = None, *, mlflow: bool = True,
                  prefect: bool = True) -> list[str]:
    """What is missing for binding ``host`` (default: ``settings.effective_host``), for the servers asked
    about: nothing on loopback; elsewhere MLflow basic auth with its credentials (``mlflow``) and a Prefect
    API auth string (``prefect``). Names variables, never values."""
    host = host or settings.effective_host
    if is_loopback(host):
        return []
    missing = []
    if mlflow and settings.effective_auth != "basic-auth":
        missing.append(f"MLflow basic auth ({FLAGS['mlflow_auth']} basic-auth or ${ENV_VARS['mlflow_auth']}=basic-auth)")
    if mlflow and client_credentials() is None:
        missing.append(f"${CLIENT_USER_ENV} and ${CLIENT_PASSWORD_ENV} (MLflow's admin)")
    if prefect and prefect_server_auth() is None:
        missing.append(f"${PREFECT_CLIENT_AUTH_ENV} (Prefect's API auth string)")
    return missing


def check_bind(settings: ServerSettings, host: Optional[str] = None, *, mlflow: bool = True,
               prefect: bool = True) -> None:
    """:class:`ConfigError` in one line when ``host`` is not loopback and :func:`bind_problems` finds
    authentication missing: the servers are not started on an address others reach without it."""
    host = host or settings.effective_host
    missing = bind_problems(settings, host, mlflow=mlflow, prefect=prefect)
    if missing:
        raise ConfigError(f"refusing to bind the servers to {host} (not loopback) without authentication; "
                          f"missing: {'; '.join(missing)}")
