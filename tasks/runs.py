"""MLflow runs of a pipeline: the parent run, one child run per stage, and how they end.

Every function names its run explicitly (``MlflowClient`` + run ids): MLflow's "active run" is per
thread and Prefect runs tasks in worker threads, so these never touch it. (The one exception in the
pipeline is the model logging in :mod:`colar.tasks.report`, which says why.) Layout::

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
pending file ``$COLAR_HOME/unflushed/<run_id>.jsonl`` (``COLAR_HOME`` defaults to ``./.colar``).
A server that does not answer its ``/health`` probe within 2 s is not called at all (MLflow's own
client would retry it for minutes). The pending files of a pipeline run are sent
(:func:`settle_pending`) when its next stage starts a child run and by ``colar retry`` (before the
runs still RUNNING are ended KILLED: :func:`end_orphaned_children`); :func:`replay_pending` sends one.

Training runs also carry MLflow's own system metrics (:func:`system_metrics_monitor`: ``system/cpu_*``,
``system/system_memory_*``, disk, network, and ``system/gpu_*`` where ``pynvml`` finds a GPU), shown
in the run's "System metrics" tab. ``mlflow.enable_system_metrics_logging()`` and
``start_run(log_system_metrics=True)`` only act on runs opened with ``mlflow.start_run``, which these
are not, so the runs here start MLflow's monitor (``SystemMetricsMonitor``) on their run id themselves.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Optional, Union

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, Run, RunTag
from mlflow.exceptions import MlflowException

from colar.tasks.params import flatten_params, mask_secrets, mask_url, masked_tags

__all__ = [
    "STAGE_TAG",
    "PARENT_TAG",
    "ORPHAN_TAG",
    "MlflowUnreachable",
    "child_run",
    "client_or_default",
    "defer",
    "end_orphaned_children",
    "end_run",
    "ending_run",
    "find_child_run",
    "log_metrics",
    "log_or_defer",
    "pending_path",
    "replay_pending",
    "require_server",
    "server_answers",
    "settle_pending",
    "start_child_run",
    "start_parent_run",
    "system_metrics_monitor",
]

STAGE_TAG = "colar.stage"
PARENT_TAG = "mlflow.parentRunId"
ORPHAN_TAG = "colar.end_reason"

MAX_PARAMS_PER_BATCH = 100  # MLflow's limit of params (and of tags) in one log_batch call
MAX_METRICS_PER_BATCH = 1000  # MLflow's limit of metrics in one log_batch call
PROBE_TIMEOUT_S = 2.0  # how long the /health probe waits before the server counts as away

_STATUS_ALIASES = {"COMPLETED": "FINISHED", "SUCCESS": "FINISHED", "CANCELLED": "KILLED", "CRASHED": "FAILED"}


def client_or_default(client: Optional[MlflowClient]) -> MlflowClient:
    """``client``, or a new ``MlflowClient()`` (``MLFLOW_TRACKING_URI``) when it is None."""
    return client if client is not None else MlflowClient()


# ---- is the server there? -------------------------------------------------------------------


class MlflowUnreachable(ConnectionError):
    """The tracking server does not answer (raised at once instead of MLflow's minutes of retries)."""


def tracking_uri_of(client: MlflowClient) -> str:
    """The tracking URI ``client`` talks to."""
    uri = getattr(client, "tracking_uri", None) or getattr(getattr(client, "_tracking_client", None), "tracking_uri", "")
    return str(uri or "")


def health_url(uri: str) -> Optional[str]:
    """``<uri>/health`` without credentials for an http(s) tracking URI; None for any other store."""
    if not uri.startswith(("http://", "https://")):
        return None
    parts = urllib.parse.urlsplit(uri)
    netloc = parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path.rstrip("/") + "/health", "", ""))


