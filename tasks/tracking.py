"""MLflow helpers shared by every stage task.

Everything here names its run explicitly (``MlflowClient`` + run ids). MLflow's "active run" is
per thread and Prefect runs tasks in worker threads, so nothing relies on ``mlflow.start_run()``
state. Layout of a pipeline in MLflow::

    parent run  (one per ``colar run``; params = the flattened pipeline config)
      +- child run, tag colar.stage=prepare_data
      +- child run, tag colar.stage=sft          <- MlflowMetricsCallback logs loss/lr/... here
      +- child run, tag colar.stage=rl
      +- child run, tag colar.stage=evaluate

Children carry ``mlflow.parentRunId`` (the UI nests them) and ``colar.stage``; a retried flow
uses :func:`find_child_run` to skip a stage that already finished.

The client is ``MlflowClient()`` unless one is passed, i.e. it follows ``MLFLOW_TRACKING_URI``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import threading
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, Union

import mlflow
from mlflow import MlflowClient
from mlflow.entities import DatasetInput, InputTag, Metric, Param, Run, RunTag
from mlflow.exceptions import MlflowException

__all__ = [
    "STAGE_TAG",
    "PARENT_TAG",
    "MASK",
    "flatten_params",
    "mask_secrets",
    "start_parent_run",
    "start_child_run",
    "end_run",
    "find_child_run",
    "end_orphaned_children",
    "MlflowMetricsCallback",
    "log_artifact_dir",
    "log_dataset_input",
    "metric_key",
    "replay_unflushed",
]

STAGE_TAG = "colar.stage"
PARENT_TAG = "mlflow.parentRunId"
MASK = "***"

# MLflow limits (mlflow.utils.validation): param value 6000 chars, key 250 chars, 100 params/tags
# and 1000 metrics per log_batch call.
MAX_PARAM_VALUE = 6000
MAX_KEY = 250
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
MAX_ENTITIES_PER_BATCH = 1000  # metrics + params + tags in one log_batch

# --------------------------------------------------------------------------------------------
# params


# Words (of a key split on "_", "-", "." and camelCase) that mark a secret.
_SECRET_WORDS = {"token", "password", "passwd", "secret", "apikey", "credential", "credentials"}
_SECRET_PAIRS = {("api", "key"), ("access", "key"), ("secret", "key"), ("private", "key"), ("auth", "key")}
# "pad_token", "eos_token_id", "latent_token" ... name vocabulary entries, not credentials.
_VOCAB_TOKEN_ROLES = {
    "pad", "eos", "bos", "unk", "sep", "cls", "mask", "special", "latent", "start", "end", "stop",
    "think", "answer", "bot", "eot", "thought", "step", "sentinel", "additional", "chat",
}
# Env var names whose values are treated as secrets when they appear in a param value.
_SECRET_ENV_NAME = re.compile(r"TOKEN|PASSWORD|SECRET|KEY", re.IGNORECASE)
# Env values shorter than this are masked only where a param equals them exactly ("1", "true"
# would otherwise be cut out of every value); longer ones wherever they occur in a value.
_MIN_SECRET_SUBSTRING = 8
_MIN_SECRET_EXACT = 6
_URL_PASSWORD = re.compile(r"(\w+://[^:/@\s]+:)([^@/\s]+)(@)")


def _key_words(key: str) -> list[str]:
    key = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", key)
    return [w for w in re.split(r"[^A-Za-z0-9]+", key.lower()) if w]


def is_secret_key(key: str) -> bool:
    """True if the last segment of a dotted key names a credential (``hf_token``, ``api_key``...).

    Matching is by word, not substring: ``max_new_tokens``, ``tokenizer`` and ``pad_token_id`` are
    ordinary parameters; ``token``, ``hf_token``, ``HF_TOKEN``, ``openai_api_key``, ``db_password``,
    ``client_secret`` are secrets.
    """
    words = _key_words(key.rsplit(".", 1)[-1])
    for i, w in enumerate(words):
        if w == "token":
            before = words[i - 1] if i > 0 else ""
            after = words[i + 1] if i + 1 < len(words) else ""
            if before in _VOCAB_TOKEN_ROLES or after in {"id", "ids", "str", "index"}:
                continue
            return True
        if w in _SECRET_WORDS:
            return True
        if i > 0 and (words[i - 1], w) in _SECRET_PAIRS:
            return True
    return False


def _secret_env_values() -> list[str]:
    values = {v for k, v in os.environ.items() if _SECRET_ENV_NAME.search(k) and len(v) >= _MIN_SECRET_EXACT}
    return sorted(values, key=len, reverse=True)


def _mask_value(text: str, secrets: list[str]) -> str:
    for s in secrets:
        if text == s:
            return MASK
        if len(s) >= _MIN_SECRET_SUBSTRING and s in text:
            text = text.replace(s, MASK)
    return _URL_PASSWORD.sub(rf"\1{MASK}\3", text)


def mask_secrets(text: Any) -> str:
    """``text`` (stringified) with secret environment values and URL passwords replaced by ``***``:
    the masking of :func:`flatten_params`, for run names, tags and log lines."""
    return _mask_value(_stringify(text), _secret_env_values())


def _to_plain(value: Any) -> Any:
    """Config objects (pydantic, dataclasses) to dicts; everything else unchanged."""
    if hasattr(value, "model_dump") and callable(value.model_dump):
        return value.model_dump(mode="json")
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return value


def _stringify(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e16:
        return repr(value)
    return str(value)


def flatten_params(nested: Any, prefix: str = "") -> dict[str, str]:
    """Flatten a nested config into MLflow params: ``{"a.b.c": "value"}``.

    - dicts, pydantic models and dataclasses recurse with dotted keys;
    - lists/tuples of scalars are joined with ``","``; lists holding dicts recurse as ``key.0.x``;
    - values are stringified and cut to MLflow's 6000-character limit (keys to 250);
    - secrets are masked with ``***``: keys naming a credential (see :func:`is_secret_key`), any
      occurrence of the value of an environment variable whose name contains
      TOKEN/PASSWORD/SECRET/KEY, and passwords embedded in URLs (``scheme://user:pw@host``).
    """
    secrets = _secret_env_values()
    out: dict[str, str] = {}

    def walk(value: Any, key: str) -> None:
        value = _to_plain(value)
        if isinstance(value, Mapping):
            if not value and key:
                out[key] = "{}"
            for k, v in value.items():
                walk(v, f"{key}.{k}" if key else str(k))
            return
        if isinstance(value, (list, tuple, set, frozenset)):
            items = [_to_plain(v) for v in value]
            if any(isinstance(v, (Mapping, list, tuple)) for v in items):
                for i, v in enumerate(items):
                    walk(v, f"{key}.{i}")
                return
            if isinstance(value, (set, frozenset)):
                items = sorted(items, key=str)
            value = ",".join(_stringify(v) for v in items)
        if not key:
            key = "value"
        if is_secret_key(key):
            text = MASK
        else:
            text = _mask_value(_stringify(value), secrets)
        out[key[:MAX_KEY]] = text[:MAX_PARAM_VALUE]

    walk(nested, prefix.rstrip("."))
    return out


# --------------------------------------------------------------------------------------------
# runs


def _client(client: Optional[MlflowClient]) -> MlflowClient:
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


def _log_params(client: MlflowClient, run_id: str, params: Mapping[str, str]) -> None:
    items = [Param(k, v) for k, v in params.items()]
    for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
        client.log_batch(run_id, params=items[i : i + MAX_PARAMS_PER_BATCH], synchronous=True)


def _str_tags(tags: Optional[Mapping[str, Any]]) -> dict[str, str]:
    """Tags as strings, secrets masked (a tag value is as visible as a param)."""
    secrets = _secret_env_values()
    return {str(k): _mask_value(_stringify(v), secrets) for k, v in (tags or {}).items() if v is not None}


def start_parent_run(
    experiment: str,
    run_name: str,
    tags: Optional[Mapping[str, Any]] = None,
    params: Optional[Mapping[str, Any]] = None,
    *,
    client: Optional[MlflowClient] = None,
) -> str:
    """Create the pipeline's parent run (experiment created if missing); return its run id.

    ``params`` may be nested (it goes through :func:`flatten_params`). The run stays RUNNING
    until :func:`end_run`. Nothing touches MLflow's thread-global active run.
    """
    client = _client(client)
    exp_id = _experiment_id(client, experiment)
    name = None if run_name is None else mask_secrets(run_name)
    run = client.create_run(exp_id, tags=_str_tags(tags), run_name=name)
    if params:
        _log_params(client, run.info.run_id, flatten_params(params))
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
    name defaults to the stage name.
    """
    client = _client(client)
    parent = client.get_run(parent_run_id)
    all_tags = {**_str_tags(tags), PARENT_TAG: parent_run_id, STAGE_TAG: stage_name}
    run = client.create_run(parent.info.experiment_id, tags=all_tags, run_name=mask_secrets(run_name or stage_name))
    if params:
        _log_params(client, run.info.run_id, flatten_params(params))
    return run.info.run_id


_STATUS_ALIASES = {"COMPLETED": "FINISHED", "SUCCESS": "FINISHED", "CANCELLED": "KILLED", "CRASHED": "FAILED"}


def end_run(run_id: str, status: str = "FINISHED", *, client: Optional[MlflowClient] = None) -> None:
    """Terminate ``run_id`` with ``status`` (FINISHED, FAILED or KILLED; Prefect's COMPLETED,
    CANCELLED and CRASHED are accepted and mapped)."""
    name = _STATUS_ALIASES.get(status.upper(), status.upper())
    if name not in ("FINISHED", "FAILED", "KILLED"):
        raise ValueError(f"end_run: status must be FINISHED, FAILED or KILLED, not {status!r}")
    _client(client).set_terminated(run_id, status=name)


ORPHAN_TAG = "colar.end_reason"


def end_orphaned_children(
    parent_run_id: str, status: str = "KILLED", *, client: Optional[MlflowClient] = None
) -> list[str]:
    """Terminate the children of ``parent_run_id`` still RUNNING (their process died without
    ending them: SIGKILL, lost machine) with ``status`` and a ``colar.end_reason`` tag; return their ids.

    Call it only when no live process owns the pipeline (``colar retry`` checks that first).
    """
    client = _client(client)
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

    By default only FINISHED runs count (a retried flow skips stages that completed and redoes
    failed ones); ``status=None`` returns the newest child in any state.
    """
    client = _client(client)
    parent = client.get_run(parent_run_id)
    flt = f"tags.`{PARENT_TAG}` = '{parent_run_id}' and tags.`{STAGE_TAG}` = '{stage}'"
    if status is not None:
        flt += f" and attributes.status = '{status.upper()}'"
    runs = client.search_runs(
        [parent.info.experiment_id], filter_string=flt, order_by=["attributes.start_time DESC"], max_results=1
    )
    return runs[0] if runs else None


# --------------------------------------------------------------------------------------------
# artifacts and datasets


def log_artifact_dir(
    client: Optional[MlflowClient], run_id: str, path: Union[str, os.PathLike], artifact_path: Optional[str] = None
) -> None:
    """Upload a directory (its contents under ``artifact_path``) or a single file to ``run_id``."""
    client = _client(client)
    path = Path(path)
    if path.is_dir():
        client.log_artifacts(run_id, str(path), artifact_path)
    elif path.is_file():
        client.log_artifact(run_id, str(path), artifact_path)
    else:
        raise FileNotFoundError(f"log_artifact_dir: {path} does not exist")


def _read_table(path: Path):
    import pandas as pd

    suffix = "".join(path.suffixes[-2:]).lower()
    if suffix.endswith((".jsonl", ".jsonl.gz")):
        return pd.read_json(path, lines=True)
    if suffix.endswith((".json", ".json.gz")):
        return pd.read_json(path)
    if suffix.endswith((".csv", ".csv.gz")):
        return pd.read_csv(path)
    if suffix.endswith(".parquet"):
        return pd.read_parquet(path)
    raise ValueError(f"log_dataset_input: cannot read {path} (use .jsonl, .json, .csv or .parquet, or pass a DataFrame)")


def log_dataset_input(
    run_id: str,
    path_or_df: Any,
    digest: Optional[str] = None,
    name: Optional[str] = None,
    context: Optional[str] = "training",
    *,
    source: Optional[str] = None,
    tags: Optional[Mapping[str, str]] = None,
    client: Optional[MlflowClient] = None,
) -> DatasetInput:
    """Record a dataset as an input of ``run_id`` (the run's "Datasets used" in the UI).

    ``path_or_df``: a DataFrame or a .jsonl/.json/.csv/.parquet file (read to infer the schema and
    profile). ``digest``: the pipeline's own content hash (MLflow computes one if None).
    ``source``: where the data lives (default: the file's ``file://`` URI; for a DataFrame, MLflow's
    code source, i.e. the running script). ``context`` becomes the
    ``mlflow.data.context`` input tag ("training", "eval"...). Returns the logged DatasetInput.
    """
    import pandas as pd

    if isinstance(path_or_df, pd.DataFrame):
        df = path_or_df
        default_source, default_name = None, None
    else:
        path = Path(path_or_df).resolve()
        df = _read_table(path)
        default_source, default_name = path.as_uri(), path.name
    with warnings.catch_warnings():
        # "source can be interpreted in multiple ways" and integer-column schema hints are noise here
        warnings.simplefilter("ignore", UserWarning)
        dataset = mlflow.data.from_pandas(
            df, source=source or default_source, name=name or default_name, digest=digest
        )
        d = dataset.to_dict()  # schema/profile are inferred here
    entity = mlflow.entities.Dataset(
        name=d["name"],
        digest=d["digest"],
        source_type=d["source_type"],
        source=d["source"],
        schema=d.get("schema"),
        profile=d.get("profile"),
    )
    input_tags = [InputTag(key=str(k), value=str(v)) for k, v in (tags or {}).items()]
    if context:
        input_tags.append(InputTag(key="mlflow.data.context", value=context))
    ds_input = DatasetInput(dataset=entity, tags=input_tags)
    _client(client).log_inputs(run_id, datasets=[ds_input])
    return ds_input


# --------------------------------------------------------------------------------------------
# metrics from training loops


def _tracking_uri_of(client: MlflowClient) -> str:
    uri = getattr(client, "tracking_uri", None) or getattr(getattr(client, "_tracking_client", None), "tracking_uri", "")
    return str(uri or "")


class MlflowMetricsCallback:
    """Training-loop callback that logs to an MLflow run without ever disturbing the loop.

    ``on_step``/``on_eval``/``on_checkpoint`` only append to an in-memory buffer (microseconds,
    never raise). Every ``flush_every`` steps (and after each eval/checkpoint) a background
    thread sends the buffer with ``client.log_batch`` in chunks, retrying ``max_retries`` times
    with exponential backoff. If the server is unreachable the buffer is kept and retried at the
    next flush. :meth:`close` makes a last attempt; what still could not be sent is written to a
    JSONL file (``fallback_path``, default ``$COLAR_HOME|./.colar/unflushed/<run_id>.jsonl``,
    replayable with :func:`replay_unflushed`) and a warning is issued.

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
        self.client = _client(client)
        self.run_id = run_id
        self.flush_every = max(1, int(flush_every))
        self.max_retries = max(0, int(max_retries))
        self.backoff_s = backoff_s
        self.probe_timeout_s = probe_timeout_s
        self.close_timeout_s = close_timeout_s
        self.eval_prefix = eval_prefix
        self.max_buffer = max(MAX_METRICS_PER_BATCH, int(max_buffer))
        home = Path(os.environ.get("COLAR_HOME") or Path.cwd() / ".colar")
        self.fallback_path = Path(fallback_path) if fallback_path else home / "unflushed" / f"{run_id}.jsonl"
        uri = _tracking_uri_of(self.client)
        self._health_url = uri.rstrip("/") + "/health" if uri.startswith(("http://", "https://")) else None

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
        except Exception as e:  # pragma: no cover - defensive: logging must not kill training
            self.last_error = e

    def on_eval(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Buffer eval metrics (keys prefixed with ``eval/`` unless they already are) and flush."""
        try:
            if self._closed:
                return
            self._add(step, metrics, prefix=self.eval_prefix)
            self.flush(wait=False)
        except Exception as e:  # pragma: no cover
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
        except Exception as e:  # pragma: no cover
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
        except Exception as e:  # pragma: no cover
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
                f"sent ({self.last_error!r}); written to {where}. Replay with "
                f"colar.tasks.tracking.replay_unflushed().",
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
        except Exception as e:  # pragma: no cover
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
        if self._health_url is not None and not _probe(self._health_url, self.probe_timeout_s):
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
        self.fallback_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.fallback_path, "a") as fh:
            for m in metrics:
                rec = {"run_id": self.run_id, "key": m.key, "value": _json_number(m.value), "step": m.step, "timestamp": m.timestamp}
                fh.write(json.dumps(rec) + "\n")
            for k, v in tags.items():
                fh.write(json.dumps({"run_id": self.run_id, "tag": k, "value": v}) + "\n")


def replay_unflushed(path: Union[str, os.PathLike], client: Optional[MlflowClient] = None) -> int:
    """Send the metrics/tags of a fallback JSONL file written by :meth:`MlflowMetricsCallback.close`.

    Returns the number of records sent; the file is renamed to ``*.replayed`` afterwards.
    """
    client = _client(client)
    path = Path(path)
    by_run: dict[str, tuple[list[Metric], list[RunTag]]] = {}
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        metrics, tags = by_run.setdefault(rec["run_id"], ([], []))
        if "tag" in rec:
            tags.append(RunTag(rec["tag"], rec["value"]))
        else:
            metrics.append(Metric(rec["key"], float(rec["value"]), int(rec["timestamp"]), int(rec["step"])))
    sent = 0
    for run_id, (metrics, tags) in by_run.items():
        for i in range(0, len(metrics), MAX_METRICS_PER_BATCH):
            chunk = metrics[i : i + MAX_METRICS_PER_BATCH]
            client.log_batch(run_id, metrics=chunk, synchronous=True)
            sent += len(chunk)
        for i in range(0, len(tags), MAX_PARAMS_PER_BATCH):
            chunk = tags[i : i + MAX_PARAMS_PER_BATCH]
            client.log_batch(run_id, tags=chunk, synchronous=True)
            sent += len(chunk)
    path.rename(path.with_name(path.name + ".replayed"))
    return sent


_NOT_RETRYABLE = {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "INVALID_STATE", "BAD_REQUEST"}
_BAD_METRIC_CHARS = re.compile(r"[^/\w.\- :]")


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


def _json_number(x: float) -> Union[float, str]:
    return x if math.isfinite(x) else str(x)


def _probe(url: str, timeout: float) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - tracking server
            return 200 <= resp.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False
