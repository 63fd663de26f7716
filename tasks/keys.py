"""Stage cache keys: a stage is skipped on re-run only when nothing it depends on changed.

A key covers the stage name, its config section, the content digests of its inputs and the code
version (a digest of the ``colar_core`` sources). Stage outputs go to a folder named by the key,
so a failed stage re-run with the same key finds its own checkpoints and resumes from them.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any

import colar_core

PACKAGE_ROOT = Path(colar_core.__file__).resolve().parent


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """sha256 over the library's Python sources (path and bytes), so any code change re-keys stages."""
    h = hashlib.sha256()
    for path in sorted(PACKAGE_ROOT.rglob("*.py")):
        h.update(str(path.relative_to(PACKAGE_ROOT)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def stage_key(stage: str, section: Any, inputs: dict[str, Any]) -> str:
    """The cache key of ``stage``: sha256 of its name, config section, input digests and the code version."""
    payload = json.dumps({"stage": stage, "config": section, "inputs": inputs, "code": code_version()},
                         sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def stage_dir(output_dir: str | Path, stage: str, key: str) -> Path:
    """The folder of a stage run: ``<output_dir>/<stage>-<key[:12]>`` (absolute)."""
    return Path(output_dir).resolve() / f"{stage}-{key[:12]}"


def cache_key_from_param(context, parameters) -> str:
    """Prefect cache_key_fn: each stage task receives its precomputed key as ``key``."""
    return parameters["key"]
