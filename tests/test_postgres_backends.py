"""The production backends end to end: MLflow (basic auth on) and Prefect on PostgreSQL, started by
``colar_infra.servers`` in their own colar home on fresh databases, and the tiny pipeline run through
``colar run`` against them with credentials from ``MLFLOW_TRACKING_USERNAME`` / ``_PASSWORD``.

One pipeline run serves the module: it is tracked in PostgreSQL (parent and stage runs, metrics, the
Prefect flow run), MLflow refuses requests without the credentials, and no credential (MLflow's
password, ``user:password``, the database password) appears in a param, tag, metric key, run name,
artifact, Prefect log, printed line, server record, server log or server command line.

PostgreSQL: ``$COLAR_TEST_DB_URL``, default ``postgresql://postgres@127.0.0.1:5432`` (CI runs one there;
.ci/run starts Debian's where none answers). Without it these tests FAIL saying so. With the
default URL a made-up database password is added: the local server trusts loopback and ignores it,
and the test checks it goes nowhere.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import threading
import urllib.error
import urllib.parse
import urllib.request
import uuid
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import pytest

from bench.common import ROOT
from bench.concurrent_pipelines import STAGES, bench_servers, without_server_env
from bench.pipeline_run import TINY, cli_env, colar_cmd
from colar_infra import servers
from colar_infra.backends import (
    DATABASE_SUFFIXES,
    PgServer,
    PrefixOwnedError,
    ServerSettings,
    create_database,
    drop_database,
    ensure_databases,
)
from colar_infra.home import home_id, home_place
from flows import cli
from tests.helpers import DB_URL, child_runs, require_postgres

pytestmark = pytest.mark.slow

USER = "colar-admin"
NAME = "pg-pipeline"


def _with_password(url: str, password: str, query_password: Optional[str] = None) -> str:
    """``url`` with ``password`` in its userinfo and, if given, ``query_password`` as its ``?password=``
    parameter (which libpq reads instead); ``url`` as it is when it has a password of its own."""
    parts = urllib.parse.urlsplit(url)
    if PgServer.parse(url).password:
        return url
    netloc = f"{parts.username or 'postgres'}:{password}@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    query = "&".join(q for q in (parts.query, query_password and f"password={query_password}") if q)
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc, query=query))


def _db_passwords(deployment) -> set[str]:
    """The made-up database passwords in the deployment's URL (none with $COLAR_TEST_DB_URL)."""
    return {pw for pw in (deployment["secrets"]["db_password"], deployment["secrets"]["db_query_password"])
            if pw in deployment["db_url"]}


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    """Servers on fresh databases (dropped afterwards) and one ``colar run`` of the tiny pipeline."""
    require_postgres()
    work = tmp_path_factory.mktemp("pg-backends")
    secrets_ = {"mlflow_password": f"mlpw-{uuid.uuid4().hex}", "db_password": f"dbpw-{uuid.uuid4().hex}",
                "db_query_password": f"dbqpw-{uuid.uuid4().hex}"}
    # Both places libpq takes a password from: the userinfo and a `password=` parameter (issue 22, item 9).
    db_url = DB_URL if "COLAR_TEST_DB_URL" in os.environ else _with_password(
        DB_URL, secrets_["db_password"], secrets_["db_query_password"])
    prefix = f"colar_t{os.getpid()}_{uuid.uuid4().hex[:8]}"
    settings = ServerSettings(db_url=db_url, db_prefix=prefix, mlflow_auth="basic-auth")
    creds = {"MLFLOW_TRACKING_USERNAME": USER, "MLFLOW_TRACKING_PASSWORD": secrets_["mlflow_password"]}
    saved = {k: os.environ.get(k) for k in creds}
    os.environ.update(creds)
    try:
        with bench_servers(work / "home", settings) as urls:
            # `colar run` finds the running servers itself, through the same settings as variables.
            env = cli_env(COLAR_HOME=str(work / "home"), COLAR_DB_URL=db_url, COLAR_DB_PREFIX=prefix,
                          COLAR_MLFLOW_AUTH="basic-auth", **creds)
            for var in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL"):
                env.pop(var, None)
            run = subprocess.run(colar_cmd("run", overrides=[*TINY, f"name={NAME}", f"output_dir={work / 'runs'}"]),
                                 env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
            yield {"urls": urls, "home": work / "home", "work": work, "run": run, "settings": settings,
                   "secrets": secrets_, "db_url": db_url}
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _client(deployment):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=deployment["urls"]["mlflow"])


