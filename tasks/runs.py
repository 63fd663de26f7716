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
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping
from typing import Any, Optional

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, Run
from mlflow.exceptions import MlflowException

from colar.tasks.params import flatten_params, mask_secrets, masked_tags

__all__ = [
    "STAGE_TAG",
    "PARENT_TAG",
    "ORPHAN_TAG",
    "child_run",
    "client_or_default",
    "end_orphaned_children",
    "end_run",
    "ending_run",
    "find_child_run",
    "log_metrics",
    "start_child_run",
    "start_parent_run",
]

STAGE_TAG = "colar.stage"
PARENT_TAG = "mlflow.parentRunId"
ORPHAN_TAG = "colar.end_reason"

MAX_PARAMS_PER_BATCH = 100  # MLflow's limit of params (and of tags) in one log_batch call

_STATUS_ALIASES = {"COMPLETED": "FINISHED", "SUCCESS": "FINISHED", "CANCELLED": "KILLED", "CRASHED": "FAILED"}


def client_or_default(client: Optional[MlflowClient]) -> MlflowClient:
    """``client``, or a new ``MlflowClient()`` (``MLFLOW_TRACKING_URI``) when it is None."""
    return client if client is not None else MlflowClient()


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
    """Log ``{name: value}`` to ``run_id`` at ``step`` in one batch, all with the same timestamp."""
    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
    client_or_default(client).log_batch(run_id, metrics=batch)


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
    name defaults to the stage name; ``params`` may be nested.
    """
    client = client_or_default(client)
    parent = client.get_run(parent_run_id)
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


@contextlib.contextmanager
def ending_run(run_id: str, *, client: Optional[MlflowClient] = None) -> Iterator[str]:
    """Yield ``run_id`` and end it with the block: FINISHED if the block completes, FAILED if it
    raises anything (KeyboardInterrupt included); the exception propagates."""
    try:
        yield run_id
    except BaseException:
        end_run(run_id, "FAILED", client=client)
        raise
    end_run(run_id, "FINISHED", client=client)


@contextlib.contextmanager
def child_run(parent_run_id: str, stage_name: str, params: Optional[Mapping[str, Any]] = None, *,
              client: Optional[MlflowClient] = None) -> Iterator[str]:
    """``with child_run(parent, "evaluate", {"eval": cfg}) as run_id:`` a stage's run
    (:func:`start_child_run`), ended FINISHED or FAILED with the block (:func:`ending_run`)."""
    with ending_run(start_child_run(parent_run_id, stage_name, params, client=client), client=client) as run_id:
        yield run_id


def end_orphaned_children(
    parent_run_id: str, status: str = "KILLED", *, client: Optional[MlflowClient] = None
) -> list[str]:
    """Terminate the children of ``parent_run_id`` still RUNNING (their process died without
    ending them: SIGKILL, lost machine) with ``status`` and a ``colar.end_reason`` tag; return their ids.

    Call it only when no live process owns the pipeline (``colar retry`` checks that first).
    """
    client = client_or_default(client)
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
