"""A stage described once: the task, its name, its config, its output folder, the digests of what
it reads and its other arguments. Its cache key, its folder and the task's call all come from that
one description, so the key cannot cover a config (or an output folder) other than the one the task
receives.

A stage task returns a typed result (a :class:`StageResult`: ``PrepareResult``, ``TrainResult``,
``EvaluateResult`` beside their tasks), which Prefect persists as JSON for the cache, and leaves the
same result in ``<folder>/stage_result.json`` (:meth:`StageResult.save`, written atomically): a stage
whose cached result points at a folder that no longer holds that file runs again. (A training job's
own ``result.json`` in the same folder is another record, of the job: :mod:`colar_core.training.stage`.)
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from pydantic import BaseModel, ConfigDict, ValidationError
from typing_extensions import Self

from colar_core.files import atomic_write_json
from tasks.keys import StageCode, absolute_dir, stage_dir, stage_key
from tasks.keys import spec_digest as _spec_digest

__all__ = ["STAGE_RESULT_FILE", "StageResult", "StageSpec", "stage_folder"]

STAGE_RESULT_FILE = "stage_result.json"


class StageResult(BaseModel):
    """What a stage task returns and what the flow reads of it, by attribute: a renamed or missing
    field is a type checker's error in the flow, and an error naming the field when a result is
    loaded (extra fields are refused too). Frozen: a result is a record, not a workspace.

    Every stage result has its MLflow child run and the time of its own work (the colar_core call,
    what the flow's ``time/<stage>/work_s`` reports)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mlflow_run_id: str
    work_s: float

    def save(self, folder: Union[str, os.PathLike]) -> Self:
        """Write the result to ``folder/stage_result.json`` atomically (a crash leaves the old file or
        the new one, never half of one) and return it."""
        atomic_write_json(Path(folder) / STAGE_RESULT_FILE, self.model_dump(mode="json"))
        return self

    @classmethod
    def load(cls, folder: Union[str, os.PathLike]) -> Self:
        """The result saved in ``folder`` (:meth:`save`); a file that does not match the class is a
        ``ValueError`` naming the file and the fields."""
        path = Path(folder) / STAGE_RESULT_FILE
        try:
            return cls.model_validate_json(path.read_bytes())
        except ValidationError as err:
            raise ValueError(f"{path} is not a {cls.__name__}: {err}") from None


@dataclass(frozen=True)
class StageSpec:
    """One stage of a flow.

    ``task``: the Prefect task (with its options). ``name``: the stage name of the key, of the
    folder ``<output_dir>/<name>-<key[:12]>`` and of the Prefect task run. ``config``: the task's
    config arguments by keyword; they make the key's config section and are passed to the task.
    ``output_dir``: the run's output folder, made absolute when the spec is made (a later
    ``chdir`` does not move it); that path is part of the key. ``inputs``:
    content digests of what the stage reads (data, models; see :mod:`tasks.keys`); key only.
    ``args``: the task's other arguments (paths, run ids); call only. ``code``: the code the stage
    runs (:class:`~tasks.keys.StageCode`), whose digest the key holds. The task also receives
    ``out_dir`` and ``key``.
    """

    task: Any
    name: str
    config: Mapping[str, Any]
    output_dir: Union[str, os.PathLike]
    inputs: Mapping[str, Optional[str]] = field(default_factory=dict)
    args: Mapping[str, Any] = field(default_factory=dict)
    code: StageCode = field(kw_only=True)

    def __post_init__(self) -> None:
        object.__setattr__(self, "output_dir", absolute_dir(self.output_dir))

    @functools.cached_property
    def code_digest(self) -> str:
        return self.code.digest()

    @functools.cached_property
    def spec_digest(self) -> str:
        """What the stage is asked to do, its code aside (:func:`~tasks.keys.spec_digest`)."""
        return _spec_digest(self.name, dict(self.config), self.inputs, self.output_dir)

    @functools.cached_property
    def key(self) -> str:
        return stage_key(self.name, dict(self.config), self.inputs, self.output_dir, self.code_digest)

    @functools.cached_property
    def folder(self) -> Path:
        return stage_dir(self.output_dir, self.name, self.key)

    def run(self, *, refresh: bool = False):
        """Call the task in the stage's folder; return its Prefect state. A result cached under the
        same key is used only while the folder still holds it (:data:`STAGE_RESULT_FILE`) and
        ``refresh`` is False; otherwise the task runs again."""
        options: dict[str, Any] = {"task_run_name": self.name}
        if refresh or not (self.folder / STAGE_RESULT_FILE).is_file():
            options["refresh_cache"] = True
        return self.task.with_options(**options)(**self.config, **self.args, out_dir=str(self.folder),
                                                   key=self.key, return_state=True)


def stage_folder(out_dir: Union[str, os.PathLike]) -> Path:
    """The stage's folder ``out_dir``, created if missing."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return out

