"""A stage described once: the task, its name, its config, its output folder, the digests of what
it reads and its other arguments. Its cache key, its folder and the task's call all come from that
one description, so the key cannot cover a config (or an output folder) other than the one the task
receives.

A stage task leaves its result in ``<folder>/stage_result.json`` (:func:`save_result`): a stage
whose cached result points at a folder that is gone runs again.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from colar.tasks.keys import absolute_dir, stage_dir, stage_key

__all__ = ["RESULT_FILE", "StageSpec", "save_result", "stage_folder"]

RESULT_FILE = "stage_result.json"


@dataclass(frozen=True)
class StageSpec:
    """One stage of a flow.

    ``task``: the Prefect task (with its options). ``name``: the stage name of the key, of the
    folder ``<output_dir>/<name>-<key[:12]>`` and of the Prefect task run. ``config``: the task's
    config arguments by keyword; they make the key's config section and are passed to the task.
    ``output_dir``: the run's output folder, made absolute when the spec is made (a later
    ``chdir`` does not move it); that path is part of the key. ``inputs``:
    content digests of what the stage reads (data, models; see :mod:`colar.tasks.keys`); key only.
    ``args``: the task's other arguments (paths, run ids); call only. The task also receives
    ``out_dir`` and ``key``.
    """

    task: Any
    name: str
    config: Mapping[str, Any]
    output_dir: Union[str, os.PathLike]
    inputs: Mapping[str, Optional[str]] = field(default_factory=dict)
    args: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "output_dir", absolute_dir(self.output_dir))

    @functools.cached_property
    def key(self) -> str:
        return stage_key(self.name, dict(self.config), self.inputs, self.output_dir)

    @functools.cached_property
    def folder(self) -> Path:
        return stage_dir(self.output_dir, self.name, self.key)

    def run(self):
        """Call the task in the stage's folder; return its Prefect state. A result cached under the
        same key is used only while the folder still holds it (:data:`RESULT_FILE`); otherwise
        the task runs again."""
        options: dict[str, Any] = {"task_run_name": self.name}
        if not (self.folder / RESULT_FILE).is_file():
            options["refresh_cache"] = True
        return self.task.with_options(**options)(**self.config, **self.args, out_dir=str(self.folder),
                                                   key=self.key, return_state=True)


def stage_folder(out_dir: Union[str, os.PathLike]) -> Path:
    """The stage's folder ``out_dir``, created if missing."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return out


def save_result(out_dir: Path, result: dict) -> dict:
    """Write a stage's result to its folder (:data:`RESULT_FILE`) and return it."""
    (out_dir / RESULT_FILE).write_text(json.dumps(result, indent=2, sort_keys=True))
    return result
