"""What a run could not send to MLflow while the server was away: its pending file.

A run's pending file ``<folder>/<run_id>.jsonl`` (:func:`pending_path`) holds typed records, one JSON
object a line: the metrics and tags the training callback could not send (:class:`MetricRecord`,
:class:`TagRecord`), the artifacts a stage logs at its end (:class:`ArtifactRecord`) and the run's end
(:class:`EndRecord`). :func:`append_records` is the one writer (append, flush, fsync), :func:`read_records`
the one reader and :func:`replay_pending` sends a file.

The folder is absolute and chosen once per pipeline run: ``$COLAR_HOME/unflushed`` as it is when the
parent run starts (``COLAR_HOME`` defaults to ``./.colar`` under the folder ``colar run`` started in).
The parent run records it in its tag ``colar.pending_dir`` (:data:`PENDING_DIR_TAG`) and this process
remembers it for the parent and every child run it starts (:func:`remember_pending_dir`), so every writer
uses it whatever the current folder, and ``colar retry`` finds the files from any folder
(:func:`colar_infra.tracking.runs.settle_pending`). A run this process knows nothing about writes to the
current home's ``unflushed`` folder (:func:`pending_dir` with no run).

One line per record, as :meth:`MetricRecord.to_json` and the others write it::

    {"run_id": "...", "key": "loss", "value": 0.25, "step": 7, "timestamp": 1700000000000}
    {"run_id": "...", "tag": "colar.checkpoint.step", "value": "10"}
    {"run_id": "...", "artifact": "/abs/path/model", "artifact_path": "model"}
    {"run_id": "...", "end": "FINISHED", "end_time": 1700000000000}

A metric that is NaN or infinite is written as JSON's ``NaN`` / ``Infinity`` / ``-Infinity`` (what Python's
``json`` writes and reads back as floats), never as a string.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import threading
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Optional, Union

from mlflow import MlflowClient
from mlflow.entities import Metric, RunTag

from colar_infra.home import colar_home
from colar_infra.tracking.params import MAX_METRICS_PER_BATCH, MAX_PARAMS_PER_BATCH

__all__ = [
    "ArtifactRecord",
    "EndRecord",
    "MetricRecord",
    "PENDING_DIR_TAG",
    "PendingRecord",
    "TagRecord",
    "append_records",
    "apply_record",
    "from_json",
    "pending_dir",
    "pending_path",
    "PendingRead",
    "Unreadable",
    "read_records",
    "rejected_path",
    "remember_pending_dir",
    "remembered_pending_dir",
    "replay_pending",
]


#: Tag of a pipeline's parent run: the absolute folder of the pending files of the parent and its children.
PENDING_DIR_TAG = "colar.pending_dir"

_FOLDERS: dict[str, Path] = {}  # run id -> its pending folder, for the runs this process started or resumed
_FOLDERS_LOCK = threading.Lock()


def pending_dir(run_id: Optional[str] = None) -> Path:
    """The folder of ``run_id``'s pending file, absolute: the one remembered for its pipeline run
    (:func:`remember_pending_dir`); for another run, or with no run, ``$COLAR_HOME/unflushed``
    (:func:`colar_infra.home.colar_home`, as for the local servers) made absolute now."""
    folder = remembered_pending_dir(run_id) if run_id is not None else None
    return folder if folder is not None else (colar_home() / "unflushed").absolute()


def remembered_pending_dir(run_id: str) -> Optional[Path]:
    """The pending folder this process remembers for ``run_id`` (:func:`remember_pending_dir`), or None."""
    with _FOLDERS_LOCK:
        return _FOLDERS.get(run_id)


def remember_pending_dir(folder: Union[str, os.PathLike], *run_ids: str) -> Path:
    """From now on, in this process, the pending files of ``run_ids`` go to ``folder`` (made absolute),
    whatever the current folder; returns it. The tracking helpers call it when they start or resume a
    run (:mod:`colar_infra.tracking.runs`)."""
    path = Path(folder).absolute()
    with _FOLDERS_LOCK:
        _FOLDERS.update(dict.fromkeys(run_ids, path))
    return path


def pending_path(run_id: str) -> Path:
    """The pending file of ``run_id`` (in :func:`pending_dir` of the run): what the run still has to send
    to MLflow, one JSON record a line."""
    return pending_dir(run_id) / f"{run_id}.jsonl"


# ---- the records ----------------------------------------------------------------------------------


def _field(obj: Mapping[str, Any], name: str, kinds: tuple[type, ...], what: str, *, optional: bool = False) -> Any:
    """``obj[name]`` if it is one of ``kinds`` (bool is not a number here); else a ValueError naming the field."""
    value = obj.get(name)
    if value is None and optional:
        return None
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise ValueError(f"field {name!r} of a {what} record must be {' or '.join(k.__name__ for k in kinds)}, "
                         f"not {value!r}")
    return value


@dataclass(frozen=True)
class MetricRecord:
    """A metric value of run ``run_id`` at ``step``, logged at ``timestamp`` (ms since the epoch)."""

    MARKER: ClassVar[str] = "key"

    run_id: str
    key: str
    value: float
    step: int
    timestamp: int

    def to_json(self) -> str:
        """One line of the pending file (a NaN or infinite value as JSON's ``NaN`` / ``Infinity``)."""
        return json.dumps({"run_id": self.run_id, "key": self.key, "value": float(self.value), "step": self.step,
                           "timestamp": self.timestamp})

    @classmethod
    def _from_obj(cls, obj: Mapping[str, Any]) -> MetricRecord:
        return cls(_field(obj, "run_id", (str,), "metric"), _field(obj, "key", (str,), "metric"),
                   _metric_value(obj), _field(obj, "step", (int,), "metric"),
                   _field(obj, "timestamp", (int,), "metric"))


#: Non-finite values as files written before the one writer held them (strings); read back as floats.
_NON_FINITE = {"NaN": math.nan, "nan": math.nan, "Infinity": math.inf, "inf": math.inf,
               "-Infinity": -math.inf, "-inf": -math.inf}


def _metric_value(obj: Mapping[str, Any]) -> float:
    value = obj.get("value")
    if isinstance(value, str) and value in _NON_FINITE:
        return _NON_FINITE[value]
    return float(_field(obj, "value", (int, float), "metric"))


@dataclass(frozen=True)
class TagRecord:
    """A tag ``key=value`` of run ``run_id``."""

    MARKER: ClassVar[str] = "tag"

    run_id: str
    key: str
    value: str

    def to_json(self) -> str:
        """One line of the pending file."""
        return json.dumps({"run_id": self.run_id, "tag": self.key, "value": self.value})

    @classmethod
    def _from_obj(cls, obj: Mapping[str, Any]) -> TagRecord:
        return cls(_field(obj, "run_id", (str,), "tag"), _field(obj, "tag", (str,), "tag"),
                   _field(obj, "value", (str,), "tag"))


@dataclass(frozen=True)
class ArtifactRecord:
    """A local file or folder ``local_path`` to log to run ``run_id`` under ``artifact_path`` (None: the root)."""

    MARKER: ClassVar[str] = "artifact"

    run_id: str
    local_path: str
    artifact_path: Optional[str] = None

    def to_json(self) -> str:
        """One line of the pending file."""
        return json.dumps({"run_id": self.run_id, "artifact": self.local_path, "artifact_path": self.artifact_path})

    @classmethod
    def _from_obj(cls, obj: Mapping[str, Any]) -> ArtifactRecord:
        return cls(_field(obj, "run_id", (str,), "artifact"), _field(obj, "artifact", (str,), "artifact"),
                   _field(obj, "artifact_path", (str,), "artifact", optional=True))


@dataclass(frozen=True)
class EndRecord:
    """The end of run ``run_id``: its ``status`` (FINISHED, FAILED, KILLED) at ``end_time`` (ms since the epoch)."""

    MARKER: ClassVar[str] = "end"

    run_id: str
    status: str
    end_time: int

    def to_json(self) -> str:
        """One line of the pending file."""
        return json.dumps({"run_id": self.run_id, "end": self.status, "end_time": self.end_time})

    @classmethod
    def _from_obj(cls, obj: Mapping[str, Any]) -> EndRecord:
        return cls(_field(obj, "run_id", (str,), "end"), _field(obj, "end", (str,), "end"),
                   _field(obj, "end_time", (int,), "end"))


PendingRecord = Union[MetricRecord, TagRecord, ArtifactRecord, EndRecord]

#: The record types by the key that marks them in a line (checked in this order).
_BY_MARKER: dict[str, type[PendingRecord]] = {
    cls.MARKER: cls for cls in (TagRecord, ArtifactRecord, EndRecord, MetricRecord)}


def from_json(line: str) -> PendingRecord:
    """The record one line of a pending file holds (what ``record.to_json()`` wrote). A line that is not
    JSON raises ``json.JSONDecodeError``; one that is not a record, ValueError naming the field."""
    obj = json.loads(line)
    if not isinstance(obj, dict):
        raise ValueError(f"a pending record is a JSON object, not {obj!r}")
    for marker, cls in _BY_MARKER.items():
        if marker in obj:
            return cls._from_obj(obj)
    raise ValueError(f"not a pending record (none of the fields {sorted(_BY_MARKER)}): {obj!r}")


# ---- the writer and the reader ------------------------------------------------------------------


def append_records(path: Union[str, os.PathLike], records: Iterable[PendingRecord]) -> Path:
    """Append ``records`` to the pending file ``path`` (folders created) in one write, flushed and
    fsynced before returning: what a run could not send survives a crash that follows. A last line cut
    short by an earlier crash is ended first, so it costs only itself. Returns the file."""
    target = Path(path)
    data = "".join(record.to_json() + "\n" for record in records).encode()
    if not data:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "a+b") as fh:
        if fh.seek(0, os.SEEK_END) > 0:
            fh.seek(-1, os.SEEK_END)
            if fh.read(1) != b"\n":
                data = b"\n" + data
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    return target


