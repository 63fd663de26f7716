"""The two web UIs after a finished tiny pipeline, looked at in a real (headless) browser.

``colar run`` runs the tiny pipeline of tests/test_pipeline.py against the session's MLflow and
Prefect servers (tests/conftest.py; both serve their UI), and Debian's ``chromium`` opens the pages a
user opens: the links ``colar run`` prints (MLflow parent run, Prefect flow run) and the pages they
lead to (the registered model version, a training run's system metrics, the flow run's task runs
and artifacts, two artifacts). The test looks for text in the rendered DOM (``--dump-dom`` after
the page's scripts ran) and saves a screenshot of the MLflow parent run, of the evaluate run's
``thoughts.html`` in MLflow's artifact view and of the Prefect flow run.

Screenshots go to this test's temporary folder, and to ``$COLAR_UI_SCREENSHOTS`` when set (how
``docs/img/mlflow-parent-run.png``, ``docs/img/mlflow-thoughts.png`` and ``docs/img/prefect-flow-run.png``
were made).

Without Chromium the test fails, saying so: it never passes without having looked. It needs
Debian's binary (``apt-get install -y chromium``, as .ci/run does): no browser download works here.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import tempfile
import urllib.request
from pathlib import Path

import pytest

from bench.pipeline_run import TINY

pytestmark = pytest.mark.slow

#: What Chromium needs here: no sandbox (root in a container), no GPU, no first-run, update, sync or
#: background traffic (no network), and a fresh profile per page (``--user-data-dir``).
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--hide-scrollbars", "--mute-audio")
#: Virtual time each page gets to load and render (Chromium skips idle waits, so it is quick), then a
#: longer second try for a page that was still loading on this busy machine.
BUDGETS_MS = (20_000, 60_000)
MODEL = "colar-ui"


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail("the browser test needs Debian's chromium on PATH (`apt-get install -y chromium`; .ci/run "
                    "installs it) and found none: the UIs were NOT looked at", pytrace=False)
    return path


@pytest.fixture(scope="session")
def chromium() -> str:
    """The Chromium binary, looked for before the servers and the pipeline start (session-scoped, and
    first in the test's arguments, so it is set up before the session's servers)."""
    return _chromium()


def _run_chromium(args: list[str], url: str, tmp: Path) -> subprocess.CompletedProcess:
    profile = tempfile.mkdtemp(prefix="chromium-profile-", dir=tmp)
    try:
        return subprocess.run([_chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args, url],
                              capture_output=True, text=True, timeout=240)
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def _text(dom: str) -> str:
    """The visible text of a dumped DOM (scripts and styles dropped, tags removed, spaces collapsed)."""
    dom = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S | re.I)
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", dom)).split())


def page_text(url: str, tmp: Path, expect: list[str]) -> str:
    """The rendered text of ``url``; fails naming what of ``expect`` it does not show."""
    text, missing = "", expect
    for budget in BUDGETS_MS:
        proc = _run_chromium([f"--virtual-time-budget={budget}", "--dump-dom"], url, tmp)
        if proc.returncode != 0 or not proc.stdout.strip():
            pytest.fail(f"chromium could not render {url} (exit {proc.returncode}): {proc.stderr[-2000:]}",
                        pytrace=False)
        text = _text(proc.stdout)
        missing = [e for e in expect if e not in text]
        if not missing:
            return text
    pytest.fail(f"{url} does not show {missing}; it shows: {text[:3000]}", pytrace=False)


def screenshot(url: str, tmp: Path, name: str, size: str = "1400,1000") -> Path:
    out = tmp / "screenshots" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    proc = _run_chromium([f"--virtual-time-budget={BUDGETS_MS[0]}", f"--window-size={size}", f"--screenshot={out}"],
                         url, tmp)
    if proc.returncode != 0 or not out.is_file() or out.stat().st_size < 10_000:
        pytest.fail(f"chromium could not take a screenshot of {url} (exit {proc.returncode}): {proc.stderr[-2000:]}",
                    pytrace=False)
    if target := os.environ.get("COLAR_UI_SCREENSHOTS"):
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy(out, Path(target) / name)
    print(f"screenshot: {out}")
    return out


def _get_json(url: str):
    with urllib.request.urlopen(url, timeout=10) as resp:  # noqa: S310 - the session's local server
        return json.loads(resp.read())


def _printed(out: str, label: str) -> str:
    m = re.search(rf"^{re.escape(label)}\s+(\S+)$", out, flags=re.M)
    assert m, f"`colar run` did not print {label!r}:\n{out}"
    return m.group(1)


def test_finished_pipeline_is_visible_in_the_mlflow_and_prefect_uis(chromium, tmp_path, mlflow_server, prefect_server,
                                                                    capsys):
    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from flows.cli import main

    sets = TINY + ["name=test-ui", f"tracking.registered_model_name={MODEL}", f"output_dir={tmp_path / 'runs'}"]
    assert main(["run", *[a for s in sets for a in ("--set", s)]]) == 0
    out = capsys.readouterr().out
    mlflow_run_url, flow_run_url = _printed(out, "MLflow run:"), _printed(out, "Prefect flow run:")
    parent_id, flow_run_id = mlflow_run_url.rsplit("/", 1)[1], flow_run_url.rsplit("/", 1)[1]
    mlflow_base, prefect_base = mlflow_server.rstrip("/"), prefect_server.removesuffix("/api")
    assert mlflow_run_url.startswith(f"{mlflow_base}/#/experiments/") and flow_run_url.startswith(prefect_base)

    client = MlflowClient(mlflow_server)
    parent = client.get_run(parent_id)
    children = {r.data.tags["colar.stage"]: r for r in client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")}
    assert set(children) == {"prepare", "sft-cot", "sft-colar", "evaluate"}
    version = client.get_model_version_by_alias(MODEL, "candidate").version
    for stage in ("sft-cot", "sft-colar"):  # MLflow's system metrics on the training runs
        assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(
            children[stage].data.metrics), stage
    assert parent.data.tags["mlflow.note.content"].startswith("**colar pipeline test-ui**")

    # The Prefect UI talks to this server's API (not Prefect's default port 4200).
    settings = _get_json(f"{prefect_base}/ui-settings")
    assert settings["api_url"] == prefect_server

    # ---- MLflow ------------------------------------------------------------------------------
    page_text(mlflow_run_url, tmp_path, expect=[
        "test-ui", "Finished", "accuracy/c2", "mean_latents/c2", "accuracy/cot", "sec_per_question/c1",
        "Child runs", "prepare", "sft-cot", "sft-colar", "evaluate",  # the stage runs, linked
        "Registered models", MODEL,  # the registered model version, linked
        "colar pipeline test-ui", "CoLaR-2",  # the description: the summary and Table 1
    ])
    screenshot(mlflow_run_url, tmp_path, "mlflow-parent-run.png", size="1400,1300")
    page_text(f"{mlflow_base}/#/models/{MODEL}/versions/{version}", tmp_path,
              expect=[MODEL, f"Version {version}", "candidate", "test-ui"])
    # The evaluate run's thoughts.html (colar_core.latent_inspect): the file renders on its own, and
    # MLflow's artifact view shows it (in a sandboxed frame, whose text --dump-dom does not include)
    evaluate_id = children["evaluate"].info.run_id
    thoughts = Path(client.download_artifacts(evaluate_id, "thoughts.html", str(tmp_path)))
    page_text(thoughts.as_uri(), tmp_path, expect=[
        "colar: latent thoughts", "Question 1", "Question 3", "c = 1", "c = 2", "nearest tokens (cosine)",
        "LM head next (p)", "CoT (same model)", "CoT model", "the data's chain"])
    artifact_view = (f"{mlflow_base}/#/experiments/{parent.info.experiment_id}/runs/{evaluate_id}"
                     "/artifactPath/thoughts.html")
    page_text(artifact_view, tmp_path, expect=["evaluate", "thoughts.html", "eval_sets.json"])
    screenshot(artifact_view, tmp_path, "mlflow-thoughts.png", size="1400,1100")
    sysmetrics = page_text(
        f"{mlflow_base}/#/experiments/{parent.info.experiment_id}/runs/{children['sft-colar'].info.run_id}/system-metrics",
        tmp_path, expect=["sft-colar", "System metrics ("])
    assert int(re.search(r"System metrics \((\d+)\)", sysmetrics).group(1)) >= 2

    # ---- Prefect -----------------------------------------------------------------------------
    with get_client(sync_client=True) as pc:
        flow_run = pc.read_flow_run(flow_run_id)
        artifacts = {a.key: a for a in pc.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run.id])))}
    assert {"colar-evaluation", "colar-table1", "colar-links", "colar-progress-sft-cot",
            "colar-progress-sft-colar", "colar-thoughts"} <= set(artifacts)
    assert artifacts["colar-progress-sft-colar"].data == 100  # the training stages brought it to the end

    page_text(flow_run_url, tmp_path, expect=[flow_run.name, "Completed", "colar-pipeline"])  # the printed link
    v2 = prefect_base + (settings.get("v2_base_url") or "/v2").rstrip("/")  # Prefect's default UI
    tasks = page_text(f"{v2}/runs/flow-run/{flow_run_id}?tab=TaskRuns", tmp_path,
                      expect=[flow_run.name, "prepare", "sft-cot", "sft-colar", "evaluate", "report"])
    assert not re.search(r"\b(sft|report)-[0-9a-f]{3}\b", tasks), "task runs named by Prefect, not by stage"
    page_text(f"{v2}/runs/flow-run/{flow_run_id}?tab=Artifacts", tmp_path, expect=list(artifacts))
    screenshot(f"{v2}/runs/flow-run/{flow_run_id}?tab=Artifacts", tmp_path, "prefect-flow-run.png")
    page_text(f"{v2}/artifacts/artifact/{artifacts['colar-evaluation'].id}", tmp_path,
              expect=["colar-evaluation", "accuracy_pct", "mean_length", "CoT", "CoLaR-1", "CoLaR-2"])
    page_text(f"{v2}/artifacts/artifact/{artifacts['colar-links'].id}", tmp_path,
              expect=["Parent run", "test-ui", f"{MODEL} version {version}", "sft-colar"])
    page_text(f"{v2}/artifacts/artifact/{artifacts['colar-table1'].id}", tmp_path,
              expect=["Table 1", "test Acc (%)", "CoLaR-2"])
    page_text(f"{v2}/artifacts/artifact/{artifacts['colar-thoughts'].id}", tmp_path,
              expect=["colar-thoughts", "Question 1.", "c=1", "c=2", "CoT (same model)", "nearest vocabulary tokens"])
