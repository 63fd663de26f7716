"""A stage described once: the task, its name, its config, the digests of what it reads and its
other arguments. Its cache key, its folder and the task's call all come from that one description,
so the key cannot cover a config other than the one the task receives.

A stage task leaves its result in ``<folder>/stage_result.json`` (:func:`save_result`): the flow
re-runs a stage whose cached result points at a folder that is gone.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from colar.tasks.keys import stage_dir, stage_key

__all__ = ["RESULT_FILE", "StageSpec", "save_result", "stage_folder"]

RESULT_FILE = "stage_result.json"


@dataclass(frozen=True)
class StageSpec:
    """One stage of a flow.

    ``task``: the Prefect task (with its options). ``name``: the stage name of the key and the
    folder ``<output_dir>/<name>-<key[:12]>``. ``config``: the task's config arguments by keyword;
    they make the key's config section and are passed to the task. ``inputs``: content digests of
    what the stage reads (data, models); key only. ``args``: the task's other arguments (paths,
    run ids); call only. The task also receives ``out_dir`` and ``key``.
    """

    task: Any
    name: str
    config: Mapping[str, Any]
    inputs: Mapping[str, Optional[str]] = field(default_factory=dict)
    args: Mapping[str, Any] = field(default_factory=dict)

    @functools.cached_property
    def key(self) -> str:
        return stage_key(self.name, dict(self.config), dict(self.inputs))

    def folder(self, output_dir: Union[str, os.PathLike]) -> Path:
        return stage_dir(output_dir, self.name, self.key)

    def run(self, output_dir: Union[str, os.PathLike], *, refresh: bool = False):
        """Call the task in the stage's folder under ``output_dir``; return its Prefect state.
        ``refresh`` runs it even if a result with the same key is cached."""
        task = self.task.with_options(refresh_cache=True) if refresh else self.task
        return task(**self.config, **self.args, out_dir=str(self.folder(output_dir)), key=self.key,
                    return_state=True)


def stage_folder(out_dir: Union[str, os.PathLike]) -> Path:
    """The stage's folder ``out_dir``, created if missing."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return out


def save_result(out_dir: Path, result: dict) -> dict:
    """Write a stage's result to its folder (:data:`RESULT_FILE`) and return it."""
    (out_dir / RESULT_FILE).write_text(json.dumps(result, indent=2, sort_keys=True))
    return result