@dataclass(frozen=True)
class Unreadable:
    """A line of a pending file that holds no record: cut short by a crash (perhaps with another record
    appended onto it) or a record with a bad field. ``line`` counts from 1; ``text`` is the line as written."""

    line: int
    text: str
    reason: str


@dataclass(frozen=True)
class PendingRead:
    """What :func:`read_records` found in a pending file: its records in the order written, and the lines
    that hold none."""

    records: list[PendingRecord]
    unreadable: list[Unreadable]


def read_records(path: Union[str, os.PathLike]) -> PendingRead:
    """The records of the pending file ``path``, in the order written, and the lines that hold none (cut
    short, or a record with a bad field: each named by its line and reason). A bad line costs only itself:
    the records around it are read."""
    path = Path(path)
    records: list[PendingRecord] = []
    unreadable: list[Unreadable] = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(from_json(line))
        except json.JSONDecodeError as err:
            unreadable.append(Unreadable(number, line, f"not JSON (cut short by a crash?): {err.msg}"))
        except ValueError as err:
            unreadable.append(Unreadable(number, line, str(err)))
    return PendingRead(records, unreadable)


def rejected_path(path: Union[str, os.PathLike]) -> Path:
    """Where :func:`replay_pending` sets aside the unreadable lines of the pending file ``path``."""
    path = Path(path)
    return path.with_name(path.name + ".rejected")


