"""MLflow's system metrics on a stage's run: ``system/cpu_*``, ``system/system_memory_*``, disk, network,
and ``system/gpu_*`` where ``pynvml`` finds a GPU, shown in the run's "System metrics" tab.

``mlflow.enable_system_metrics_logging()`` and ``start_run(log_system_metrics=True)`` (the public API) only
act on runs opened with ``mlflow.start_run``, which the pipeline's are not (they are named by id: see
:mod:`colar_infra.tracking.runs`). So the monitor is started on the run id here, through MLflow's
``SystemMetricsMonitor``, which is not public API. :func:`start_mlflow_monitor` is the one place that
touches it; ``tests/test_tracking.py::test_mlflow_system_metrics_internals_are_still_there`` fails when an
MLflow upgrade changes what it uses.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Optional

from mlflow import MlflowClient

from colar_infra.tracking.runs import client_or_default, server_answers, tracking_uri_of

__all__ = ["SYSTEM_METRICS_STOP_TIMEOUT_S", "start_mlflow_monitor", "system_metrics_monitor"]

#: How long the end of a block waits for the system-metrics monitor to stop and send its last sample
#: (a server that does not answer is not waited for at all).
SYSTEM_METRICS_STOP_TIMEOUT_S = 10.0


def start_mlflow_monitor(run_id: str, tracking_uri: Optional[str]) -> Callable[[bool], None]:
    """Start MLflow's system-metrics monitor on ``run_id`` (its own sampling thread, every
    ``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` seconds, MLflow's default 10); return the function that
    stops it, ``stop(last_sample)``: the sampling thread ends and what it gathered is sent; with
    ``last_sample``, one more sample is taken and sent, so a run shorter than the interval has its numbers too.

    The only code that uses MLflow's non-public system-metrics API (``SystemMetricsMonitor(run_id,
    tracking_uri=)``, ``start``, ``finish``, ``collect_metrics``, ``aggregate_metrics``, ``publish_metrics``,
    ``mlflow_logger.flush``). Raises what MLflow raises (e.g. without ``psutil``)."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, tracking_uri=tracking_uri)
    monitor.start()

    def stop(last_sample: bool) -> None:
        monitor.finish()  # stops the sampling thread; sends what it has gathered
        if last_sample:
            monitor.collect_metrics()
            monitor.publish_metrics(monitor.aggregate_metrics())
            monitor.mlflow_logger.flush()

    return stop


@contextlib.contextmanager
def system_metrics_monitor(run_id: str, *, client: Optional[MlflowClient] = None,
                           stop_timeout_s: float = SYSTEM_METRICS_STOP_TIMEOUT_S) -> Iterator[bool]:
    """MLflow's system metrics on ``run_id`` while the block runs (:func:`start_mlflow_monitor`); yields
    whether the monitor runs (False if it could not start, e.g. without ``psutil``: a warning, never an error).

    At the end of the block the monitor is stopped and one last sample is logged. The block never waits on
    a server that does not answer: the monitor is then left to end on its own (its samples are not kept in
    the pending file; system metrics are a view, not a result), and a stop that takes longer than
    ``stop_timeout_s`` is given up with a warning.
    """
    client = client_or_default(client)
    stop: Optional[Callable[[bool], None]] = None
    try:
        stop = start_mlflow_monitor(run_id, tracking_uri_of(client) or None)
    except Exception as err:  # noqa: BLE001 - a missing psutil must not stop a stage
        warnings.warn(f"MLflow system metrics not logged for run {run_id}: {err!r}", RuntimeWarning, stacklevel=3)
    try:
        yield stop is not None
    finally:
        if stop is not None:
            _stop_in_background(stop, run_id, server_answers(client), stop_timeout_s)


def _stop_in_background(stop: Callable[[bool], None], run_id: str, answers: bool, timeout_s: float) -> None:
    """Run ``stop`` (with a last sample if the server ``answers``) in a daemon thread, waited for at most
    ``timeout_s``, and not at all when the server does not answer (MLflow's client would retry it for minutes)."""

    def finish() -> None:
        try:
            stop(answers)
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
