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
import subprocess
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest

from bench.common import ROOT
from bench.concurrent_pipelines import STAGES, bench_servers, without_server_env
from bench.pipeline_run import TINY, cli_env, colar_cmd
from colar_infra import servers
from colar_infra.backends import PgServer, ServerSettings
from tests.helpers import DB_URL, child_runs, require_postgres

pytestmark = pytest.mark.slow

USER = "colar-admin"
NAME = "pg-pipeline"


def _with_password(url: str, password: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.password:
        return url
    netloc = f"{parts.username or 'postgres'}:{password}@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    """Servers on fresh databases (dropped afterwards) and one ``colar run`` of the tiny pipeline."""
    require_postgres()
    work = tmp_path_factory.mktemp("pg-backends")
    secrets_ = {"mlflow_password": f"mlpw-{uuid.uuid4().hex}", "db_password": f"dbpw-{uuid.uuid4().hex}"}
    db_url = DB_URL if "COLAR_TEST_DB_URL" in os.environ else _with_password(DB_URL, secrets_["db_password"])
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
    db_password = PgServer.parse(deployment["db_url"]).password
    assert password not in out.stdout + out.stderr and (not db_password or db_password not in out.stdout + out.stderr)


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
    return out


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
    db_password = PgServer.parse(deployment["db_url"]).password
    if db_password:
        needles.add(db_password)
    leaks = [f"{where}: {needle[:6]}..." for where, data in texts.items() for needle in needles
             if needle.encode() in data]
    assert not leaks, leaks