# ---- sending -----------------------------------------------------------------------------------


def apply_record(client: MlflowClient, record: Union[ArtifactRecord, EndRecord]) -> None:
    """Do what one artifact or end record says, now. A pending artifact that no longer exists is skipped
    with a warning (nothing is left to send, and it must not block the rest)."""
    if isinstance(record, ArtifactRecord):
        local = Path(record.local_path)
        if not local.exists():
            warnings.warn(f"pending artifact {local} of run {record.run_id} no longer exists: not logged",
                          RuntimeWarning, stacklevel=2)
        elif local.is_dir():
            client.log_artifacts(record.run_id, str(local), record.artifact_path)
        else:
            client.log_artifact(record.run_id, str(local), record.artifact_path)
    elif isinstance(record, EndRecord):
        client.set_terminated(record.run_id, status=record.status, end_time=record.end_time)
    else:
        raise TypeError(f"apply_record: an ArtifactRecord or EndRecord, not {record!r}")


@dataclass
class _RunRecords:
    """The records of one run in a pending file, in the order they are sent."""

    metrics: list[MetricRecord] = dataclasses.field(default_factory=list)
    tags: list[TagRecord] = dataclasses.field(default_factory=list)
    artifacts: list[ArtifactRecord] = dataclasses.field(default_factory=list)
    ends: list[EndRecord] = dataclasses.field(default_factory=list)