def _parent(client):
    exp = client.get_experiment_by_name("colar")
    (parent,) = client.search_runs([exp.experiment_id], filter_string=f"attributes.run_name = '{NAME}'")
    return parent


def _prefect(api_url: str, path: str, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"{api_url}/{path}", data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310 (loopback)
        return json.loads(resp.read())


def _sql(deployment, role: str, query: str, *args):
    settings = deployment["settings"]
    conn = settings.pg._connect(settings.database(role))
    try:
        with conn.cursor() as cur:
            cur.execute(query, args)
            return cur.fetchall()
    finally:
        conn.close()


def test_the_tiny_pipeline_runs_on_postgres_backed_servers_and_is_tracked_there(deployment):
    run = deployment["run"]
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    client = _client(deployment)
    parent = _parent(client)
    assert parent.info.status == "FINISHED" and "accuracy/c1" in parent.data.metrics
    children = {r.data.tags["colar.stage"]: r for r in child_runs(client, parent.info.run_id)}
    assert set(children) == STAGES and all(r.info.status == "FINISHED" for r in children.values())
    assert len(client.get_metric_history(children["sft-colar"].info.run_id, "loss")) == 6

    # Stored in PostgreSQL, not in a SQLite file of the colar home.
    run_ids = {parent.info.run_id, *(r.info.run_id for r in children.values())}
    stored = {row[0] for row in _sql(deployment, "mlflow", "SELECT run_uuid FROM runs")}
    assert run_ids <= stored
    flow_run_id = parent.data.tags["prefect.flow_run_id"]
    assert _sql(deployment, "prefect", "SELECT state_type FROM flow_run WHERE id = %s", flow_run_id) == [("COMPLETED",)]
    assert _prefect(deployment["urls"]["prefect"], f"flow_runs/{flow_run_id}")["state_type"] == "COMPLETED"
    home = deployment["home"]
    assert not (home / "mlflow.db").exists() and not (home / "prefect" / "prefect.db").exists()
    assert any((home / "mlartifacts").rglob("*"))  # artifacts: files served by MLflow from the colar home
    records = json.loads((home / "servers.json").read_text())
    assert records["mlflow"]["backend"] == records["prefect"]["backend"] == "postgres"
    assert records["mlflow"]["auth"] == "basic-auth"


def test_mlflow_refuses_requests_without_the_credentials_and_says_which_are_wrong(deployment, monkeypatch):
    url, home = deployment["urls"]["mlflow"], deployment["home"]
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{url}/api/2.0/mlflow/experiments/search?max_results=1", timeout=10)  # noqa: S310
    assert err.value.code == 401
    with urllib.request.urlopen(f"{url}/health", timeout=10) as resp:  # the health probe needs none  # noqa: S310
        assert resp.status == 200

    with without_server_env():
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "not-the-password")
        with pytest.raises(servers.ServerError, match="refuses MLFLOW_TRACKING_USERNAME='colar-admin'") as refused:
            servers.ensure_mlflow(home, settings=deployment["settings"])
        assert "not-the-password" not in str(refused.value)
        monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
        with pytest.raises(servers.ServerError, match="asks for credentials"):
            servers.ensure_mlflow(home, settings=ServerSettings())
        # Asked for another backend, the running server is named, not silently used nor restarted.
        with pytest.raises(servers.ServerError, match="has backend postgres.*asks for backend sqlite.*colar servers stop"):
            servers.ensure_mlflow(home, settings=ServerSettings(backend="sqlite"))
    assert servers.server_status(home)["mlflow"]["healthy"]


