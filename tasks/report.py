"""The ``report`` step, on the parent run: headline metrics, the accuracy-vs-length plot (a panel per
test set), the Table-1 report (``table1.md``, ``table1.png``: :mod:`tasks.table1`), and the
final model logged as an MLflow pyfunc (with its signature, an input example and the frontier of the
evaluation, :mod:`colar_core.frontier`, which a served request's budget chooses its compression factor
from) and registered; the alias ``candidate`` moves to it when the promotion gate says so
(:mod:`tasks.promotion`).

One version per pipeline run: a retry of a run whose report was interrupted after its version was
created (Ctrl-C, a lost machine) finds that version (:func:`registered_version_of_run`) and reuses it,
logging and registering nothing again. The gate reads who holds ``candidate``, decides and moves the
alias while it holds the registered model's lock (:func:`promote`,
:mod:`colar_infra.tracking.model_lock`): two runs reporting at once take turns, and the second compares
itself with the first one's result. The content digests of the evaluation sets go on the parent run
as tags (``colar.eval.digest.<set>``, and ``colar.eval.digest`` for the primary set), where a later
run's gate reads them.

What users see of it: the parent run's description in the MLflow UI (the ``mlflow.note.content`` tag:
:func:`run_description`, the headline numbers and Table 1), and in the Prefect UI the flow run's
``colar-table1`` and ``colar-links`` artifacts (:mod:`tasks.prefect_artifacts`).

The model logging is the one place in the pipeline that uses MLflow's active run (``mlflow.start_run``),
because in mlflow 3.17.2 ``mlflow.pyfunc.log_model`` takes its run from there: it has no ``run_id``
parameter, its ``model_id`` parameter does not link the model to a run (no run output, no run id in
``MLmodel``), and the lower-level ``Model.log(run_id=...)`` creates the LoggedModel in the default
experiment instead of the run's. It is safe: the active run belongs to this worker thread only, and
``start_run(run_id=parent)`` resumes the parent run for the block; leaving the block ends it
FINISHED (FAILED if logging raised), and the flow ends it for good right after the report.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature
from mlflow.models.model import ModelInfo
from mlflow.models.signature import ModelSignature
from mlflow.types.schema import ParamSchema, ParamSpec
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from colar_core.files import atomic_write_json, atomic_write_text
from colar_core.frontier import FILE_NAME as FRONTIER_FILE
from colar_core.frontier import Frontier
from colar_infra.secrets import mask_url
from colar_infra.tracking.model_lock import model_lock
from colar_infra.tracking.runs import PARENT_TAG, STAGE_TAG, log_metrics, tracking_uri_of
from tasks.plots import accuracy_vs_length_plot
from tasks.prefect_artifacts import _best_effort, links_artifact, links_markdown, table1_artifact
from tasks.promotion import Decision, decide, digest_tag
from tasks.stage_spec import stage_folder
from tasks.table1 import AVERAGE, method_label, per_set_values, setting_order, table1, table1_markdown, table1_png

PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")
DESCRIPTION_TAG = "mlflow.note.content"  # the run's description in the MLflow UI (markdown)
#: The request the logged model's input example shows: one question, the speed chosen per request.
EXAMPLE_PARAMS = {"compression_factor": 2}
#: The params of the logged model's signature: (name, MLflow type, default). None means "not given":
#: MLflow fills each param a request leaves out with its default, and the model must tell a
#: ``compression_factor`` asked for from none (then 2, unless a budget chooses: tasks.pyfunc_model).
SERVING_PARAMS = (("compression_factor", "long", None), ("latency_budget_ms", "double", None),
                  ("min_accuracy", "double", None), ("seed", "long", 0), ("max_latents", "long", 64),
                  ("sample", "boolean", False))


def run_description(metrics: Mapping[str, float], *, name: str = "", table_md: str = "",
                    model: Optional[str] = None, version: Optional[str] = None, model_uri: Optional[str] = None,
                    flow_run_url: Optional[str] = None, promotion: Optional[str] = None) -> str:
    """The parent run's description (markdown): per test set the accuracy (95 % interval) and mean
    chain length of each method, the registered model, the Prefect flow run and Table 1. Kept within
    MLflow's tag length (8000 characters; Table 1 is left out if it does not fit)."""
    sets, values = per_set_values(metrics)
    settings = sorted({st for (_, _, st) in values}, key=setting_order)
    lines = [f"**colar pipeline {name}**" if name else "**colar pipeline**", ""]
    for s in sets:
        parts = []
        for st in settings:
            acc = values.get(("accuracy", s, st))
            if acc is None:
                continue
            ci = values.get(("accuracy_ci95", s, st))
            length = values.get(("mean_latents", s, st), values.get(("mean_tokens", s, st)))
            parts.append(f"{method_label(st)} {100 * acc:.1f} %" + (f" ± {100 * ci:.1f}" if ci is not None else "")
                         + (f" (#L {length:.1f})" if length is not None else ""))
        if parts:
            lines.append(f"- {'average over sets' if s == AVERAGE else s}: " + ", ".join(parts))
    if model and version and promotion:
        lines.append(f"- model: `models:/{model}/{version}`; {promotion}")
    elif model and version:
        lines.append(f"- model: `models:/{model}@candidate` (version {version})")
    elif model_uri:
        lines.append(f"- model: `{model_uri}`")
    if flow_run_url:
        lines.append(f"- Prefect flow run: {mask_url(flow_run_url)}")
    text = "\n".join(lines) + "\n"
    with_table = text + ("\n" + table_md if table_md else "")
    return with_table if len(with_table) <= 8000 else text[:8000]


