"""Training-loop metrics to MLflow without ever disturbing the loop.

:class:`MlflowMetricsCallback` buffers what a training loop reports and sends it from a background
thread, retrying while the server is away; what never got through is written to the run's pending file
(:mod:`colar_infra.tracking.pending`), sent later. :func:`metric_key` makes a name acceptable to MLflow.
"""

from __future__ import annotations

import os
import re
import threading
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, Union

from mlflow import MlflowClient
from mlflow.entities import Metric, RunTag
from mlflow.exceptions import MlflowException

from colar_infra.health import health_url, probe
from colar_infra.secrets import mask_secrets
from colar_infra.tracking.params import (
    MAX_ENTITIES_PER_BATCH,
    MAX_KEY,
    MAX_METRICS_PER_BATCH,
    MAX_PARAM_VALUE,
    MAX_PARAMS_PER_BATCH,
)
from colar_infra.tracking.pending import MetricRecord, TagRecord, append_records, pending_path
from colar_infra.tracking.runs import client_or_default, tracking_uri_of

__all__ = ["MlflowMetricsCallback", "metric_key"]

# Error codes with which the server refuses a batch for good: retrying cannot help.
_NOT_RETRYABLE = {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "INVALID_STATE", "BAD_REQUEST"}
_BAD_METRIC_CHARS = re.compile(r"[^/\w.\- :]")