def test_colar_servers_start_with_the_same_options_reuses_them_and_says_where_they_store(deployment):
    settings, password = deployment["settings"], deployment["secrets"]["mlflow_password"]
    env = cli_env(COLAR_HOME=str(deployment["home"]), MLFLOW_TRACKING_USERNAME=USER, MLFLOW_TRACKING_PASSWORD=password)
    for var in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL"):
        env.pop(var, None)
    out = subprocess.run(colar_cmd("servers", "start", "--backend", "postgres", "--db-url", deployment["db_url"],
                                   "--db-prefix", settings.db_prefix, "--mlflow-auth", "basic-auth"),
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"mlflow: {deployment['urls']['mlflow']} (backend postgres" in out.stdout
    assert f"/{settings.database('mlflow')}, auth basic-auth)" in out.stdout
    assert f"prefect: {deployment['urls']['prefect']} (backend postgres" in out.stdout
    for secret in {password, *_db_passwords(deployment)}:
        assert secret not in out.stdout + out.stderr


def _texts_of_the_run(deployment, download_to: Path) -> dict[str, bytes]:
    """Everything the pipeline run left where a user can read it, by where it came from."""
    from mlflow.artifacts import download_artifacts

    client, out = _client(deployment), {}
    parent = _parent(client)
    runs = [parent, *child_runs(client, parent.info.run_id)]
    for run in runs:
        d = run.data
        out[f"run {run.info.run_name}: params, tags, metric keys, name"] = json.dumps(
            [run.info.run_name, d.params, d.tags, sorted(d.metrics)]).encode()
        dst = download_to / run.info.run_id
        dst.mkdir(parents=True)
        download_artifacts(run_id=run.info.run_id, dst_path=str(dst), tracking_uri=deployment["urls"]["mlflow"])
        for f in dst.rglob("*"):
            if f.is_file():
                out[f"artifact {run.info.run_name}/{f.relative_to(dst)}"] = f.read_bytes()
    for mv in client.search_model_versions():
        out[f"model version {mv.name}/{mv.version}"] = json.dumps([mv.tags, mv.description, mv.source]).encode()

    api, flow_run_id = deployment["urls"]["prefect"], parent.data.tags["prefect.flow_run_id"]
    logs, offset = [], 0
    while True:
        page = _prefect(api, "logs/filter", {"logs": {"flow_run_id": {"any_": [flow_run_id]}}, "limit": 200,
                                             "offset": offset})
        logs += page
        offset += len(page)
        if len(page) < 200:
            break
    out["prefect flow-run logs"] = "\n".join(entry["message"] for entry in logs).encode()
    out["prefect flow run"] = json.dumps(_prefect(api, f"flow_runs/{flow_run_id}")).encode()
    out["prefect artifacts"] = json.dumps(_prefect(api, "artifacts/filter", {"limit": 200})).encode()

    run = deployment["run"]
    out["colar run stdout+stderr"] = (run.stdout + run.stderr).encode()
    home = deployment["home"]
    for f in [home / "servers.json", home / "mlflow-auth.ini", *home.glob("*.log")]:
        out[f"colar home {f.name}"] = f.read_bytes()
    for name, rec in servers.server_status(home).items():
        out[f"{name} server command line"] = Path(f"/proc/{rec['pid']}/cmdline").read_bytes()
    out["ps: the servers' processes"] = _server_ps_lines(home).encode()
    status = subprocess.run(colar_cmd("servers", "status"), env=cli_env(COLAR_HOME=str(home)), cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    out["colar servers status"] = (status.stdout + status.stderr).encode()
    return out


def _server_ps_lines(home: Path) -> str:
    """``ps`` lines (full command lines) of every process in the recorded servers' process groups."""
    groups = {str(rec["pgid"]) for rec in servers.server_status(home).values()}
    ps = subprocess.run(["ps", "-eww", "-o", "pgid=,args="], capture_output=True, text=True, check=True).stdout
    lines = [line for line in ps.splitlines() if line.split(None, 1)[0] in groups]
    assert any("mlflow" in line for line in lines) and any("prefect" in line for line in lines), ps
    return "\n".join(lines)


def test_no_credential_appears_in_runs_artifacts_logs_output_or_server_files(deployment, tmp_path, monkeypatch):
    assert deployment["run"].returncode == 0
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", USER)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", deployment["secrets"]["mlflow_password"])
    texts = _texts_of_the_run(deployment, tmp_path)
    # Everything looked at is there (a check over nothing would pass).
    assert sum(k.startswith("artifact ") for k in texts) >= 10
    assert b"MLflow parent run" in texts["prefect flow-run logs"] and b"MLflow run:" in texts["colar run stdout+stderr"]
    password = deployment["secrets"]["mlflow_password"]
    needles = {password, f"{USER}:{password}", base64.b64encode(f"{USER}:{password}".encode()).decode()}
    needles |= _db_passwords(deployment)
    if "COLAR_TEST_DB_URL" not in os.environ:
        assert len(_db_passwords(deployment)) == 2  # the userinfo's and the query string's
    leaks = [f"{where}: {needle[:6]}..." for where, data in texts.items() for needle in needles
             if needle.encode() in data]
    assert not leaks, leaks


# --------------------------------------------------------------------------------------------
# issue 22, items 9 and 12: without the pipeline run


@pytest.fixture
def fresh_prefix():
    """A database prefix of its own; its databases are dropped afterwards."""
    pg = require_postgres()
    prefix = f"colar_t{os.getpid()}_{uuid.uuid4().hex[:8]}"
    yield prefix
    for role in DATABASE_SUFFIXES:
        drop_database(pg, f"{prefix}_{role}")


def test_a_query_string_password_reaches_no_command_line_record_log_or_output(tmp_path, fresh_prefix):
    """Issue 22, item 9: `?password=` (which libpq reads) stayed in the URL every server got: the MLflow
    command line (`ps`), servers.json, mlflow.log and `colar servers start/status` showed it."""
    # the form: postgresql://postgres@127.0.0.1:5432/postgres?password=... ($COLAR_TEST_DB_URL's own
    # password, if it has one)
    secret = PgServer.parse(DB_URL).password or f"qpw-{uuid.uuid4().hex}"
    parts = urllib.parse.urlsplit(DB_URL)
    query = "&".join(q for q in (parts.query, f"password={secret}") if q)
    db_url = DB_URL if secret in DB_URL else urllib.parse.urlunsplit(
        parts._replace(path=parts.path.strip("/") and parts.path or "/postgres", query=query))
    home = tmp_path / "home"
    env = cli_env(COLAR_HOME=str(home), COLAR_DB_URL=db_url, COLAR_DB_PREFIX=fresh_prefix)
    for var in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "COLAR_BACKEND", "COLAR_MLFLOW_AUTH"):
        env.pop(var, None)
    try:
        start = subprocess.run(colar_cmd("servers", "start"), env=env, cwd=ROOT, capture_output=True, text=True,
                               timeout=300)
        assert start.returncode == 0, (start.stdout + start.stderr)[-3000:]
        status = subprocess.run(colar_cmd("servers", "status"), env=env, cwd=ROOT, capture_output=True, text=True,
                                timeout=120)
        texts = {"colar servers start": start.stdout + start.stderr, "colar servers status": status.stdout + status.stderr,
                 "ps": _server_ps_lines(home), **{f.name: f.read_text() for f in [home / "servers.json", *home.glob("*.log")]}}
        assert all(f"{fresh_prefix}_mlflow" in texts[k] for k in ("colar servers start", "ps", "servers.json"))
    finally:
        servers.stop_servers(home)
    assert [where for where, text in texts.items() if secret in text] == []
    assert f"/{fresh_prefix}_mlflow, auth none)" in start.stdout  # the other parameters stay: none here