def log_colar_model(run_id: str, model_dir: str, example_question: str,
                    registered_model_name: Optional[str] = None, frontier: Optional[Frontier] = None) -> ModelInfo:
    """Log the model folder ``model_dir`` to the run ``run_id`` as the CoLaR pyfunc (model from code:
    :mod:`tasks.pyfunc_model`, artifact ``colar_model``), with its signature (input ``question``;
    params :data:`SERVING_PARAMS`; output ``answer``, ``n_latents``, ``text``, ``compression_factor``,
    ``why``, ``warning``) and an input example; register it as a new version of
    ``registered_model_name`` when one is given (no alias is set here). What :func:`report_stage`
    logs, and what ``mlflow models serve`` serves (tests/test_serving.py).

    ``frontier``: the accuracy, #L and time of each compression factor at evaluation
    (:class:`colar_core.frontier.Frontier`), logged as the artifact ``frontier`` (``frontier.json``),
    from which a request's ``latency_budget_ms`` or ``min_accuracy`` chooses the factor. None: no
    frontier; the served model then refuses a budget (HTTP 400) and serves ``compression_factor``.

    A signature param has a type and a default (``max_latents`` 64; None for the three that choose the
    factor: not given) but no maximum: the caps on one
    request (``max_latents``, and questions per request; 1024 each unless the server's environment
    sets ``COLAR_SERVE_MAX_LATENTS`` / ``COLAR_SERVE_MAX_ROWS`` or the loader's ``model_config``
    ``serve_max_latents`` / ``serve_max_rows``) belong to whoever serves the model, and are stated in
    :mod:`tasks.pyfunc_model` and in the HTTP 400 that refuses a request above one.

    Resumes ``run_id`` as this thread's active run for the call (module docstring) and leaves it
    ended FINISHED (FAILED if logging raised)."""
    example = pd.DataFrame({"question": [example_question]})
    output = pd.DataFrame({"answer": ["0"], "n_latents": [1], "text": ["Answer:0"], "compression_factor": [2],
                           "why": ["compression_factor 2 as asked"], "warning": [""]})
    # infer_signature cannot type a None default: the params are spelled out.
    inferred = infer_signature(example, output)
    signature = ModelSignature(inputs=inferred.inputs, outputs=inferred.outputs,
                               params=ParamSchema([ParamSpec(name, kind, default)
                                                   for name, kind, default in SERVING_PARAMS]))
    # The active run (this thread only): pyfunc.log_model has no run_id parameter (module docstring).
    # The input example (a question and the per-request speed) is saved with the model, with the
    # serving payload MLflow derives from it.
    with tempfile.TemporaryDirectory(prefix="colar-frontier-") as tmp:
        artifacts = {"colar_model": model_dir}
        if frontier is not None:
            path = Path(tmp) / FRONTIER_FILE
            path.write_text(frontier.to_json())
            artifacts["frontier"] = str(path)
        with mlflow.start_run(run_id=run_id, nested=False, log_system_metrics=False):
            return mlflow.pyfunc.log_model(name="colar_model", python_model=str(PYFUNC_CODE),
                                           artifacts=artifacts, signature=signature,
                                           input_example=(example, dict(EXAMPLE_PARAMS)),
                                           registered_model_name=registered_model_name)


def eval_digest_tags(set_digests: Mapping[str, str]) -> dict[str, str]:
    """The parent run's tags for the evaluation sets' content digests (``{set: digest}``, the primary
    set first): ``colar.eval.digest.<set>`` for each, and ``colar.eval.digest`` for the primary set
    (as its metrics also go without the set name): what :func:`tasks.promotion.digest_tag` names."""
    tags = {f"colar.eval.digest.{name}": digest for name, digest in set_digests.items()}
    if set_digests:
        tags["colar.eval.digest"] = next(iter(set_digests.values()))
    return tags