class MlflowMetricsCallback:
    """Training-loop callback that logs to an MLflow run without ever disturbing the loop.

    ``on_step``/``on_eval``/``on_checkpoint`` only append to an in-memory buffer (microseconds,
    never raise). Every ``flush_every`` steps (and after each eval/checkpoint) a background
    thread sends the buffer with ``client.log_batch`` in chunks, retrying ``max_retries`` times
    with exponential backoff. If the server is unreachable the buffer is kept and retried at the
    next flush. :meth:`close` makes a last attempt; what still could not be sent is written to a
    pending file (``fallback_path``, default the run's own ``<folder>/<run_id>.jsonl``,
    :func:`colar_infra.tracking.pending.pending_path`: the absolute folder its pipeline run recorded when it
    started, else ``$COLAR_HOME/unflushed``; sent with :func:`colar_infra.tracking.pending.replay_pending`)
    and a warning is issued.

    For an http(s) tracking URI each attempt first probes ``/health`` with a short timeout:
    MLflow's own client retries a dead server for minutes, the probe fails in milliseconds.

    Use one per run, from the rank that logs (rank 0 under DeepSpeed)::

        cb = MlflowMetricsCallback(MlflowClient(), run_id)
        for step in ...: cb.on_step(step, {"loss": loss, "lr": lr})
        cb.close()
    """

    def __init__(
        self,
        client: Optional[MlflowClient],
        run_id: str,
        *,
        flush_every: int = 20,
        max_retries: int = 3,
        backoff_s: float = 0.5,
        probe_timeout_s: float = 2.0,
        close_timeout_s: float = 60.0,
        fallback_path: Optional[Union[str, os.PathLike]] = None,
        eval_prefix: str = "eval/",
        max_buffer: int = 200_000,
    ) -> None:
        self.client = client_or_default(client)
        self.run_id = run_id
        self.flush_every = max(1, int(flush_every))
        self.max_retries = max(0, int(max_retries))
        self.backoff_s = backoff_s
        self.probe_timeout_s = probe_timeout_s
        self.close_timeout_s = close_timeout_s
        self.eval_prefix = eval_prefix
        self.max_buffer = max(MAX_METRICS_PER_BATCH, int(max_buffer))
        self.fallback_path = Path(fallback_path) if fallback_path else pending_path(run_id)
        self._health_url = health_url(tracking_uri_of(self.client))

        self._metrics: list[Metric] = []  # pending, oldest first
        self._tags: dict[str, str] = {}  # pending tags (latest value wins)
        self._rejected_metrics: list[Metric] = []  # refused by the server for good (not retried)
        self._rejected_tags: dict[str, str] = {}
        self._lock = threading.Lock()  # guards the buffers
        self._cond = threading.Condition()  # guards the flush generations below
        self._requested = 0  # flush requests made
        self._done = 0  # flush requests the sender has completed (successfully or not)
        self._closing = False
        self._closed = False
        self._thread: Optional[threading.Thread] = None
        self._steps_since_flush = 0
        self.last_error: Optional[BaseException] = None
        self.flushed_metrics = 0  # metrics accepted by the server so far

    # ---- callback API (never raises) ------------------------------------------------------

    def on_step(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Buffer ``metrics`` at ``step``; flush in the background every ``flush_every`` calls."""
        try:
            if self._closed:
                return
            self._add(step, metrics, prefix="")
            self._steps_since_flush += 1
            if self._steps_since_flush >= self.flush_every:
                self.flush(wait=False)
        except Exception as e:  # noqa: BLE001 - defensive: logging must not kill training
            self.last_error = e

    def on_eval(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Buffer eval metrics (keys prefixed with ``eval/`` unless they already are) and flush."""
        try:
            if self._closed:
                return
            self._add(step, metrics, prefix=self.eval_prefix)
            self.flush(wait=False)
        except Exception as e:  # noqa: BLE001 - as above: logging must not kill training
            self.last_error = e

    def on_train_start(self, info: Mapping[str, Any]) -> None:
        """Record the loop's start info (max_steps, resumed_from, world_size...) as ``colar.train.*`` tags."""
        self._add_info_tags(info)

    def on_train_end(self, info: Mapping[str, Any]) -> None:
        """Record the end info (final step, best score...) as tags and flush (bounded wait)."""
        self._add_info_tags(info)
        try:
            if not self._closed:
                self.flush(wait=True, timeout_s=self.close_timeout_s)
        except Exception as e:  # noqa: BLE001 - as above: logging must not kill training
            self.last_error = e

    def on_checkpoint(self, step: int, path: Union[str, os.PathLike]) -> None:
        """Record a saved checkpoint: metric ``checkpoint_step`` and tags ``colar.checkpoint.*``."""
        try:
            if self._closed:
                return
            with self._lock:
                self._metrics.append(Metric("checkpoint_step", float(step), _now_ms(), int(step)))
                self._tags["colar.checkpoint.latest"] = mask_secrets(path)
                self._tags["colar.checkpoint.step"] = str(int(step))
            self.flush(wait=False)
        except Exception as e:  # noqa: BLE001 - as above: logging must not kill training
            self.last_error = e

    def flush(self, wait: bool = True, timeout_s: Optional[float] = None) -> bool:
        """Ask the background sender to send what is buffered. With ``wait``, block until that
        attempt (retries included) is over, at most ``timeout_s``; True if nothing is pending."""
        if self._closed:
            return self.pending() == 0
        self._steps_since_flush = 0
        gen = self._request()
        if wait:
            with self._cond:
                self._cond.wait_for(lambda: self._done >= gen, timeout_s)
        return self.pending() == 0

    def pending(self) -> int:
        """Number of buffered metrics and tags not yet accepted by the server."""
        with self._lock:
            return len(self._metrics) + len(self._tags)

    def close(self) -> None:
        """Final flush (with retries); unsent metrics go to ``fallback_path`` with a warning."""
        if self._closed:
            return
        self._closing = True
        gen = self._request()
        with self._cond:
            self._cond.wait_for(lambda: self._done >= gen, self.close_timeout_s)
        self._closed = True
        with self._lock:
            metrics = self._rejected_metrics + self._metrics
            tags = {**self._rejected_tags, **self._tags}
            self._metrics, self._tags, self._rejected_metrics, self._rejected_tags = [], {}, [], {}
        if metrics or tags:
            try:
                self._write_fallback(metrics, tags)
                where = str(self.fallback_path)
            except OSError as e:
                where = f"nowhere ({e})"
            warnings.warn(
                f"MLflow: {len(metrics)} metrics and {len(tags)} tags of run {self.run_id} could not be "
                f"sent ({self.last_error!r}); written to {where}. The pipeline sends them when its next stage "
                f"starts or on `colar retry` (or: colar_infra.tracking.pending.replay_pending(path, client)).",
                RuntimeWarning,
                stacklevel=2,
            )

    def __enter__(self) -> "MlflowMetricsCallback":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- internals -------------------------------------------------------------------------

    def _add(self, step: int, metrics: Mapping[str, Any], prefix: str) -> None:
        ts = _now_ms()
        new = []
        for key, value in metrics.items():
            number = _as_float(value)
            if number is None:
                continue
            key = str(key)
            if prefix and not key.startswith(prefix.rstrip("/_.")):
                key = prefix + key
            key = metric_key(key)
            if key:
                new.append(Metric(key, number, ts, int(step)))
        with self._lock:
            self._metrics.extend(new)

    def _add_info_tags(self, info: Mapping[str, Any]) -> None:
        try:
            if self._closed or not info:
                return
            with self._lock:
                for k, v in info.items():
                    if v is not None:
                        self._tags[f"colar.train.{metric_key(str(k))}"] = mask_secrets(v)[:MAX_PARAM_VALUE]
        except Exception as e:  # noqa: BLE001 - as above: logging must not kill training
            self.last_error = e

    def _request(self) -> int:
        with self._cond:
            self._requested += 1
            gen = self._requested
            self._cond.notify_all()
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name=f"mlflow-metrics-{self.run_id[:8]}", daemon=True)
            self._thread.start()
        return gen

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._requested > self._done)
                target = self._requested
            self._send_with_retries()
            with self._cond:
                self._done = target
                self._cond.notify_all()
                if self._closing and self._requested == self._done:
                    return

    def _send_with_retries(self) -> bool:
        for attempt in range(self.max_retries + 1):
            if self._closed:
                return False
            try:
                self._send_pending()
                if not (self._rejected_metrics or self._rejected_tags):
                    self.last_error = None
                return True
            except Exception as e:  # noqa: BLE001 - any failure: keep the buffer, retry later
                self.last_error = e
            if attempt < self.max_retries:
                time.sleep(self.backoff_s * (2**attempt))
        self._spill_if_too_big()
        return False

    def _spill_if_too_big(self) -> None:
        """During a long outage, move the oldest half of the buffer to the fallback file so memory
        stays bounded (sender thread only: it is the only one that removes from the buffer)."""
        with self._lock:
            if self._closed or len(self._metrics) <= self.max_buffer:
                return
            cut = len(self._metrics) // 2
            old, self._metrics = self._metrics[:cut], self._metrics[cut:]
        try:
            self._write_fallback(old, {})
            warnings.warn(
                f"MLflow unreachable ({self.last_error!r}): {len(old)} buffered metrics of run "
                f"{self.run_id} moved to {self.fallback_path}",
                RuntimeWarning,
                stacklevel=2,
            )
        except OSError:
            with self._lock:  # cannot write either: keep them
                self._metrics[:0] = old

    def _send_pending(self) -> None:
        if not self.pending():
            return
        if self._health_url is not None and not probe(self._health_url, self.probe_timeout_s):
            raise ConnectionError(f"MLflow server {self._health_url} does not answer")
        while True:
            with self._lock:
                tag_items = list(self._tags.items())[:MAX_PARAMS_PER_BATCH]
                metrics = self._metrics[: min(MAX_METRICS_PER_BATCH, MAX_ENTITIES_PER_BATCH - len(tag_items))]
            if not metrics and not tag_items:
                return
            try:
                self.client.log_batch(
                    self.run_id, metrics=metrics, tags=[RunTag(k, v) for k, v in tag_items], synchronous=True
                )
            except MlflowException as e:
                if e.error_code not in _NOT_RETRYABLE:
                    raise
                # The server refused this batch for good (bad name, deleted run): set it aside for
                # the fallback file instead of blocking every later metric behind it.
                self.last_error = e
                with self._lock:
                    if self._closed:
                        return
                    del self._metrics[: len(metrics)]
                    for k, v in tag_items:
                        if self._tags.get(k) == v:
                            del self._tags[k]
                    self._rejected_metrics.extend(metrics)
                    self._rejected_tags.update(tag_items)
                continue
            with self._lock:
                if self._closed:  # close() gave up waiting and already wrote the fallback file
                    return
                # Only this thread removes, and only from the front: appends go to the back.
                del self._metrics[: len(metrics)]
                for k, v in tag_items:
                    if self._tags.get(k) == v:
                        del self._tags[k]
                self.flushed_metrics += len(metrics)

    def _write_fallback(self, metrics: list[Metric], tags: dict[str, str]) -> None:
        """Append ``metrics`` and ``tags`` to the pending file with the one writer, :func:`append_records`."""
        append_records(self.fallback_path,
                       [MetricRecord(self.run_id, m.key, m.value, m.step, m.timestamp) for m in metrics]
                       + [TagRecord(self.run_id, k, v) for k, v in tags.items()])


def metric_key(key: str) -> str:
    """``key`` made acceptable to MLflow: odd characters to ``_``, no empty/``.``/``..`` path parts,
    at most 250 characters (``"acc@c=5"`` -> ``"acc_c_5"``). Empty if nothing is left."""
    key = _BAD_METRIC_CHARS.sub("_", key)
    parts = [p for p in key.split("/") if p not in ("", ".", "..")]
    return "/".join(parts)[:MAX_KEY].rstrip("/")


def _now_ms() -> int:
    return int(time.time() * 1000)


def _as_float(value: Any) -> Optional[float]:
    """Numbers, numpy scalars and 0-d/1-element tensors to float; anything else to None."""
    if isinstance(value, bool):
        return float(value)
    if hasattr(value, "item") and callable(value.item):
        try:
            value = value.item()
        except (ValueError, RuntimeError):
            return None
    if isinstance(value, (int, float)):
        return float(value)
    return None