def _by_run(records: Iterable[PendingRecord]) -> dict[str, _RunRecords]:
    by_run: dict[str, _RunRecords] = {}
    for record in records:
        run = by_run.setdefault(record.run_id, _RunRecords())
        if isinstance(record, MetricRecord):
            run.metrics.append(record)
        elif isinstance(record, TagRecord):
            run.tags.append(record)
        elif isinstance(record, ArtifactRecord):
            run.artifacts.append(record)
        else:
            run.ends.append(record)
    return by_run


def replay_pending(path: Union[str, os.PathLike], client: MlflowClient) -> int:
    """Send what the pending file ``path`` holds with ``client``: per run, metrics, then tags, then
    artifacts, then the last end recorded, so a run is ended only once everything else is there. Returns
    the number of records sent; the file is renamed ``*.replayed`` afterwards. Sending twice is harmless
    (MLflow keeps one copy of an identical metric; artifacts are overwritten).

    Lines that hold no record (:func:`read_records`) do not stop the rest: they are appended, as written,
    to :func:`rejected_path` and counted in a warning naming each line and why."""
    path = Path(path)
    found = read_records(path)
    if found.unreadable:
        rejected = rejected_path(path)
        with open(rejected, "a") as fh:
            fh.write("".join(u.text + "\n" for u in found.unreadable))
            fh.flush()
            os.fsync(fh.fileno())
        detail = "; ".join(f"line {u.line}: {u.reason}" for u in found.unreadable[:5])
        more = f" (and {len(found.unreadable) - 5} more)" if len(found.unreadable) > 5 else ""
        warnings.warn(f"pending file {path}: {len(found.unreadable)} line(s) hold no record and were set aside in "
                      f"{rejected}: {detail}{more}; the {len(found.records)} other record(s) are sent",
                      RuntimeWarning, stacklevel=2)
    sent = 0
    for run_id, run in _by_run(found.records).items():
        metrics = [Metric(m.key, m.value, m.timestamp, m.step) for m in run.metrics]
        for i in range(0, len(metrics), MAX_METRICS_PER_BATCH):
            metric_chunk = metrics[i : i + MAX_METRICS_PER_BATCH]
            client.log_batch(run_id, metrics=metric_chunk, synchronous=True)
            sent += len(metric_chunk)
        tags = [RunTag(t.key, t.value) for t in run.tags]
        for i in range(0, len(tags), MAX_PARAMS_PER_BATCH):
            tag_chunk = tags[i : i + MAX_PARAMS_PER_BATCH]
            client.log_batch(run_id, tags=tag_chunk, synchronous=True)
            sent += len(tag_chunk)
        applied: list[Union[ArtifactRecord, EndRecord]] = [*run.artifacts, *run.ends[-1:]]  # the last end counts
        for record in applied:
            apply_record(client, record)
            sent += 1
    path.rename(path.with_name(path.name + ".replayed"))
    return sent