def registered_version_of_run(client: MlflowClient, name: str, run_id: str) -> Optional[ModelVersion]:
    """The version of ``name`` that run ``run_id`` registered (the oldest, if an earlier bug left
    several), None if it has none; a version whose registration failed does not count."""
    versions = [v for v in client.search_model_versions(f"run_id = '{run_id}'")
                if v.name == name and v.status != "FAILED_REGISTRATION"]
    return min(versions, key=lambda v: int(v.version), default=None)


def register_model(client: MlflowClient, parent_run_id: str, model_dir: str, example_question: str,
                   registered_model_name: Optional[str],
                   frontier: Optional[Frontier] = None) -> tuple[str, Optional[str]]:
    """``(model URI, version)``: the model logged to the parent run (:func:`log_colar_model`) and
    registered as a version of ``registered_model_name`` (None: not registered, no version). When the
    run already registered a version (an attempt interrupted after that, then retried), that version and
    its model are returned and nothing is logged or registered again: one version per pipeline run.
    ``frontier``: logged with the model (:func:`log_colar_model`)."""
    if registered_model_name:
        existing = registered_version_of_run(client, registered_model_name, parent_run_id)
        if existing is not None:
            return str(existing.source), str(existing.version)
    info = log_colar_model(parent_run_id, model_dir, example_question, registered_model_name, frontier=frontier)
    return info.model_uri, (str(info.registered_model_version) if registered_model_name else None)


def _promotion_decision(client: MlflowClient, name: str, parent_run_id: str, metrics: Mapping[str, float],
                        promotion: Mapping[str, Any], version: Optional[str] = None) -> Decision:
    """The gate's decision for the run ``parent_run_id`` (its ``metrics``; its set digest from its tags)
    against the model version that holds ``candidate`` now (its run's metrics and tags: the pipeline run
    that registered it). ``version``: this run's own version; if it holds ``candidate`` already (an
    earlier attempt of this run moved it), it keeps it."""
    rule, metric = promotion.get("rule", "better"), promotion.get("metric", "accuracy/c2")
    current, current_version, current_digest = None, None, None
    if rule != "always":
        try:
            held = client.get_model_version_by_alias(name, "candidate")
        except MlflowException:  # no such model or alias yet
            held = None
        if held is not None:
            current_version = str(held.version)
            if version is not None and current_version == version:
                return Decision(True, f"version {version}, this run's, holds the alias already (an earlier "
                                "attempt of this run moved it)", metric, metrics.get(metric))
            if held.run_id:
                data = client.get_run(held.run_id).data
                current, current_digest = data.metrics, data.tags.get(digest_tag(metric))
            else:
                current = {}
    new_digest = client.get_run(parent_run_id).data.tags.get(digest_tag(metric)) if current is not None else None
    return decide(metrics, current, rule=rule, metric=metric, current_version=current_version,
                  new_digest=new_digest, current_digest=current_digest)


def promote(client: MlflowClient, name: str, version: str, parent_run_id: str, metrics: Mapping[str, float],
            promotion: Mapping[str, Any], **lock_options: float) -> Decision:
    """Decide whether ``version`` of ``name`` (registered by the run ``parent_run_id``) takes the alias
    ``candidate`` (:func:`_promotion_decision`), record the decision on the run (tags
    ``colar.promotion.*``) and move the alias if so, all under the lock on ``name``
    (:func:`~colar_infra.tracking.model_lock.model_lock`; ``lock_options``: its timeouts), so no other
    run moves the alias between this one's read and its move."""
    with model_lock(client, name, owner=f"run {parent_run_id}", **lock_options) as lock:
        decision = _promotion_decision(client, name, parent_run_id, metrics, promotion, version)
        for tag, value in decision.tags().items():
            client.set_tag(parent_run_id, tag, value)
        if decision.promote:
            lock.check()  # still ours: no one broke it as stale while this run was slow
            client.set_registered_model_alias(name, "candidate", version)
    return decision


def _promotion_line(result: Mapping) -> Optional[str]:
    """One line on the promotion for the run description (None when nothing was registered)."""
    if "promoted" not in result:
        return None
    verdict = "took the alias `candidate`" if result["promoted"] else "the alias `candidate` stayed where it was"
    return f"{verdict} ({result['promotion_reason']})"


def promotion_artifact(decision: Decision, name: str, version: str) -> None:
    """The decision as the Prefect markdown artifact ``colar-promotion`` (best effort, as the others)."""
    lines = [f"### Promotion of {name} version {version}", "",
             f"**{'promoted to candidate' if decision.promote else 'candidate kept'}**: {decision.reason}", ""]
    for key, value in decision.tags().items():
        if key not in ("colar.promotion.decision", "colar.promotion.reason"):
            lines.append(f"- {key.removeprefix('colar.promotion.')}: {value}")
    _best_effort("colar-promotion", create_markdown_artifact, "\n".join(lines) + "\n", key="colar-promotion",
                 description="Whether this run's model took the alias 'candidate'")