def probe(url: str, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """Whether an HTTP server answers ``url`` within ``timeout_s`` (any HTTP status is an answer)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s):  # noqa: S310 - the tracking server
            return True
    except urllib.error.HTTPError:  # it answered (401, 404...): it is there
        return True
    except (urllib.error.URLError, OSError, ValueError):
        return False


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


# ---- what could not be sent: the pending file of a run ---------------------------------------


def pending_dir() -> Path:
    """``$COLAR_HOME/unflushed`` (``COLAR_HOME`` defaults to ``./.colar``, as for the local servers)."""
    home = os.environ.get("COLAR_HOME")
    return (Path(home).expanduser() if home else Path.cwd() / ".colar") / "unflushed"


def pending_path(run_id: str) -> Path:
    """The pending file of ``run_id``: what the run still has to send to MLflow, one JSON per line."""
    return pending_dir() / f"{run_id}.jsonl"


def defer(run_id: str, record: Mapping[str, Any], *, path: Optional[Union[str, os.PathLike]] = None) -> Path:
    """Append ``record`` (``{"artifact": local path, "artifact_path": ...}``, ``{"end": status,
    "end_time": ms}``, ``{"key", "value", "step", "timestamp"}`` or ``{"tag", "value"}``) to the
    pending file of ``run_id`` (or ``path``); :func:`replay_pending` sends it later. Returns the file."""
    target = Path(path) if path is not None else pending_path(run_id)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "a") as fh:
        fh.write(json.dumps({"run_id": run_id, **record}) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    return target


def _apply(client: MlflowClient, run_id: str, record: Mapping[str, Any]) -> None:
    """Do what one pending ``record`` (artifact or end) says, now."""
    if "artifact" in record:
        local, artifact_path = Path(record["artifact"]), record.get("artifact_path")
        if not local.exists():  # removed since: nothing left to send, and it must not block the rest
            warnings.warn(f"pending artifact {local} of run {run_id} no longer exists: not logged",
                          RuntimeWarning, stacklevel=2)
        elif local.is_dir():
            client.log_artifacts(run_id, str(local), artifact_path)
        else:
            client.log_artifact(run_id, str(local), artifact_path)
    elif "end" in record:
        client.set_terminated(run_id, status=record["end"], end_time=record.get("end_time"))
    else:
        raise ValueError(f"unknown pending record {dict(record)!r}")


def log_or_defer(run_id: str, record: Mapping[str, Any], *, client: Optional[MlflowClient] = None) -> bool:
    """Do ``record`` (an artifact to log, the run's end: see :func:`defer`) now if the tracking server
    answers, else append it to the run's pending file with a warning. A call that fails while the
    server has gone away meanwhile is deferred too; one the server refuses raises. True if done now."""
    client = client_or_default(client)
    if server_answers(client):
        try:
            _apply(client, run_id, record)
            return True
        except Exception:
            if server_answers(client):
                raise
    where = defer(run_id, record)
    what = f"the end ({record['end']})" if "end" in record else f"artifact {record.get('artifact')}"
    warnings.warn(f"MLflow server away: {what} of run {run_id} kept in {where}; sent when the pipeline next "
                  "starts a stage or by `colar retry`", RuntimeWarning, stacklevel=2)
    return False


def replay_pending(path: Union[str, os.PathLike], client: Optional[MlflowClient] = None) -> int:
    """Send what a pending file holds (metrics and tags written by
    :meth:`~colar.tasks.metrics_sender.MlflowMetricsCallback.close`, artifacts and run ends written by
    :func:`log_or_defer`): per run, metrics, then tags, then artifacts, then the end, so a run is
    ended only once everything else is there. Returns the number of records sent; the file is renamed
    ``*.replayed`` afterwards. Sending twice is harmless (MLflow keeps one copy of an identical
    metric; artifacts are overwritten)."""
    client = client_or_default(client)
    path = Path(path)
    by_run: dict[str, tuple[list[Metric], list[RunTag], list[dict], list[dict]]] = {}
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:  # a line cut short by a crash while it was written
            continue
        metrics, tags, artifacts, ends = by_run.setdefault(rec["run_id"], ([], [], [], []))
        if "tag" in rec:
            tags.append(RunTag(rec["tag"], rec["value"]))
        elif "artifact" in rec:
            artifacts.append(rec)
        elif "end" in rec:
            ends.append(rec)
        else:
            metrics.append(Metric(rec["key"], float(rec["value"]), int(rec["timestamp"]), int(rec["step"])))
    sent = 0
    for run_id, (metrics, tags, artifacts, ends) in by_run.items():
        for i in range(0, len(metrics), MAX_METRICS_PER_BATCH):
            chunk = metrics[i : i + MAX_METRICS_PER_BATCH]
            client.log_batch(run_id, metrics=chunk, synchronous=True)
            sent += len(chunk)
        for i in range(0, len(tags), MAX_PARAMS_PER_BATCH):
            chunk = tags[i : i + MAX_PARAMS_PER_BATCH]
            client.log_batch(run_id, tags=chunk, synchronous=True)
            sent += len(chunk)
        for rec in artifacts + ends[-1:]:  # the last end recorded is the run's end
            _apply(client, run_id, rec)
            sent += 1
    path.rename(path.with_name(path.name + ".replayed"))
    return sent


def settle_pending(parent_run_id: str, *, client: Optional[MlflowClient] = None) -> list[str]:
    """Send the pending files (:func:`pending_path`) of ``parent_run_id`` and of its child runs;
    return the ids of the runs whose file was sent. A file that cannot be sent is kept (a warning).
    Costs nothing when no pending file exists."""
    folder = pending_dir()
    if not folder.is_dir() or not any(folder.glob("*.jsonl")):
        return []
    client = client_or_default(client)
    parent = client.get_run(parent_run_id)
    flt = f"tags.`{PARENT_TAG}` = '{parent_run_id}'"
    run_ids = [parent_run_id] + [r.info.run_id for r in
                                 client.search_runs([parent.info.experiment_id], filter_string=flt, max_results=1000)]
    settled = []
    for run_id in run_ids:
        path = pending_path(run_id)
        if not path.is_file():
            continue
        try:
            replay_pending(path, client)
            settled.append(run_id)
        except Exception as err:  # noqa: BLE001 - kept for the next try; it must not stop a stage
            warnings.warn(f"could not send the pending file {path}: {err!r}; kept for the next try",
                          RuntimeWarning, stacklevel=2)
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
    server does not answer, they go to the run's pending file (:func:`defer`)."""
    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
    client = client_or_default(client)
    if not server_answers(client):  # away: kept in the run's pending file, not lost, not waited for
        for m in batch:
            defer(run_id, {"key": m.key, "value": m.value, "step": m.step, "timestamp": m.timestamp})
        warnings.warn(f"MLflow server away: {len(batch)} metrics of run {run_id} kept in {pending_path(run_id)}",
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

    ``params`` may be nested (it goes through :func:`~colar.tasks.params.flatten_params`). The run
    stays RUNNING until :func:`end_run`.
    """
    client = client_or_default(client)
    exp_id = _experiment_id(client, experiment)
    name = None if run_name is None else mask_secrets(run_name)
    run = client.create_run(exp_id, tags=masked_tags(tags), run_name=name)
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
    (:func:`settle_pending`).
    """
    client = client_or_default(client)
    require_server(client, f"start the run of stage {stage_name}")
    parent = client.get_run(parent_run_id)
    settle_pending(parent_run_id, client=client)  # what an earlier stage could not send, now that it answers
    all_tags = {**masked_tags(tags), PARENT_TAG: parent_run_id, STAGE_TAG: stage_name}
    run = client.create_run(parent.info.experiment_id, tags=all_tags, run_name=mask_secrets(run_name or stage_name))
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
    log_or_defer(run_id, {"end": status, "end_time": int(time.time() * 1000)}, client=client)


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
    (:func:`system_metrics_monitor`)."""
    with ending_run(start_child_run(parent_run_id, stage_name, params, client=client), client=client) as run_id:
        if log_system_metrics:
            with system_metrics_monitor(run_id, client=client):
                yield run_id
        else:
            yield run_id


#: How long the end of a block waits for the system-metrics monitor to stop and send its last sample
#: (a server that does not answer is not waited for at all).
SYSTEM_METRICS_STOP_TIMEOUT_S = 10.0


@contextlib.contextmanager
def system_metrics_monitor(run_id: str, *, client: Optional[MlflowClient] = None,
                   stop_timeout_s: float = SYSTEM_METRICS_STOP_TIMEOUT_S) -> Iterator[Optional[Any]]:
    """MLflow's system metrics on ``run_id`` while the block runs; yields MLflow's
    ``SystemMetricsMonitor`` (None if it could not start, e.g. without ``psutil``: a warning, never an
    error).

    The monitor samples every ``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` seconds (MLflow's default 10)
    in its own thread. At the end of the block it is stopped and one last sample is logged, so a run
    shorter than the interval has its numbers too. The block never waits on a server that does not
    answer: the monitor is then left to end on its own (its samples are not kept in the pending file;
    system metrics are a view, not a result), and a stop that takes longer than ``stop_timeout_s`` is
    given up with a warning.
    """
    client = client_or_default(client)
    monitor = None
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, tracking_uri=tracking_uri_of(client) or None)
        monitor.start()
    except Exception as err:  # noqa: BLE001 - a missing psutil must not stop a stage
        warnings.warn(f"MLflow system metrics not logged for run {run_id}: {err!r}", RuntimeWarning, stacklevel=3)
        monitor = None
    try:
        yield monitor
    finally:
        if monitor is not None:
            _stop_system_metrics(monitor, run_id, client, stop_timeout_s)


def _stop_system_metrics(monitor: Any, run_id: str, client: MlflowClient, timeout_s: float) -> None:
    """Stop ``monitor`` and log a last sample, in a daemon thread waited for at most ``timeout_s``
    (not at all when the server does not answer: MLflow's client would retry it for minutes)."""
    answers = server_answers(client)

    def finish() -> None:
        try:
            monitor.finish()  # stops the sampling thread; sends what it has gathered
            if answers:
                monitor.collect_metrics()
                monitor.publish_metrics(monitor.aggregate_metrics())
                monitor.mlflow_logger.flush()
        except Exception as err:  # noqa: BLE001
            warnings.warn(f"MLflow system metrics of run {run_id}: last sample not logged: {err!r}",
                          RuntimeWarning, stacklevel=2)

    stopper = threading.Thread(target=finish, name=f"colar-system-metrics-{run_id[:8]}", daemon=True)
    stopper.start()
    if not answers:
        return
    stopper.join(timeout_s)
    if stopper.is_alive():
        warnings.warn(f"MLflow system metrics of run {run_id}: the monitor did not stop within {timeout_s:.0f} s; "
                      "left to end on its own", RuntimeWarning, stacklevel=3)


def end_orphaned_children(
    parent_run_id: str, status: str = "KILLED", *, client: Optional[MlflowClient] = None
) -> list[str]:
    """Terminate the children of ``parent_run_id`` still RUNNING (their process died without
    ending them: SIGKILL, lost machine) with ``status`` and a ``colar.end_reason`` tag; return their ids.

    Call it only when no live process owns the pipeline (``colar retry`` checks that first). The
    pending files of the parent and its children are sent first (:func:`settle_pending`): a stage that
    finished while the server was away is ended as it ended (its status and time), not KILLED.
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
