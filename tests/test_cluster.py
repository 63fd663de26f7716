"""Three hosts on one machine (issue 23, items 1 to 3): host A runs the PostgreSQL-backed MLflow (basic
auth) and Prefect (API auth string) servers bound to A's address on a test subnet; hosts B and C, network
namespaces whose only network is that subnet, each run a Prefect process worker of one work pool and
Debian's sshd with the test's keys (for the deepspeed launcher's pdsh). Topology and clean-up:
tests/cluster.py.

What is checked, over the network between the hosts (never loopback across hosts):

- ``colar servers start --host A`` binds both servers to A's address and nothing else: they do not answer
  on 127.0.0.1, and every socket their processes listen on is A's address;
- from B, requests without credentials are refused (401) by both servers and answered with them; the
  health endpoints (colar's probes) answer without;
- Prefect's client on B and C sends the auth string: the workers join the pool and show ONLINE; a flow
  run from B and an MLflow run from C are recorded on A;
- a run of the pipeline deployment (deployments/prefect.yaml), started on A, is run by B's worker with
  both SFT stages as two-node jobs across B and C (one gloo process per node, rendezvous on B's subnet
  address), its stage folders on a shared folder; it is tracked on A (metrics, artifacts, registered
  model) and `colar compare` on A lists it;
- a stage folder that C cannot see (on B's own storage) stops a two-node launch before any rank starts,
  naming the folder and C;
- faults (issue 23, item 4), each against one run of the same config that nothing interrupted: C's link
  pulled in the middle of a two-node stage fails it within colar's collective timeout, leaves no process of
  the launch on B or C, and Prefect's retry, once the link is back, resumes from the newest checkpoint to the
  same models and evaluation; MLflow on A unreachable from B (an nftables drop in B's namespace) while a
  stage ends loses nothing: its pending file is written on B and sent from B, every stage's metrics equal;
- the two-node stage's wall time against the same stage on one node (recorded, printed with ``-s``);
- nothing listens on B or C, or for the servers on A, anywhere but loopback and the test subnet (``ss``);
- the auth string and the MLflow password are in no command line (``ps``), no server record and no log;
- everything the harness made (namespaces, veths, bridge, processes) is gone afterwards.

Needs root and ``ip netns`` (skipped, saying so, without them), PostgreSQL on 127.0.0.1:5432 or
``$COLAR_TEST_DB_URL`` (failed, saying so, without it, as tests/test_postgres_backends.py), and for the
two-node tests Debian's openssh-server and pdsh, for the MLflow fault Debian's nftables (failed, saying so,
without them).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from bench.common import ROOT
from bench.pipeline_run import TINY, clean_env, cli_env, colar_cmd
from colar_core.procs import group_processes
from colar_infra import servers
from colar_infra.backends import DATABASE_SUFFIXES, drop_database
from tests.cluster import Cluster, require_cluster_support
from tests.helpers import DB_URL, require_postgres

pytestmark = pytest.mark.slow

USER = "colar-admin"
POOL = "colar-process"  # deployments/prefect.yaml's pool
QUEUE_C = "host-c"  # C's worker polls this queue of the pool: the pipeline deployment (queue default) goes to B
#: Variables every host gets: servers, credentials, telemetry off. The host's own folders come on top.
_SERVER_VARS = ("MLFLOW_TRACKING_URI", "PREFECT_API_URL")


def _basic(credential: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(credential.encode()).decode()}


def _status(url: str, headers: dict[str, str], body=None) -> tuple[int, bytes]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310 (the test subnet)
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def _ssh_installed() -> bool:
    return shutil.which("pdsh") is not None and (shutil.which("sshd") or Path("/usr/sbin/sshd").exists())


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Hosts A, B, C (tests/cluster.py); sshd on B and C with the test's keys where Debian's openssh-server
    and pdsh are installed (the two-node stages need them; the other tests do not)."""
    require_cluster_support()
    work = tmp_path_factory.mktemp("cluster")
    with Cluster(work, ssh=_ssh_installed()) as made:
        yield made
    assert made.leftovers() == [], made.leftovers()


def _require_ssh(cluster) -> None:
    if not cluster.ssh:
        pytest.fail("two-node stages start through the deepspeed launcher, which reaches the nodes over pdsh/ssh: "
                    "install Debian's openssh-server and pdsh (apt-get install openssh-server pdsh)")


def _two_nodes(cluster, shared: Path) -> tuple[Path, list[str]]:
    """A hostfile naming B and C (one process each) and the launcher overrides of both SFT stages:
    two nodes, rendezvous on B's subnet address."""
    hostfile = shared / "hostfile"
    hostfile.parent.mkdir(parents=True, exist_ok=True)
    hostfile.write_text("".join(f"{cluster.hosts[n].hostname} slots=1\n" for n in ("B", "C")))
    b = cluster.hosts["B"].address
    return hostfile, [f"{stage}.launcher.{k}={v}" for stage in ("sft_cot", "sft_colar")
                      for k, v in (("num_gpus", 1), ("num_nodes", 2), ("hostfile", hostfile), ("master_addr", b))]