def _flow_run_url() -> Optional[str]:
    """The Prefect UI page of the flow run this task belongs to (None outside one)."""
    try:
        from prefect.runtime import flow_run
        from prefect.settings import PREFECT_UI_URL

        flow_run_id, ui = flow_run.get_id(), PREFECT_UI_URL.value()
        return f"{ui.rstrip('/')}/runs/flow-run/{flow_run_id}" if flow_run_id and ui else None
    except Exception:  # noqa: BLE001
        return None


def _stage_runs(client: MlflowClient, parent_run_id: str, experiment_id: str) -> dict[str, str]:
    """``{stage: run id}`` of the parent's finished stage runs (the newest per stage), in start order."""
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}' and "
                              "attributes.status = 'FINISHED'", order_by=["attributes.start_time ASC"], max_results=100)
    return {r.data.tags.get(STAGE_TAG, r.info.run_name): r.info.run_id for r in runs}


@task(name="report", task_run_name="report", retries=1, retry_delay_seconds=2)
def report_stage(parent_run_id: str, metrics: dict, model_dir: str, out_dir: str,
                 registered_model_name: Optional[str], example_question: str,
                 promotion: Optional[dict] = None, set_digests: Optional[dict] = None) -> dict:
    """Log ``metrics``, the evaluation sets' digests (``set_digests``: ``{set: digest}``, primary
    first, as the evaluate stage hands them on) and the plot to the parent run; log (and register, if
    named) the model, once per run (:func:`register_model`), and move the alias ``candidate`` to it if
    the promotion gate says so (:func:`promote`; ``promotion``: the config's ``tracking.promotion``;
    None = rule 'always'; see :mod:`tasks.promotion`). The model carries its frontier, built from
    ``metrics`` (the primary set's: :meth:`colar_core.frontier.Frontier.from_metrics`), also written
    to the report folder as ``frontier.json``: what a served request's budget chooses from."""
    logger = get_run_logger()
    client = MlflowClient()
    out = stage_folder(out_dir)
    log_metrics(parent_run_id, metrics, client=client)
    for tag, value in eval_digest_tags(set_digests or {}).items():
        client.set_tag(parent_run_id, tag, value)
    plot = accuracy_vs_length_plot(metrics, out / "accuracy_vs_length.png")
    client.log_artifact(parent_run_id, str(plot), "plots")
    atomic_write_json(out / "metrics.json", metrics)
    table = table1(metrics)
    table_md = table1_markdown(table, f"Table 1 (run {parent_run_id})")
    atomic_write_text(out / "table1.md", table_md)
    table1_png(table, out / "table1.png", f"run {parent_run_id}")
    for name in ("table1.md", "table1.png"):
        client.log_artifact(parent_run_id, str(out / name))
    table1_artifact(table_md)

    frontier = Frontier.from_metrics(metrics, set_name=next(iter(set_digests or {}), None))
    if frontier is not None:
        atomic_write_text(out / FRONTIER_FILE, frontier.to_json())
    else:
        logger.warning("no compression factor has accuracy, #L and time in the metrics: the model is logged "
                       "without a frontier and serves compression_factor only (no latency_budget_ms or min_accuracy)")
    model_uri, version = register_model(client, parent_run_id, model_dir, example_question, registered_model_name,
                                        frontier)
    result: dict[str, Any] = {"model_uri": model_uri, "plot": str(plot), "table1": str(out / "table1.md")}
    if registered_model_name and version is not None:
        decision = promote(client, registered_model_name, version, parent_run_id, metrics,
                           promotion or {"rule": "always"})
        result.update(registered_model=registered_model_name, version=version, promoted=decision.promote,
                      promotion_reason=decision.reason)
        if decision.promote:
            result["alias_uri"] = f"models:/{registered_model_name}@candidate"
        promotion_artifact(decision, registered_model_name, version)
        logger.info("model registered as %s version %s; candidate %s: %s", registered_model_name, version,
                    "moved to it" if decision.promote else "kept", decision.reason)
    else:
        logger.info("model logged at %s (not registered)", model_uri)

    parent = client.get_run(parent_run_id)
    client.set_tag(parent_run_id, DESCRIPTION_TAG, run_description(
        metrics, name=parent.info.run_name or "", table_md=table_md, model=result.get("registered_model"),
        version=result.get("version"), model_uri=model_uri, flow_run_url=_flow_run_url(),
        promotion=_promotion_line(result)))
    links_artifact(links_markdown(
        tracking_uri=tracking_uri_of(client), experiment_id=parent.info.experiment_id, parent_run_id=parent_run_id,
        pipeline=parent.info.run_name or "", children=_stage_runs(client, parent_run_id, parent.info.experiment_id),
        registered_model=result.get("registered_model"), version=result.get("version"), model_uri=model_uri,
        promoted=result.get("promoted", True)))
    return result
