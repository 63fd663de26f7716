"""Server backends without servers: settings from flags and ``COLAR_*`` variables, PostgreSQL URLs that
never carry the password onwards, MLflow basic-auth files, and the dataset-insert race of a shared
tracking server. (The servers themselves on PostgreSQL: tests/test_postgres_backends.py.)"""

from __future__ import annotations

import stat
from types import SimpleNamespace

import pytest
from mlflow.exceptions import MlflowException

from colar_infra.backends import ENV_VARS, MLFLOW_PG_DRIVER, PgServer, ServerSettings, mlflow_auth_setup
from flows.cli import build_parser, server_settings
from flows.config import ConfigError

PASSWORD = "pw-Very$ecret/9"  # "/" and "$": percent-encoded in the URL


@pytest.fixture(autouse=True)
def _no_backend_env(monkeypatch):
    for var in [*ENV_VARS.values(), "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                "MLFLOW_FLASK_SERVER_SECRET_KEY"]:
        monkeypatch.delenv(var, raising=False)


def test_sqlite_is_the_default_and_a_db_url_alone_means_postgres(monkeypatch):
    plain = ServerSettings.from_env()
    assert (plain.backend, plain.effective_backend, plain.effective_auth, plain.pg) == (None, "sqlite", "none", None)
    monkeypatch.setenv("COLAR_DB_URL", "postgresql://postgres@127.0.0.1:5432")
    from_env = ServerSettings.from_env()
    assert from_env.effective_backend == "postgres" and from_env.pg.host == "127.0.0.1"
    assert from_env.database("mlflow") == "colar_mlflow" and from_env.database("prefect") == "colar_prefect"


def test_flags_win_over_the_environment(monkeypatch):
    monkeypatch.setenv("COLAR_DB_PREFIX", "fromenv")
    monkeypatch.setenv("COLAR_MLFLOW_AUTH", "basic-auth")
    args = build_parser().parse_args(["servers", "start", "--db-url", "postgresql://u@db.example:6543/admin",
                                      "--db-prefix", "team_a", "--mlflow-auth", "none"])
    settings = server_settings(args)
    assert (settings.db_prefix, settings.effective_auth, settings.effective_backend) == ("team_a", "none", "postgres")
    assert (settings.pg.port, settings.pg.maintenance_db, settings.pg.user) == (6543, "admin", "u")
    assert server_settings(build_parser().parse_args(["run"])).db_prefix == "fromenv"


@pytest.mark.parametrize("given, field", [
    (dict(backend="postgres"), "backend postgres needs db_url"),
    (dict(backend="sqlite", db_url="postgresql://u@h"), "db_url is for backend postgres"),
    (dict(db_url="mysql://u:" + PASSWORD + "@h/db"), r"db_url \(--db-url / \$COLAR_DB_URL\): db_url must start with postgresql"),
    (dict(db_url="postgresql://:" + PASSWORD + "@/db"), "names no host"),
    (dict(db_prefix="Bad-Name"), r"db_prefix \(--db-prefix / \$COLAR_DB_PREFIX\)"),
    (dict(mlflow_auth="ldap"), r"mlflow_auth \(--mlflow-auth / \$COLAR_MLFLOW_AUTH\)"),
    (dict(backend="mongo"), r"backend \(--backend / \$COLAR_BACKEND\)"),
])
def test_a_bad_setting_is_a_config_error_naming_it_without_the_password(given, field):
    with pytest.raises(ConfigError, match=field) as err:
        ServerSettings.from_env(**given)
    assert PASSWORD not in str(err.value)


def test_server_urls_leave_the_password_out_and_pass_it_as_pgpassword():
    encoded = PASSWORD.replace("$", "%24").replace("/", "%2F")
    pg = PgServer.parse(f"postgresql://colar%40team:{encoded}@db.example:5433?sslmode=require")
    assert pg.password == PASSWORD and pg.user == "colar@team"
    assert PASSWORD not in repr(pg)
    url = pg.url("colar_mlflow", driver=MLFLOW_PG_DRIVER)
    assert url == "postgresql+psycopg2://colar%40team@db.example:5433/colar_mlflow?sslmode=require"
    assert pg.env() == {"PGPASSWORD": PASSWORD}
    assert PgServer.parse("postgresql://u@h").env() == {}  # libpq's own PGPASSWORD / ~/.pgpass then apply


@pytest.mark.parametrize("url", [
    "postgresql://colar@db.example:5433/admin?password={pw}&sslmode=require",
    "postgresql://colar@db.example:5433/admin?sslmode=require&pass%77ord={pw}",   # libpq decodes names too
    "postgresql://colar:not-this-one@db.example:5433/admin?password={pw}&sslmode=require",  # the parameter wins
])
def test_a_password_in_the_query_string_is_taken_out_of_server_urls_and_passed_as_pgpassword(url):
    """Issue 22, item 9: libpq reads `?password=`; it used to stay in the query every server URL carries
    (the MLflow command line, servers.json, mlflow.log, `colar servers start` output)."""
    encoded = PASSWORD.replace("$", "%24").replace("/", "%2F")
    pg = PgServer.parse(url.format(pw=encoded))
    assert pg.password == PASSWORD and pg.env() == {"PGPASSWORD": PASSWORD}
    assert (pg.user, pg.host, pg.port, pg.maintenance_db) == ("colar", "db.example", 5433, "admin")
    assert pg.url("colar_mlflow", driver=MLFLOW_PG_DRIVER) == (
        "postgresql+psycopg2://colar@db.example:5433/colar_mlflow?sslmode=require")
    assert PASSWORD not in repr(pg) and encoded not in repr(pg) and "not-this-one" not in repr(pg)
    assert PgServer.parse("postgresql://u@h?password=").env() == {}  # empty: libpq's PGPASSWORD / ~/.pgpass apply


def test_basic_auth_needs_the_client_credentials(tmp_path):
    with pytest.raises(ConfigError, match="MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"):
        mlflow_auth_setup(tmp_path, ServerSettings(mlflow_auth="basic-auth"))


def test_basic_auth_files_hold_no_password_and_the_signing_key_is_private(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "colar-admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    env, store = mlflow_auth_setup(tmp_path, ServerSettings(mlflow_auth="basic-auth"))
    assert store == f"sqlite:///{tmp_path / 'mlflow-auth.db'}"
    ini = (tmp_path / "mlflow-auth.ini").read_text()
    assert "admin_username = colar-admin" in ini and f"database_uri = {store}" in ini and PASSWORD not in ini
    assert env["MLFLOW_AUTH_ADMIN_USERNAME"] == "colar-admin" and env["MLFLOW_AUTH_ADMIN_PASSWORD"] == PASSWORD
    assert env["MLFLOW_AUTH_CONFIG_PATH"] == str(tmp_path / "mlflow-auth.ini")
    key_file = tmp_path / "mlflow-auth-secret"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert env["MLFLOW_FLASK_SERVER_SECRET_KEY"] == key_file.read_text().strip()
    assert mlflow_auth_setup(tmp_path, ServerSettings(mlflow_auth="basic-auth"))[0] == env  # the same key again


class _RacingClient:
    """``log_inputs`` fails like MLflow's server when another run inserted the same dataset first."""

    def __init__(self, failures: int, message: str):
        self.failures, self.message, self.calls = failures, message, 0

    def log_inputs(self, run_id, datasets):
        self.calls += 1
        if self.calls <= self.failures:
            raise MlflowException(self.message)


def test_a_dataset_insert_lost_to_another_pipeline_is_linked_on_the_next_call(caplog):
    from colar_infra.tracking.artifacts import _log_inputs

    ds_input = SimpleNamespace(dataset=SimpleNamespace(name="builtin:train"))
    race = ('BAD_REQUEST: (psycopg2.errors.UniqueViolation) duplicate key value violates unique constraint '
            '"dataset_pk"')
    client = _RacingClient(1, race)
    _log_inputs(client, "run", ds_input)
    assert client.calls == 2
    assert "builtin:train" in caplog.text and "dataset insert race" in caplog.text  # bench/concurrent_pipelines counts it
    with pytest.raises(MlflowException, match="RESOURCE_DOES_NOT_EXIST"):  # any other error: raised at once
        _log_inputs(_RacingClient(1, "RESOURCE_DOES_NOT_EXIST: run"), "run", ds_input)
    stubborn = _RacingClient(5, race)
    with pytest.raises(MlflowException, match="UniqueViolation"):
        _log_inputs(stubborn, "run", ds_input)
    assert stubborn.calls == 3


def test_a_percent_in_the_user_store_or_the_admin_name_reaches_mlflow_as_written(tmp_path, monkeypatch):
    """Issue 22 item 10: `user%40server` in a database URL, or a colar home with '%' in its path, made MLflow's
    config reader fail (InterpolationSyntaxError) and the basic-auth server could not start."""
    from mlflow.server.auth.config import read_auth_config

    home = tmp_path / "50%home"
    home.mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin%40corp")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    env, store = mlflow_auth_setup(home, ServerSettings(mlflow_auth="basic-auth"))
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", env["MLFLOW_AUTH_CONFIG_PATH"])
    monkeypatch.delenv("MLFLOW_AUTH_ADMIN_USERNAME", raising=False)
    config = read_auth_config()  # MLflow's own reader
    assert config.database_uri == store == f"sqlite:///{home / 'mlflow-auth.db'}"
    assert config.admin_username == "admin%40corp"
