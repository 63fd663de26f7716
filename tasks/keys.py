"""Stage cache keys: a stage is skipped on re-run only when nothing it depends on changed.

A key covers the stage name, its config section, the content digests of its inputs (files and
folders by content, hub ids by the revision the local cache resolves), the absolute output folder
and the code version (a digest of the sources of ``colar_core``, ``tasks`` and
``flows``). Stage outputs go to a folder under the output folder named by the key, so a
failed stage re-run with the same key finds its own checkpoints and resumes from them, and a
result cached for one output folder is never handed to another.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Union

from colar_core.config import TEST_SPLIT
from colar_core.data.bundled import resolve_bundled
from colar_core.files import content_digest
from colar_core.hub import hub_cache

#: The packages whose code runs a stage: a change in any of their sources re-keys every stage.
CODE_PACKAGES = ("colar_core", "colar_infra", "tasks", "flows")


def code_files() -> list[tuple[str, Path]]:
    """``(name, path)`` of every Python source of :data:`CODE_PACKAGES`, in key order; ``name`` is
    ``<package>/<path inside it>``, so the key does not depend on where the code is installed."""
    files = []
    for package in CODE_PACKAGES:
        spec = importlib.util.find_spec(package)
        if spec is None:
            raise ModuleNotFoundError(f"code_files: package {package} is not importable")
        for root in map(Path, spec.submodule_search_locations or ()):
            files += [(f"{package}/{p.relative_to(root).as_posix()}", p) for p in root.rglob("*.py")]
    return sorted(files)


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """sha256 over the sources of :data:`CODE_PACKAGES` (name and bytes), so any code change re-keys
    stages. Computed once per process: the code a process runs does not change under it."""
    h = hashlib.sha256()
    for name, path in code_files():
        h.update(f"{name}\0{hashlib.sha256(path.read_bytes()).hexdigest()}\n".encode())
    return h.hexdigest()


def input_digest(ref: str, repo_type: Literal["model", "dataset"]) -> str:
    """What a cache key holds of an input named by ``ref``: ``sha256:<content digest>`` for an
    existing file or folder (a bundled data set by its file); for a hub id ``hub:<id>@<commit>``, the
    commit the local hub cache resolves it to (:func:`colar_core.hub.hub_cache`). When the local hub
    cache cannot resolve the id (not downloaded yet, or a dataset held only in the
    ``datasets`` library's own cache) it is ``hub:<id>@unresolved``: the key then covers the id
    only, and a new revision published under it is not seen."""
    if repo_type == "dataset" and (bundled := resolve_bundled(ref)) is not None:
        ref = bundled[0]
    if os.path.exists(ref):
        return f"sha256:{content_digest(ref)}"
    return f"hub:{ref}@{hub_cache(ref, repo_type).revision or 'unresolved'}"


def model_inputs(model: Mapping[str, Any]) -> dict[str, str]:
    """Input digests of a stage that builds its backbone from ``model`` (a ModelConfig as a dict):
    ``model.name_or_path`` and ``model.tokenizer`` unless 'tiny' or unset (then the config covers them);
    for a GGUF backbone ``model.gguf_file`` by its bytes instead of ``name_or_path`` (the same file).
    The folder it is converted into is not an input of its own: it follows from the file and the code."""
    gguf = model.get("gguf_file")
    return {f"model.{field}": input_digest(model[field], "model")
            for field in ("name_or_path", "tokenizer", "gguf_file")
            if model.get(field) not in (None, "tiny") and not (field == "name_or_path" and model[field] == gguf)}


def data_inputs(data: Mapping[str, Any]) -> dict[str, str]:
    """Input digests of the stage that reads ``data.source`` (a DataConfig as a dict); none for
    'builtin' (generated from the config, which the key covers)."""
    source = data["source"]
    return {} if source == "builtin" else {"data.source": input_digest(source, "dataset")}


def eval_inputs(eval_conf: Mapping[str, Any]) -> dict[str, str]:
    """Input digests of the evaluate stage's own test sets (an EvalConfig as a dict): one per set of
    ``eval.datasets`` read from a source other than the prepared test split (which the data digest
    covers)."""
    return {f"eval.{s['name']}": input_digest(s["source"], "dataset")
            for s in eval_conf.get("datasets") or () if s["source"] != TEST_SPLIT}


def absolute_dir(output_dir: Union[str, os.PathLike]) -> Path:
    """``output_dir`` as the key holds it: ``~`` expanded, absolute against the current directory,
    symlinks resolved (two spellings of one folder make one key)."""
    return Path(output_dir).expanduser().resolve()


def stage_key(stage: str, section: Any, inputs: Mapping[str, Any], output_dir: Union[str, os.PathLike]) -> str:
    """The cache key of ``stage``: sha256 of its name, config section, input digests, absolute
    output folder and the code version."""
    payload = json.dumps({"stage": stage, "config": section, "inputs": dict(inputs),
                          "output_dir": str(absolute_dir(output_dir)), "code": code_version()},
                         sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def stage_dir(output_dir: Union[str, os.PathLike], stage: str, key: str) -> Path:
    """The folder of a stage run: ``<output_dir>/<stage>-<key[:12]>`` (absolute, directly under
    the absolute ``output_dir``; a stage name that would leave it is refused)."""
    root = absolute_dir(output_dir)
    folder = Path(os.path.normpath(root / f"{stage}-{key[:12]}"))
    if folder.parent != root:
        raise ValueError(f"stage name {stage!r} would put its folder outside {root}")
    return folder


def cache_key_from_param(context, parameters) -> str:
    """Prefect cache_key_fn: each stage task receives its precomputed key as ``key``."""
    return parameters["key"]


#: The ``@task`` options of every cached stage: the key it receives, and its result persisted as
#: JSON (a stage result is a dict of paths, digests, run ids and numbers; no pickle to load back).
CACHED_STAGE: dict[str, Any] = dict(cache_key_fn=cache_key_from_param, persist_result=True, result_serializer="json")