def _other_home_message(err: str, prefix: str, owner: Path) -> None:
    assert f"database prefix '{prefix}'" in err and f"{socket.gethostname()}:{owner.resolve()}" in err
    assert "--db-prefix NAME or $COLAR_DB_PREFIX" in err and f"COLAR_HOME={owner.resolve()} on " in err


def test_a_prefix_belongs_to_the_first_colar_home_and_another_home_is_refused_before_any_server_starts(
        tmp_path, fresh_prefix, monkeypatch, capsys):
    """Issue 22, item 12: two homes with the same prefix (the default `colar` for everyone) shared one MLflow
    database while their artifacts lived in different homes: the second saw the first's runs and could not
    download their artifacts."""
    first, second = tmp_path / "first", tmp_path / "second"
    settings = ServerSettings(db_url=DB_URL, db_prefix=fresh_prefix)
    with without_server_env():
        try:
            servers.ensure_mlflow(first, settings=settings)
            for var in ("COLAR_BACKEND", "COLAR_MLFLOW_AUTH"):
                monkeypatch.delenv(var, raising=False)
            monkeypatch.setenv("COLAR_HOME", str(second))
            monkeypatch.setenv("COLAR_DB_URL", DB_URL)
            monkeypatch.setenv("COLAR_DB_PREFIX", fresh_prefix)
            code = cli.main(["servers", "start"])
            out = capsys.readouterr()
            assert code == 3, out
            assert len(out.err.strip().splitlines()) == 1 and out.err.startswith("colar servers: ")
            _other_home_message(out.err, fresh_prefix, first)
            assert not (second / "servers.json").exists()  # neither server started
            assert not PgServer.parse(DB_URL).exists(f"{fresh_prefix}_prefect")  # nor a database created
        finally:
            servers.stop_servers(second)
            servers.stop_servers(first)