@pytest.fixture(scope="module")
def site(cluster, tmp_path_factory):
    """Servers on A (``colar servers start --host A``, PostgreSQL, basic auth, auth string) and a Prefect
    worker on B and on C, one pool. Servers stopped and databases dropped afterwards."""
    pg = require_postgres()
    work = tmp_path_factory.mktemp("site")
    secrets_ = {"mlflow_password": f"mlpw-{uuid.uuid4().hex}", "auth": f"pfauth-{uuid.uuid4().hex}"}
    prefix = f"colar_c{uuid.uuid4().hex[:10]}"
    a = cluster.hosts["A"].address
    creds = {"MLFLOW_TRACKING_USERNAME": USER, "MLFLOW_TRACKING_PASSWORD": secrets_["mlflow_password"],
             "PREFECT_API_AUTH_STRING": secrets_["auth"]}
    home = work / "A" / "colar-home"
    env_a = cli_env(COLAR_HOME=str(home), PREFECT_HOME=str(work / "A" / "prefect-home"), **creds)
    for var in _SERVER_VARS:
        env_a.pop(var, None)
    started = time.monotonic()
    try:
        start = subprocess.run(colar_cmd("servers", "start", "--host", a, "--backend", "postgres", "--db-url", DB_URL,
                                         "--db-prefix", prefix, "--mlflow-auth", "basic-auth"),
                               env=env_a, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert start.returncode == 0, start.stdout + start.stderr
        start_s = time.monotonic() - started
        records = json.loads((home / "servers.json").read_text())
        urls = {name: rec["url"] for name, rec in records.items()}
        hosts = {}
        for name in ("B", "C"):
            hosts[name] = cli_env(MLFLOW_TRACKING_URI=urls["mlflow"], PREFECT_API_URL=urls["prefect"],
                                  PREFECT_HOME=str(work / name / "prefect-home"), COLAR_REPO=str(ROOT),
                                  COLAR_HOME=str(work / name / "colar-home"), **creds)
        pool = cluster.run("B", [*_prefect_cli(), "work-pool", "create", POOL, "--type", "process"],
                           env=hosts["B"], cwd=ROOT, timeout=180)
        assert pool.returncode == 0, pool.stdout + pool.stderr
        workers, workers_started = {}, time.monotonic()
        for name, queue in (("B", "default"), ("C", QUEUE_C)):
            workers[name] = cluster.popen(name, [*_prefect_cli(), "worker", "start", "--pool", POOL,
                                                 "--work-queue", queue, "--name", f"worker-{name.lower()}"],
                                          work / name / "worker.log", env=hosts[name], cwd=ROOT)
        yield {"urls": urls, "home": home, "work": work, "env_a": env_a, "hosts": hosts, "records": records,
               "secrets": secrets_, "start": start, "start_s": start_s, "workers": workers,
               "workers_started": workers_started, "timings": {"servers_start_s": round(start_s, 1)}}
    finally:
        servers.stop_servers(home)
        for role in DATABASE_SUFFIXES:
            drop_database(pg, f"{prefix}_{role}")


def _prefect_cli() -> list[str]:
    return [sys.executable, "-m", "prefect"]


def _workers_online(site) -> dict[str, str]:
    status, body = _status(f"{site['urls']['prefect']}/work_pools/{POOL}/workers/filter", _basic(site["secrets"]["auth"]),
                           {})
    assert status == 200, body
    return {w["name"]: w["status"] for w in json.loads(body)}


def test_the_servers_bind_only_a_test_address_and_say_so(cluster, site):
    a = cluster.hosts["A"].address
    out = site["start"].stdout
    assert f"mlflow: http://{a}:" in out and f"prefect: http://{a}:" in out, out
    assert "auth basic-auth" in out and "auth auth-string" in out, out
    for name, rec in site["records"].items():
        assert rec["host"] == a and rec["base_url"].startswith(f"http://{a}:"), rec
        # bound to A's address only: nothing answers on loopback at that port
        status = cluster.python("A", f"import socket; socket.create_connection(('127.0.0.1', {rec['port']}), timeout=3)")
        assert status.returncode != 0 and "Connection refused" in status.stderr, (name, status.stderr)


def test_from_host_b_requests_without_credentials_are_refused_and_with_them_answered(cluster, site):
    """The servers over the network from B: 401 without credentials (MLflow basic auth, Prefect's auth
    string), 200 with them; the health endpoints answer without (colar's probes)."""
    probe = (
        "import base64, json, os, urllib.error, urllib.request\n"
        "def get(url, cred=None):\n"
        "    h = {'Authorization': 'Basic ' + base64.b64encode(cred.encode()).decode()} if cred else {}\n"
        "    try:\n"
        "        with urllib.request.urlopen(urllib.request.Request(url, headers=h), timeout=10) as r:\n"
        "            return r.status\n"
        "    except urllib.error.HTTPError as e:\n"
        "        return e.code\n"
        "ml, pf = os.environ['MLFLOW_TRACKING_URI'], os.environ['PREFECT_API_URL']\n"
        "user, pw, auth = (os.environ[k] for k in ('MLFLOW_TRACKING_USERNAME', 'MLFLOW_TRACKING_PASSWORD',"
        " 'PREFECT_API_AUTH_STRING'))\n"
        "search = ml + '/api/2.0/mlflow/experiments/search?max_results=1'\n"
        "print(json.dumps({'mlflow_none': get(search), 'mlflow_wrong': get(search, user + ':wrong'),\n"
        "                  'mlflow_ok': get(search, user + ':' + pw), 'mlflow_health': get(ml + '/health'),\n"
        "                  'prefect_none': get(pf + '/admin/version'), 'prefect_wrong': get(pf + '/admin/version', 'x'),\n"
        "                  'prefect_ok': get(pf + '/admin/version', auth), 'prefect_health': get(pf + '/health')}))\n"
    )
    result = cluster.python("B", probe, env=site["hosts"]["B"])
    assert result.returncode == 0, result.stderr
    codes = json.loads(result.stdout)
    assert codes == {"mlflow_none": 401, "mlflow_wrong": 401, "mlflow_ok": 200, "mlflow_health": 200,
                     "prefect_none": 401, "prefect_wrong": 401, "prefect_ok": 200, "prefect_health": 200}, codes


def test_workers_on_b_and_c_join_one_pool_and_clients_there_are_recorded_on_a(cluster, site):
    deadline = time.monotonic() + 180
    online: dict[str, str] = {}
    while time.monotonic() < deadline:
        online = _workers_online(site)
        if online.get("worker-b") == "ONLINE" and online.get("worker-c") == "ONLINE":
            break
        assert all(p.poll() is None for p in site["workers"].values()), \
            {n: (site["work"] / n / "worker.log").read_text()[-2000:] for n in ("B", "C")}
        time.sleep(2)
    assert online == {"worker-b": "ONLINE", "worker-c": "ONLINE"}, online
    site["timings"]["workers_online_s"] = round(time.monotonic() - site["workers_started"], 1)

    # Prefect's client on B sends the auth string (a flow run), MLflow's on C its credentials (a run).
    name = f"from-b-{uuid.uuid4().hex[:8]}"
    flow = cluster.python("B", "from prefect import flow\n"
                          f"@flow(name='{name}')\ndef hello():\n    return 41 + 1\n"
                          "assert hello() == 42\n", env=site["hosts"]["B"], timeout=240)
    assert flow.returncode == 0, flow.stdout[-2000:] + flow.stderr[-3000:]
    status, body = _status(f"{site['urls']['prefect']}/flow_runs/filter", _basic(site["secrets"]["auth"]),
                           {"flows": {"name": {"any_": [name]}}})
    assert status == 200 and [r["state_type"] for r in json.loads(body)] == ["COMPLETED"], body
    run = cluster.python("C", "import mlflow, socket\n"
                         "mlflow.set_experiment('cluster-hosts')\n"
                         "with mlflow.start_run(run_name=socket.gethostname()) as r:\n"
                         "    mlflow.log_metric('from_c', 1.0)\n"
                         "print(r.info.run_id)\n", env=site["hosts"]["C"], timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    status, body = _status(f"{site['urls']['mlflow']}/api/2.0/mlflow/runs/get?run_id={run.stdout.split()[-1]}",
                           _basic(f"{USER}:{site['secrets']['mlflow_password']}"))
    assert status == 200, body
    got = json.loads(body)["run"]
    assert got["info"]["run_name"] == cluster.hosts["C"].hostname  # C's own host name
    assert got["data"]["metrics"][0]["key"] == "from_c"


def _flow_run(site, flow_run_id: str) -> dict:
    status, body = _status(f"{site['urls']['prefect']}/flow_runs/{flow_run_id}", _basic(site["secrets"]["auth"]))
    assert status == 200, body
    return json.loads(body)


def test_a_deployment_run_of_the_tiny_pipeline_runs_on_b_and_is_tracked_on_a(cluster, site):
    """deployments/prefect.yaml deployed from B; a run of the pipeline deployment started from A is picked
    up by B's worker (C's polls another queue of the pool) and writes its stage folders on the shared
    folder. Both SFT stages run as two-node jobs across B and C (the deepspeed launcher over pdsh/ssh,
    one gloo process per node, rendezvous on B's subnet address). Metrics, artifacts and the model reach
    MLflow on A over the subnet, the model is registered, and `colar compare` on A shows the run."""
    from colar_core.training.callbacks import read_metrics
    from flows.config import load_config

    _require_ssh(cluster)

    deploy = cluster.run("B", [*_prefect_cli(), "--no-prompt", "deploy", "--all", "--prefect-file",
                               "deployments/prefect.yaml"], env=site["hosts"]["B"], cwd=ROOT, timeout=300)
    assert deploy.returncode == 0, deploy.stdout[-3000:] + deploy.stderr[-3000:]
    shared = site["work"] / "shared"  # the same path on every host: what NFS would be across machines
    name = f"cluster-{uuid.uuid4().hex[:6]}"
    _, two_nodes = _two_nodes(cluster, shared)
    config = load_config(None, [*TINY, f"name={name}", f"output_dir={shared / 'runs'}", *two_nodes]
                         ).model_dump(mode="json")
    env_a = {**site["env_a"], "PREFECT_API_URL": site["urls"]["prefect"]}
    started = time.monotonic()
    run = subprocess.run([*_prefect_cli(), "deployment", "run", "colar-pipeline/colar-pipeline", "--params",
                          json.dumps({"config": config})], env=env_a, cwd=ROOT, capture_output=True, text=True,
                         timeout=180)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    flow_run_id = re.search(r"UUID:\s*([0-9a-f-]{36})", run.stdout).group(1)
    deadline, state = time.monotonic() + 900, {}
    while time.monotonic() < deadline:
        state = _flow_run(site, flow_run_id)["state"]
        if state["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            break
        time.sleep(5)
    site["timings"]["deployment_run_s"] = round(time.monotonic() - started, 1)
    logs = {n: (site["work"] / n / "worker.log").read_text(errors="replace") for n in ("B", "C")}
    assert state.get("type") == "COMPLETED", (state, logs["B"][-6000:])
    assert flow_run_id in logs["B"] and flow_run_id not in logs["C"]  # B's worker took it, C's did not
    assert any((shared / "runs").glob("sft-colar-*/model/colar_config.json"))
    b, c = cluster.hosts["B"], cluster.hosts["C"]
    for stage in ("sft-cot", "sft-colar"):
        (folder,) = (shared / "runs").glob(f"{stage}-*")
        assert read_metrics(folder / "metrics.jsonl", "start")[0]["world_size"] == 2, stage
        ckpt = sorted((folder / "checkpoints").glob("step_*"))[-1]
        assert (ckpt / "rank_00000.pt").exists() and (ckpt / "rank_00001.pt").exists(), stage
    # the launcher's lines, prefixed by pdsh with the node they come from: ranks ran on B and on C,
    # meeting at B's subnet address
    assert f"{c.hostname}: " in logs["B"] and f"{b.hostname}: " in logs["B"]
    assert f"--master_addr={b.address}" in logs["B"]

    from mlflow import MlflowClient

    os.environ.update({"MLFLOW_TRACKING_USERNAME": USER, "MLFLOW_TRACKING_PASSWORD": site["secrets"]["mlflow_password"]})
    try:
        client = MlflowClient(tracking_uri=site["urls"]["mlflow"])
        exp = client.get_experiment_by_name("colar")
        (parent,) = client.search_runs([exp.experiment_id], filter_string=f"attributes.run_name = '{name}'")
        assert parent.info.status == "FINISHED"
        assert parent.data.tags["colar.process"].startswith(cluster.hosts["B"].hostname + ":")  # run on B
        assert parent.data.tags["prefect.flow_run_id"] == flow_run_id
        children = client.search_runs([exp.experiment_id],
                                      filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
        assert any(c.data.metrics for c in children), [c.info.run_name for c in children]
        assert client.list_artifacts(parent.info.run_id)  # artifacts went to A's artifact store
        assert list((site["home"] / "mlartifacts").rglob("config.json"))
        versions = client.search_model_versions("name = 'colar-test'")
        assert any(v.run_id in {parent.info.run_id, *(c.info.run_id for c in children)} for v in versions), versions
    finally:
        os.environ.pop("MLFLOW_TRACKING_USERNAME", None)
        os.environ.pop("MLFLOW_TRACKING_PASSWORD", None)
    compare = subprocess.run(colar_cmd("compare", "--experiment", "colar", "--plot", str(site["work"] / "cmp.png")),
                             env={**site["env_a"], "MLFLOW_TRACKING_URI": site["urls"]["mlflow"]}, cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
    assert compare.returncode == 0, compare.stderr[-3000:]
    assert name in compare.stdout, compare.stdout


def test_a_host_that_cannot_see_the_stage_folder_stops_the_stage_naming_both(cluster, tmp_path):
    """The stage folder where C's sessions do not see it (``cluster.hidden["C"]``: what a folder on B's
    own disk is to C): a two-node launch from B stops before any rank starts, naming the folder and C
    (and not B, which sees it)."""
    _require_ssh(cluster)
    hostfile, _ = _two_nodes(cluster, tmp_path / "shared")
    out = cluster.hidden["C"] / "runs" / "sft-colar-0123456789ab"
    code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from colar_core.training.config import LauncherConfig\n"
        "from colar_core.training.launch import FolderNotSharedError, launch\n"
        f"out = Path({str(out)!r}); out.mkdir(parents=True)\n"
        "(out / 'job.json').write_text('{}')\n"
        f"cfg = LauncherConfig(num_gpus=1, num_nodes=2, hostfile={str(hostfile)!r}, "
        f"master_addr={cluster.hosts['B'].address!r})\n"
        "t = time.monotonic()\n"
        "try:\n"
        "    launch(out / 'job.json', cfg, record_dir=out)\n"
        "except FolderNotSharedError as err:\n"
        "    print(f'{time.monotonic() - t:.1f}s', err)\n"
        "    sys.exit(0)\n"
        "sys.exit('launched although C cannot see the folder')\n"
    )
    result = cluster.python("B", code, env=clean_env(), timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    c = cluster.hosts["C"].hostname
    assert f"stage folder {out}: host {c} cannot see it; every node must see the stage folders at the same path " \
           "(shared storage such as NFS)" in result.stdout, result.stdout
    assert f"host {cluster.hosts['B'].hostname}" not in result.stdout
    assert float(result.stdout.split("s ", 1)[0]) < 30
    assert not (out / "launcher.json").exists() and not (out / "metrics.jsonl").exists()  # no rank started
    print(f"not-shared folder: {result.stdout.strip()}")


#: The stage the link faults interrupt: sft-cot as a two-node job long enough (hundreds of gloo steps) to pull
#: a link in its middle, with colar's bounded waits short; sft-colar in one process. Retries: one, a while later.
_FAULT_TIMEOUT_S = 20
_RETRY_DELAY_S = 60


def _fault_overrides(cluster, shared: Path, name: str) -> list[str]:
    hostfile, _ = _two_nodes(cluster, shared)
    return [*TINY, f"name={name}", f"output_dir={shared / name}",
            "model.tiny.hidden_size=64", "model.tiny.num_layers=2", "data.builtin.n_train=512",
            "sft_cot.max_steps=300", "sft_cot.checkpoint_every=20", "sft_cot.batch_size=8",
            *(f"sft_cot.launcher.{k}={v}" for k, v in (
                ("num_gpus", 1), ("num_nodes", 2), ("hostfile", hostfile), ("master_addr", cluster.hosts["B"].address),
                ("collective_timeout_s", _FAULT_TIMEOUT_S))),
            "training_retries=1", f"training_retry_delay_s={_RETRY_DELAY_S}"]


def _run_on_b(cluster, site, overrides: list[str], log: Path):
    return cluster.popen("B", colar_cmd("run", overrides=overrides), log, env=site["hosts"]["B"], cwd=ROOT)


def _stage_processes(cluster, host: str) -> dict[int, str]:
    """The processes of a training launch on ``host``: the launcher's, pdsh's and ssh's, the ranks."""
    marks = ("deepspeed.launcher", "colar_core.training.sft_main", "pdsh", "ssh -o")
    return {pid: cmd for pid, cmd in cluster.namespace_processes(host).items() if any(m in cmd for m in marks)}


def _wait(predicate, timeout_s: float, every_s: float = 0.2):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if (got := predicate()):
            return got
        time.sleep(every_s)
    return predicate()


@pytest.fixture(scope="module")
def uninterrupted(cluster, site):
    """The fault tests' pipeline run from B with nothing pulled: what the faulted runs must equal."""
    _require_ssh(cluster)
    shared = site["work"] / "shared-faults"
    name = f"fault-ref-{uuid.uuid4().hex[:6]}"
    started = time.monotonic()
    proc = _run_on_b(cluster, site, _fault_overrides(cluster, shared, name), site["work"] / "fault-ref.log")
    rc = proc.wait(timeout=900)
    assert rc == 0, (site["work"] / "fault-ref.log").read_text(errors="replace")[-6000:]
    site["timings"]["fault_reference_run_s"] = round(time.monotonic() - started, 1)
    return shared / name


def test_c_pulled_mid_training_fails_the_stage_in_bounded_time_and_the_retry_resumes_to_the_same_model(
        cluster, site, uninterrupted):
    """C's link goes down while the two-node sft-cot stage trains (a checkpoint written, more to come). The
    attempt fails within the collective timeout colar sets (20 s here; torch's default is 30 min) plus the ssh
    keep-alives (a sixth of it, three missed) and the launcher's stop; no process of the launch is left on B
    or C. The link comes back; Prefect's retry (``training_retry_delay_s`` later) resumes from the newest
    checkpoint, and the run ends with the same models and evaluation as the run nothing interrupted."""
    from bench.chaos import eval_metrics, model_digests
    from colar_core.training.callbacks import read_metrics

    shared = uninterrupted.parent
    name = f"fault-link-{uuid.uuid4().hex[:6]}"
    log = site["work"] / "fault-link.log"
    baseline = {h: set(_stage_processes(cluster, h)) for h in ("B", "C")}
    assert not any(baseline.values()), baseline
    proc = _run_on_b(cluster, site, _fault_overrides(cluster, shared, name), log)
    root = shared / name
    try:
        second = _wait(lambda: sorted(root.glob("sft-cot-*/checkpoints/step_*"))[1:], 600)
        assert second, log.read_text(errors="replace")[-6000:]  # two checkpoints: the first is complete
        stage = second[0].parents[1]
        assert (stage / "launcher.json").exists() and proc.poll() is None
        cluster.set_link("C", False)
        pulled = time.monotonic()
        ended = _wait(lambda: not (stage / "launcher.json").exists(), 300, 0.5)
        failed_s = time.monotonic() - pulled
        assert ended, "the attempt did not end: " + log.read_text(errors="replace")[-6000:]
        left_b = _wait(lambda: not _stage_processes(cluster, "B"), 30) or _stage_processes(cluster, "B")
        left_c = _wait(lambda: not _stage_processes(cluster, "C"), 60) or _stage_processes(cluster, "C")
        gone_s = time.monotonic() - pulled
        cluster.set_link("C", True)
        restored_s = time.monotonic() - pulled
    finally:
        cluster.set_link("C", True)
    rc = proc.wait(timeout=900)
    text = log.read_text(errors="replace")
    site["timings"].update({"link_down_stage_failed_s": round(failed_s, 1),
                            "link_down_processes_gone_s": round(gone_s, 1), "link_restored_s": round(restored_s, 1)})
    assert left_b is True and left_c is True, (left_b, left_c)
    # the rendezvous/collective timeout, the keep-alives and the launcher's stop grace, not 30 minutes
    assert failed_s < _FAULT_TIMEOUT_S + 60, (failed_s, text[-4000:])
    assert restored_s < _RETRY_DELAY_S, "the link came back after the retry had started"
    assert rc == 0, text[-6000:]
    starts = read_metrics(stage / "metrics.jsonl", "start")
    assert len(starts) == 2 and (starts[-1].get("resumed_from") or 0) >= 20, starts
    assert model_digests(root) == model_digests(uninterrupted)
    assert eval_metrics(root) == eval_metrics(uninterrupted) is not None


def _stage_seconds(log: Path, stage: str, folder: Path) -> dict[str, float]:
    """The wall time of ``stage`` in a ``colar run`` log (its task's first log line to its "Finished in state
    Completed" line: launcher start, every rank's start-up, training, model export) and of its training alone
    (the first ``start`` record to the ``end`` record of its ``metrics.jsonl``)."""
    from colar_core.training.callbacks import read_metrics

    stamps = [line.split(" | ", 1)[0] for line in log.read_text(errors="replace").splitlines()
              if f"Task run '{stage}' - " in line and re.match(r"\d\d:\d\d:\d\d\.\d{3} \| ", line)]
    first, last = (time.strptime(s.split(".")[0], "%H:%M:%S") for s in (stamps[0], stamps[-1]))
    frac = float("0." + stamps[-1].split(".")[1]) - float("0." + stamps[0].split(".")[1])
    stage_s = (last.tm_hour * 3600 + last.tm_min * 60 + last.tm_sec) - (first.tm_hour * 3600 + first.tm_min * 60
                                                                       + first.tm_sec) + frac
    start, end = read_metrics(folder / "metrics.jsonl", "start")[0], read_metrics(folder / "metrics.jsonl", "end")[-1]
    return {"stage_s": round(stage_s, 1), "training_s": round(end["time"] - start["time"], 1)}


def test_the_two_node_stage_against_the_same_stage_on_one_node(cluster, site, uninterrupted):
    """The faults' config with sft-cot on B alone (one process, in the pipeline's own process): it runs
    through, and both wall times are recorded (the stage as the log shows it, and its training alone) for
    docs and the closing note (``pytest -s`` prints them with the listening sockets)."""
    shared = uninterrupted.parent
    name = f"one-node-{uuid.uuid4().hex[:6]}"
    overrides = [o for o in _fault_overrides(cluster, shared, name) if not o.startswith("sft_cot.launcher.")]
    log = site["work"] / "one-node.log"
    proc = _run_on_b(cluster, site, overrides, log)
    assert proc.wait(timeout=900) == 0, log.read_text(errors="replace")[-6000:]
    (one,) = (shared / name).glob("sft-cot-*")
    (two,) = uninterrupted.glob("sft-cot-*")
    from colar_core.training.callbacks import read_metrics

    assert read_metrics(one / "metrics.jsonl", "start")[0]["world_size"] == 1
    assert read_metrics(two / "metrics.jsonl", "start")[0]["world_size"] == 2
    site["timings"]["sft_cot_one_node"] = _stage_seconds(log, "sft-cot", one)
    site["timings"]["sft_cot_two_nodes"] = _stage_seconds(site["work"] / "fault-ref.log", "sft-cot", two)


@contextlib.contextmanager
def _mlflow_on_a(site):
    """An MlflowClient of A's server with the test's credentials (this process is host A)."""
    from mlflow import MlflowClient

    creds = {"MLFLOW_TRACKING_USERNAME": USER, "MLFLOW_TRACKING_PASSWORD": site["secrets"]["mlflow_password"]}
    os.environ.update(creds)
    try:
        yield MlflowClient(tracking_uri=site["urls"]["mlflow"])
    finally:
        for var in creds:
            os.environ.pop(var, None)


def _stage_metrics(client, parent_id: str) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """``{stage: {metric: [(step, value), ...]}}`` of a pipeline run's FINISHED children, timings and
    system metrics left out (what two runs of the same models must agree on), and the parent's own as
    stage ``parent``."""
    from colar_core.evaluation import without_timings

    def histories(run) -> dict[str, list[tuple[int, float]]]:
        keys = [k for k in without_timings(run.data.metrics)
                if not k.startswith("system/") and "time" not in k and "per_s" not in k]
        return {k: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, k)) for k in keys}

    exp = client.get_run(parent_id).info.experiment_id
    children = client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")
    out = {c.data.tags["colar.stage"]: histories(c) for c in children if c.info.status == "FINISHED"}
    out["parent"] = histories(client.get_run(parent_id))
    return out


def _parent_id(client, name: str) -> str:
    exp = client.get_experiment_by_name("colar")
    (parent,) = client.search_runs([exp.experiment_id], filter_string=f"attributes.run_name = '{name}'")
    assert parent.info.status == "FINISHED", parent.info.status
    return parent.info.run_id


def test_mlflow_on_a_unreachable_from_b_for_a_while_loses_nothing(cluster, site, uninterrupted):
    """From sft-cot's second checkpoint on, every packet from B to MLflow's port on A is dropped (A still
    answers C and itself): sft-cot ends while MLflow is away, so its metrics, artifacts and end go to the
    run's pending file on B. When that file is there the drop ends; the next stage's start sends it from
    B (or, if that start came first, it refused at once and Prefect's retry started it once MLflow was back).
    The run ends with every stage's metrics in MLflow equal to those of the run nothing interrupted, one
    FINISHED run per stage, and the pending file sent (renamed ``*.replayed``)."""
    from bench.chaos import model_digests

    if shutil.which("nft") is None:
        pytest.fail("the MLflow fault drops B's packets to A with an nftables rule: install Debian's nftables "
                    "(apt-get install nftables)")
    shared = uninterrupted.parent
    name = f"fault-mlflow-{uuid.uuid4().hex[:6]}"
    log = site["work"] / "fault-mlflow.log"
    pending = Path(site["hosts"]["B"]["COLAR_HOME"]) / "unflushed"
    before = set(pending.glob("*.jsonl*"))
    mlflow_port = int(site["urls"]["mlflow"].rsplit(":", 1)[1].split("/")[0])
    proc = _run_on_b(cluster, site, _fault_overrides(cluster, shared, name), log)
    root = shared / name
    second = _wait(lambda: sorted(root.glob("sft-cot-*/checkpoints/step_*"))[1:], 600)
    assert second, log.read_text(errors="replace")[-6000:]
    with cluster.dropping("B", cluster.hosts["A"].address, mlflow_port):
        blocked = time.monotonic()
        written = _wait(lambda: [p for p in pending.glob("*.jsonl") if p not in before], 300, 0.1)
        blocked_s = time.monotonic() - blocked
    rc = proc.wait(timeout=900)
    text = log.read_text(errors="replace")
    site["timings"]["mlflow_blocked_from_b_s"] = round(blocked_s, 1)
    assert written, "no pending file was written while MLflow was away: " + text[-6000:]
    assert rc == 0, text[-6000:]
    assert not list(pending.glob("*.jsonl")), list(pending.iterdir())  # every pending file sent ...
    assert {p.with_name(p.name + ".replayed") for p in written} <= set(pending.iterdir())  # ... and kept as sent
    assert model_digests(root) == model_digests(uninterrupted)
    with _mlflow_on_a(site) as client:
        got, want = _stage_metrics(client, _parent_id(client, name)), _stage_metrics(client, _parent_id(
            client, uninterrupted.name))
        exp = client.get_experiment_by_name("colar").experiment_id
        children = client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{_parent_id(client, name)}'")
    assert sorted(got) == sorted(want) and got == want, {s: sorted(got.get(s, {})) for s in want}
    assert all(c.info.status == "FINISHED" for c in children), [(c.data.tags.get("colar.stage"), c.info.status)
                                                                 for c in children]


def _server_pids(site) -> set[int]:
    return {pid for rec in site["records"].values() for pid in group_processes(rec["pgid"])}


def test_nothing_listens_beyond_loopback_and_the_test_subnet(cluster, site):
    """``ss`` in each host's namespace: B and C (workers running) listen on loopback or the subnet at
    most; on A, every socket the servers' processes listen on is A's test address."""
    deadline = time.monotonic() + 120
    while _workers_online(site) != {"worker-b": "ONLINE", "worker-c": "ONLINE"} and time.monotonic() < deadline:
        time.sleep(2)
    found = {}
    for name in ("B", "C"):
        listeners = cluster.listeners(name)
        found[name] = [x.line for x in listeners]
        assert all(cluster.allowed(name, x) for x in listeners), (name, found[name])
    pids = _server_pids(site)
    assert pids
    mine = [x for x in cluster.listeners("A") if set(x.pids) & pids]
    by_port = {rec["port"]: name for name, rec in site["records"].items()}
    found["A"] = [f"{by_port.get(x.port, '?')}: {x.line}" for x in mine]
    a = cluster.hosts["A"].address
    assert {x.port for x in mine} >= {rec["port"] for rec in site["records"].values()}, found["A"]
    assert all(x.address == a for x in mine), found["A"]
    print(json.dumps({"listening": found, "timings": site["timings"]}, indent=1))  # the evidence (pytest -s)


def test_no_secret_reaches_a_command_line_record_or_log(cluster, site):
    secrets_ = site["secrets"]
    needles = {secrets_["auth"], secrets_["mlflow_password"],
               base64.b64encode(secrets_["auth"].encode()).decode()}
    texts = {"colar servers start output": site["start"].stdout + site["start"].stderr}
    ps = subprocess.run(["ps", "-eww", "-o", "pid=,args="], capture_output=True, text=True, check=True).stdout
    worker_pids = {p.pid for p in site["workers"].values()}
    watched = _server_pids(site) | worker_pids
    texts["ps"] = "\n".join(line for line in ps.splitlines() if int(line.split(None, 1)[0]) in watched)
    assert "mlflow" in texts["ps"] and "prefect" in texts["ps"] and "worker" in texts["ps"], texts["ps"]
    home = site["home"]
    for f in [home / "servers.json", home / "mlflow-auth.ini", *home.glob("*.log"),
              *(site["work"] / n / "worker.log" for n in ("B", "C"))]:
        texts[str(f)] = f.read_text(errors="replace")
    status = subprocess.run(colar_cmd("servers", "status"), env=site["env_a"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    texts["colar servers status"] = status.stdout + status.stderr
    logs, offset = [], 0  # every log line the Prefect server holds (the deployment run's launcher output too)
    while True:
        code, body = _status(f"{site['urls']['prefect']}/logs/filter", _basic(secrets_["auth"]),
                             {"limit": 200, "offset": offset})
        assert code == 200, body
        page = json.loads(body)
        logs += [entry["message"] for entry in page]
        offset += len(page)
        if len(page) < 200:
            break
    assert logs
    texts["prefect logs"] = "\n".join(logs)
    leaks = [f"{where}: {needle[:8]}..." for where, text in texts.items() for needle in needles if needle in text]
    assert not leaks, leaks


def test_the_harness_leaves_nothing_behind(tmp_path):
    """A cluster of its own, closed after a failure inside: namespaces, links and processes are gone."""
    require_cluster_support()
    with pytest.raises(RuntimeError, match="inside"):
        with Cluster(tmp_path) as c:
            sleeper = c.popen("C", ["sleep", "300"], tmp_path / "sleep.log")
            assert c.leftovers()
            raise RuntimeError("a failure inside")
    assert c.leftovers() == []
    assert sleeper.poll() is not None
    assert not Path(f"/proc/{sleeper.pid}").exists() or sleeper.returncode is not None
