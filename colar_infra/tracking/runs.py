"""MLflow runs of a pipeline: the parent run, one child run per stage, and how they end.

Every function names its run explicitly (``MlflowClient`` + run ids): MLflow's "active run" is per
thread and Prefect runs tasks in worker threads, so these never touch it. (The one exception in the
pipeline is the model logging in :mod:`tasks.report`, which says why.) Layout::

    parent run  (one per ``colar run``; params = the flattened pipeline config; the report's
      |          headline metrics, plot and logged model)
      +- child run, tag colar.stage=prepare
      +- child run, tag colar.stage=sft-cot      <- MlflowMetricsCallback logs loss/lr/... here
      +- child run, tag colar.stage=sft-colar
      +- child run, tag colar.stage=sft-nocot    (when the No-CoT baseline is on)
      +- child run, tag colar.stage=rl           (when RL is configured)
      +- child run, tag colar.stage=evaluate

Children carry ``mlflow.parentRunId`` (the UI nests them) and ``colar.stage``. The client is
``MlflowClient()`` unless one is passed, i.e. it follows ``MLFLOW_TRACKING_URI``.

When the tracking server is away, what a run still has to record is not lost and does not stop the
stage: metrics the training callback could not send, the artifacts a stage logs at its end
(:func:`log_or_defer`) and the run's end (:func:`ending_run`, :func:`log_metrics`) go to the run's
pending file (:mod:`colar_infra.tracking.pending`: ``<folder>/<run_id>.jsonl``). The folder is chosen,
absolute, when the parent run starts (``$COLAR_HOME/unflushed``, ``COLAR_HOME`` defaulting to
``./.colar`` under the current folder), recorded in the parent's tag ``colar.pending_dir`` and used by
every run of that pipeline, so a later change of folder does not lose the files. A server that does not
answer its ``/health`` probe within 2 s is not called at all (MLflow's own client would retry it for
minutes). The pending files of a pipeline run are sent (:func:`settle_pending`, which looks in the
recorded folder and in the current home's) when its next stage starts a child run and by ``colar retry``
from any folder (before the runs still RUNNING are ended KILLED: :func:`end_orphaned_children`).

Training runs also carry MLflow's own system metrics (``child_run(..., log_system_metrics=True)``,
:mod:`colar_infra.tracking.system_metrics`).
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Optional, Union

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, Run
from mlflow.exceptions import MlflowException

from colar_infra.health import PROBE_TIMEOUT_S, health_url, probe
from colar_infra.secrets import mask_secrets, mask_url, masked_tags
from colar_infra.tracking.params import MAX_PARAMS_PER_BATCH, flatten_params
from colar_infra.tracking.pending import (
    PENDING_DIR_TAG,
    ArtifactRecord,
    EndRecord,
    MetricRecord,
    append_records,
    apply_record,
    pending_dir,
    pending_path,
    remember_pending_dir,
    remembered_pending_dir,
    replay_pending,
)

__all__ = [
    "STAGE_TAG",
    "PARENT_TAG",
    "ORPHAN_TAG",
    "MlflowUnreachable",
    "child_run",
    "client_or_default",
    "end_orphaned_children",
    "end_run",
    "ending_run",
    "find_child_run",
    "log_metrics",
    "log_or_defer",
    "pipeline_pending_dir",
    "require_server",
    "server_answers",
    "settle_pending",
    "start_child_run",
    "start_parent_run",
    "tracking_uri_of",
]

STAGE_TAG = "colar.stage"
PARENT_TAG = "mlflow.parentRunId"
ORPHAN_TAG = "colar.end_reason"

_STATUS_ALIASES = {"COMPLETED": "FINISHED", "SUCCESS": "FINISHED", "CANCELLED": "KILLED", "CRASHED": "FAILED"}


def client_or_default(client: Optional[MlflowClient]) -> MlflowClient:
    """``client``, or a new ``MlflowClient()`` (``MLFLOW_TRACKING_URI``) when it is None."""
    return client if client is not None else MlflowClient()


# ---- is the server there? -------------------------------------------------------------------


class MlflowUnreachable(ConnectionError):
    """The tracking server does not answer (raised at once instead of MLflow's minutes of retries)."""


def tracking_uri_of(client: MlflowClient) -> str:
    """The tracking URI ``client`` talks to."""
    uri = (getattr(client, "tracking_uri", None)
           or getattr(getattr(client, "_tracking_client", None), "tracking_uri", ""))
    return str(uri or "")


def server_answers(client: Optional[MlflowClient] = None, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """Whether the tracking server of ``client`` answers its ``/health`` probe within ``timeout_s``
    (a store that is not an HTTP server, e.g. a local folder, always counts as there)."""
    url = health_url(tracking_uri_of(client_or_default(client)))
    return url is None or probe(url, timeout_s)


def require_server(client: Optional[MlflowClient], what: str) -> None:
    """Raise :class:`MlflowUnreachable` naming ``what`` if the tracking server does not answer."""
    client = client_or_default(client)
    if not server_answers(client):
        raise MlflowUnreachable(
            f"MLflow server at {mask_url(tracking_uri_of(client))} does not answer: cannot {what}. "
            "Finished stages are kept; run `colar retry <parent run>` once it is back")


# ---- what could not be sent: the run's pending file ----------------------------------------


def log_or_defer(record: Union[ArtifactRecord, EndRecord], *, client: Optional[MlflowClient] = None) -> bool:
    """Do ``record`` (an artifact to log, a run's end) now if the tracking server answers, else append it
    to the run's pending file with a warning. A call that fails while the server has gone away meanwhile
    is deferred too; one the server refuses raises. True if done now."""
    client = client_or_default(client)
    if server_answers(client):
        try:
            apply_record(client, record)
            return True
        except Exception:
            if server_answers(client):
                raise
    where = append_records(pending_path(record.run_id), [record])
    what = f"the end ({record.status})" if isinstance(record, EndRecord) else f"artifact {record.local_path}"
    warnings.warn(f"MLflow server away: {what} of run {record.run_id} kept in {where}; sent when the pipeline "
                  "next starts a stage or by `colar retry`", RuntimeWarning, stacklevel=2)
    return False


def pipeline_pending_dir(parent: Run) -> Path:
    """The pending folder of the pipeline run ``parent`` (its tag ``colar.pending_dir``; for a run started
    before that tag existed, the one this process remembers for it, else the current home's), remembered
    from now on for the parent in this process."""
    recorded = parent.data.tags.get(PENDING_DIR_TAG)
    return remember_pending_dir(recorded or pending_dir(parent.info.run_id), parent.info.run_id)


def settle_pending(parent_run_id: str, *, client: Optional[MlflowClient] = None) -> list[str]:
    """Send the pending files (:func:`~colar_infra.tracking.pending.replay_pending`) of ``parent_run_id``
    and of its child runs; return the ids of the runs whose file was sent. The files are looked for in the
    folder the parent run recorded (:func:`pipeline_pending_dir`), whatever the current folder, and in the
    current home's (files written by older versions). A file that cannot be sent is kept (a warning).
    Costs no call to the server when no pending file exists and the folder is known in this process."""
    client = client_or_default(client)
    parent: Optional[Run] = None
    recorded = remembered_pending_dir(parent_run_id)
    if recorded is None:  # a run this process did not start (`colar retry`): its tag says
        parent = client.get_run(parent_run_id)
        recorded = pipeline_pending_dir(parent)
    folders = list(dict.fromkeys([recorded, pending_dir()]))
    if not any(folder.is_dir() and any(folder.glob("*.jsonl")) for folder in folders):
        return []
    parent = parent or client.get_run(parent_run_id)
    flt = f"tags.`{PARENT_TAG}` = '{parent_run_id}'"
    run_ids = [parent_run_id] + [r.info.run_id for r in
                                 client.search_runs([parent.info.experiment_id], filter_string=flt, max_results=1000)]
    settled = []
    for run_id in run_ids:
        sent = False
        for folder in folders:
            path = folder / f"{run_id}.jsonl"
            if not path.is_file():
                continue
            try:
                replay_pending(path, client)
                sent = True
            except Exception as err:  # noqa: BLE001 - kept for the next try; it must not stop a stage
                warnings.warn(f"could not send the pending file {path}: {err!r}; kept for the next try",
                              RuntimeWarning, stacklevel=2)
        if sent:
            settled.append(run_id)
    return settled


def _experiment_id(client: MlflowClient, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException as e:  # created concurrently by another process
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise e
        return exp.experiment_id


def _log_params(client: MlflowClient, run_id: str, params: Mapping[str, Any]) -> None:
    items = [Param(k, v) for k, v in flatten_params(params).items()]
    for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
        client.log_batch(run_id, params=items[i : i + MAX_PARAMS_PER_BATCH], synchronous=True)


def log_metrics(run_id: str, metrics: Mapping[str, float], step: int = 0, *,
                client: Optional[MlflowClient] = None) -> None:
    """Log ``{name: value}`` to ``run_id`` at ``step`` in one batch, all with the same timestamp; if the
    server does not answer, they go to the run's pending file."""
    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
    client = client_or_default(client)
    if not server_answers(client):  # away: kept in the run's pending file, not lost, not waited for
        where = append_records(pending_path(run_id),
                               [MetricRecord(run_id, m.key, m.value, m.step, m.timestamp) for m in batch])
        warnings.warn(f"MLflow server away: {len(batch)} metrics of run {run_id} kept in {where}",
                      RuntimeWarning, stacklevel=2)
        return
    client.log_batch(run_id, metrics=batch)


def start_parent_run(
    experiment: str,
    run_name: str,
    tags: Optional[Mapping[str, Any]] = None,
    params: Optional[Mapping[str, Any]] = None,
    *,
    client: Optional[MlflowClient] = None,
) -> str:
    """Create the pipeline's parent run (experiment created if missing); return its run id.

    ``params`` may be nested (it goes through :func:`~colar_infra.tracking.params.flatten_params`). The run
    stays RUNNING until :func:`end_run`. Its tag ``colar.pending_dir`` records, absolute, the folder of the
    pending files of the run and its children (``$COLAR_HOME/unflushed`` as it is now).
    """
    client = client_or_default(client)
    exp_id = _experiment_id(client, experiment)
    name = None if run_name is None else mask_secrets(run_name)
    folder = pending_dir()  # absolute, now: the pipeline's runs keep to it wherever they run later
    run = client.create_run(exp_id, tags={**masked_tags(tags), PENDING_DIR_TAG: str(folder)}, run_name=name)
    remember_pending_dir(folder, run.info.run_id)
    if params:
        _log_params(client, run.info.run_id, params)
    return run.info.run_id


def start_child_run(
    parent_run_id: str,
    stage_name: str,
    params: Optional[Mapping[str, Any]] = None,
    *,
    tags: Optional[Mapping[str, Any]] = None,
    run_name: Optional[str] = None,
    client: Optional[MlflowClient] = None,
) -> str:
    """Create a stage run nested under ``parent_run_id`` (same experiment); return its run id.

    Tags: ``mlflow.parentRunId=<parent>``, ``colar.stage=<stage_name>``, plus ``tags``. The run
    name defaults to the stage name; ``params`` may be nested. A server that does not answer raises
    :class:`MlflowUnreachable` at once; pending files of the pipeline run are sent first
    (:func:`settle_pending`). The child's own pending file goes to the parent's folder
    (:func:`pipeline_pending_dir`).
    """
    client = client_or_default(client)
    require_server(client, f"start the run of stage {stage_name}")
    parent = client.get_run(parent_run_id)
    folder = pipeline_pending_dir(parent)  # the child's pending file goes where the parent's does
    settle_pending(parent_run_id, client=client)  # what an earlier stage could not send, now that it answers
    all_tags = {**masked_tags(tags), PARENT_TAG: parent_run_id, STAGE_TAG: stage_name}
    run = client.create_run(parent.info.experiment_id, tags=all_tags, run_name=mask_secrets(run_name or stage_name))
    remember_pending_dir(folder, run.info.run_id)
    if params:
        _log_params(client, run.info.run_id, params)
    return run.info.run_id


def end_run(run_id: str, status: str = "FINISHED", *, client: Optional[MlflowClient] = None) -> None:
    """Terminate ``run_id`` with ``status`` (FINISHED, FAILED or KILLED; Prefect's COMPLETED,
    CANCELLED and CRASHED are accepted and mapped)."""
    name = _STATUS_ALIASES.get(status.upper(), status.upper())
    if name not in ("FINISHED", "FAILED", "KILLED"):
        raise ValueError(f"end_run: status must be FINISHED, FAILED or KILLED, not {status!r}")
    client_or_default(client).set_terminated(run_id, status=name)


def _end_or_defer(run_id: str, status: str, client: Optional[MlflowClient]) -> None:
    log_or_defer(EndRecord(run_id, status, int(time.time() * 1000)), client=client)


@contextlib.contextmanager
def ending_run(run_id: str, *, client: Optional[MlflowClient] = None) -> Iterator[str]:
    """Yield ``run_id`` and end it with the block: FINISHED if the block completes, FAILED if it
    raises anything (KeyboardInterrupt included); the exception propagates. If the server is away
    at the end, the end (status and time) goes to the run's pending file (:func:`log_or_defer`):
    the block's result or exception is what the caller gets either way."""
    try:
        yield run_id
    except BaseException:
        try:
            _end_or_defer(run_id, "FAILED", client)
        except Exception as err:  # noqa: BLE001 - the block's own exception is the one to report
            warnings.warn(f"could not end run {run_id} FAILED: {err!r}", RuntimeWarning, stacklevel=2)
        raise
    _end_or_defer(run_id, "FINISHED", client)


@contextlib.contextmanager
def child_run(parent_run_id: str, stage_name: str, params: Optional[Mapping[str, Any]] = None, *,
              client: Optional[MlflowClient] = None, log_system_metrics: bool = False) -> Iterator[str]:
    """``with child_run(parent, "evaluate", {"eval": cfg}) as run_id:`` a stage's run
    (:func:`start_child_run`), ended FINISHED or FAILED with the block (:func:`ending_run`); with
    ``log_system_metrics``, MLflow's system metrics are logged to it while the block runs
    (:func:`~colar_infra.tracking.system_metrics.system_metrics_monitor`)."""
    # imported here: system_metrics builds on this module's server check (server_answers)
    from colar_infra.tracking.system_metrics import system_metrics_monitor

    with ending_run(start_child_run(parent_run_id, stage_name, params, client=client), client=client) as run_id:
        if log_system_metrics:
            with system_metrics_monitor(run_id, client=client):
                yield run_id
        else:
            yield run_id


def end_orphaned_children(
    parent_run_id: str, status: str = "KILLED", *, client: Optional[MlflowClient] = None
) -> list[str]:
    """Terminate the children of ``parent_run_id`` still RUNNING (their process died without
    ending them: SIGKILL, lost machine) with ``status`` and a ``colar.end_reason`` tag; return their ids.

    Call it only when no live process owns the pipeline (``colar retry`` checks that first). The
    pending files of the parent and its children are sent first (:func:`settle_pending`, from the folder
    the parent recorded, whatever the current folder): a stage that finished while the server was away
    is ended as it ended (its status and time), not KILLED. From then on this process writes the parent's
    pending records to that folder too.
    """
    client = client_or_default(client)
    settle_pending(parent_run_id, client=client)  # runs that ended while the server was away end now
    parent = client.get_run(parent_run_id)
    flt = f"tags.`{PARENT_TAG}` = '{parent_run_id}' and attributes.status = 'RUNNING'"
    ended = []
    for run in client.search_runs([parent.info.experiment_id], filter_string=flt, max_results=1000):
        client.set_tag(run.info.run_id, ORPHAN_TAG, "orphaned: its process died while the run was RUNNING; "
                       "ended when the pipeline was retried")
        end_run(run.info.run_id, status, client=client)
        ended.append(run.info.run_id)
    return ended


def find_child_run(
    parent_run_id: str,
    stage: str,
    *,
    status: Optional[str] = "FINISHED",
    client: Optional[MlflowClient] = None,
) -> Optional[Run]:
    """The newest child of ``parent_run_id`` tagged ``colar.stage=stage``, or None.

    By default only FINISHED runs count; ``status=None`` returns the newest child in any state.
    """
    client = client_or_default(client)
    parent = client.get_run(parent_run_id)
    flt = f"tags.`{PARENT_TAG}` = '{parent_run_id}' and tags.`{STAGE_TAG}` = '{stage}'"
    if status is not None:
        flt += f" and attributes.status = '{status.upper()}'"
    runs = client.search_runs(
        [parent.info.experiment_id], filter_string=flt, order_by=["attributes.start_time DESC"], max_results=1
    )
    return runs[0] if runs else None