def test_databases_without_an_owner_record_are_claimed_with_a_warning_and_a_moved_home_keeps_them(
        tmp_path, fresh_prefix):
    settings = ServerSettings(db_url=DB_URL, db_prefix=fresh_prefix)
    pg = settings.pg
    home = tmp_path / "home"
    home.mkdir()
    create_database(pg, f"{fresh_prefix}_mlflow")  # as colar made it before owner records
    conn = pg._connect()
    with conn.cursor() as cur:
        cur.execute(f"COMMENT ON DATABASE {fresh_prefix}_mlflow IS 'team A, ask before dropping'")
    conn.close()
    with pytest.warns(RuntimeWarning, match=f"{fresh_prefix}_mlflow had no owner record.*recorded as this colar home"):
        ensure_databases(settings, ("mlflow", "prefect"), home)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ensure_databases(settings, ("mlflow", "prefect"), home)  # its own: no warning
    comment = _comment(pg, f"{fresh_prefix}_mlflow")
    assert comment.splitlines() == ["team A, ask before dropping", f"colar home {home_id(home)} at {home_place(home)}"]
    assert (home / "home-id").stat().st_mode & 0o777 == 0o600

    moved = home.rename(tmp_path / "moved")
    ensure_databases(settings, ("mlflow",), moved)  # the same id: still its own, the record follows it
    assert _comment(pg, f"{fresh_prefix}_mlflow").endswith(f" at {home_place(moved)}")

    anew = tmp_path / "home"  # a home made anew where the first was: another id, its artifacts are gone
    anew.mkdir()
    with pytest.raises(PrefixOwnedError) as refused:
        ensure_databases(settings, ("mlflow",), anew)
    _other_home_message(str(refused.value), fresh_prefix, moved)


def test_two_homes_claiming_a_new_prefix_at_once_get_one_owner(tmp_path, fresh_prefix):
    settings = ServerSettings(db_url=DB_URL, db_prefix=fresh_prefix)
    homes = [tmp_path / "a", tmp_path / "b"]
    for home in homes:
        home.mkdir()
    barrier = threading.Barrier(2)

    def claim(home: Path) -> str:
        barrier.wait()
        try:
            ensure_databases(settings, ("mlflow", "prefect"), home)
            return "owner"
        except PrefixOwnedError:
            return "refused"

    with ThreadPoolExecutor(2) as pool:
        outcomes = list(pool.map(claim, homes))
    assert sorted(outcomes) == ["owner", "refused"]
    owner = homes[outcomes.index("owner")]
    for role in ("mlflow", "prefect"):
        assert f"colar home {home_id(owner)} at " in _comment(settings.pg, f"{fresh_prefix}_{role}")


def _comment(pg: PgServer, database: str) -> str:
    conn = pg._connect()
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = %s", (database,))
            return cur.fetchone()[0] or ""
    finally:
        conn.close()
