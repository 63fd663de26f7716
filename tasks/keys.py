"""Stage cache keys: a stage is skipped on re-run only when nothing it depends on changed.

A key covers the stage name, its config section, the content digests of its inputs (files and
folders by content, hub ids by the revision the local cache resolves), the absolute output folder
and the digest of **the code the stage runs** (:class:`StageCode`), not of the whole repository.
Stage outputs go to a folder under the output folder named by the key, so a failed stage re-run
with the same key finds its own checkpoints and resumes from them, and a result cached for one
output folder is never handed to another.

The grain of the code digest (one module = one unit): a stage's code is

* its Prefect task module (the file alone: ``tasks/training.py`` for every training stage,
  ``tasks/prepare.py``, ``tasks/evaluate.py``) and ``tasks/stage_spec.py`` (the shape of every
  stage result, which the cache stores);
* the ``colar_core`` modules it calls (:data:`STAGE_ENTRIES`: the SFT job for ``sft-cot``,
  ``sft-colar`` and ``sft-nocot``, the RL job for ``rl``, the baseline job for ``sft-icot``,
  ``sft-coconut`` and ``sft-distill``, the evaluation suite for ``evaluate``, data preparation for
  ``prepare``) and every ``colar_core`` module those import, at the top or inside a function,
  transitively (a static walk of their ``import`` statements: :func:`library_closure`);
* except :data:`VALIDATION_MODULE` (generation and scoring during training), which a training
  stage runs only when it validates (``eval_every > 0``): the walk stops there otherwise.

So an edit to the report task, the flows, the CLI, the servers, the backends or the tracking
plumbing (``colar_infra``) re-keys no stage (the report step is not cached: it always runs); an
edit to ``colar_core/scoring.py`` re-keys what scores (evaluate, and RL, whose rewards score
answers; a training stage that validates), not the other training stages; an edit to the training
loop re-keys every training stage. :func:`code_version`, the digest of all the code, is recorded
on the parent run (``colar.code_version``) for reference; no key holds it.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

from colar_core.config import TEST_SPLIT
from colar_core.data.bundled import resolve_bundled
from colar_core.files import content_digest
from colar_core.hub import hub_cache

#: The packages of colar's code (:func:`code_version`, the parent run's ``colar.code_version``).
CODE_PACKAGES = ("colar_core", "colar_infra", "tasks", "flows")
#: The method library: the package whose imports :func:`library_closure` follows.
LIBRARY = "colar_core"
#: Validation during training: in a training stage's code only when it validates (``eval_every > 0``).
VALIDATION_MODULE = "colar_core.training.validation"
#: Every stage's code holds this module: the shape of the stage results the cache stores.
RESULT_MODULE = "tasks.stage_spec"
#: What each kind of stage calls in the library: its task module and its ``colar_core`` entry points
#: (an in-process call and the module a launcher runs in each process).
STAGE_ENTRIES: dict[str, tuple[str, tuple[str, ...]]] = {
    "prepare": ("tasks.prepare", ("colar_core.data.prepare", "colar_core.tokenizer", "colar_core.config")),
    "sft": ("tasks.training", ("colar_core.training.sft", "colar_core.training.sft_main")),
    "rl": ("tasks.training", ("colar_core.rl.trainer", "colar_core.rl.rl_main")),
    "baseline": ("tasks.training", ("colar_core.baselines.stage", "colar_core.baselines.baseline_main")),
    "evaluate": ("tasks.evaluate", ("colar_core.evaluation_suite",)),
}


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


def module_file(name: str) -> Path:
    """The source file of the module ``name`` (a package: its ``__init__.py``)."""
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
        raise ModuleNotFoundError(f"no Python source for module {name}")
    return Path(spec.origin)


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a parent that is a module, not a package
        return False


@functools.lru_cache(maxsize=None)
def imported_modules(name: str) -> tuple[str, ...]:
    """The ``colar_core`` modules the module ``name`` imports, at its top or inside a function (what
    its code can run), with the packages that hold them (importing a module runs its packages'
    ``__init__``). ``from pkg import name`` counts ``pkg.name`` when that is a module, and the module a
    package's lazy ``__getattr__`` table (``_LAZY``) names for it otherwise."""
    path = module_file(name)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_bytes(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            found.add(base)
            for alias in node.names:
                if _is_module(f"{base}.{alias.name}"):
                    found.add(f"{base}.{alias.name}")
                elif base.startswith(LIBRARY) and (lazy := _lazy_table(base).get(alias.name)):
                    found.add(f"{base}.{lazy}")
    closure: set[str] = set()
    for module in found:
        if module.split(".")[0] == LIBRARY and _is_module(module):
            parts = module.split(".")
            closure.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    closure.discard(name)
    return tuple(sorted(closure))


def _lazy_table(package: str) -> dict[str, str]:
    """A package's ``_LAZY`` table (attribute -> submodule) read from its source, or empty."""
    try:
        tree = ast.parse(module_file(package).read_bytes())
    except ModuleNotFoundError:
        return {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "_LAZY" for t in node.targets):
            return dict(ast.literal_eval(node.value))
    return {}


def library_closure(entries: tuple[str, ...], stop: frozenset[str] = frozenset()) -> list[str]:
    """``entries`` and every ``colar_core`` module they import, transitively (:func:`imported_modules`),
    with their packages; the walk neither enters nor counts the modules in ``stop``."""
    seen: set[str] = set()
    todo = [e for e in entries if e not in stop]
    for entry in entries:
        parts = entry.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]
    while todo:
        module = todo.pop()
        if module in seen or module in stop:
            continue
        seen.add(module)
        todo.extend(imported_modules(module))
    return sorted(seen)


@functools.lru_cache(maxsize=None)
def source_digest(module: str) -> str:
    """sha256 of a module's source file. Computed once per process: the code a process runs does not
    change under it (and a test that changes "the code a stage reads" replaces this function)."""
    return hashlib.sha256(module_file(module).read_bytes()).hexdigest()


@dataclass(frozen=True)
class StageCode:
    """The code a stage runs (module docstring): its task module (the file alone), the ``colar_core``
    modules it calls (``entries``, followed transitively), and whether it validates during training
    (``validates``: then :data:`VALIDATION_MODULE` and what it imports are in, else the walk stops there)."""

    task: str
    entries: tuple[str, ...]
    validates: bool = False

    def modules(self) -> list[str]:
        """The module names whose sources make the stage's code digest, sorted."""
        stop = frozenset() if self.validates else frozenset({VALIDATION_MODULE})
        return sorted({self.task, RESULT_MODULE, *library_closure(self.entries, stop)})

    def digest(self) -> str:
        """sha256 over the stage's modules (name and source digest, :func:`source_digest`)."""
        h = hashlib.sha256()
        for module in self.modules():
            h.update(f"{module}\0{source_digest(module)}\n".encode())
        return h.hexdigest()


def stage_code(kind: Literal["prepare", "sft", "rl", "baseline", "evaluate"], *, validates: bool = False) -> StageCode:
    """The :class:`StageCode` of a kind of stage (:data:`STAGE_ENTRIES`); ``validates``: a training
    stage whose ``eval_every`` is above 0."""
    task, entries = STAGE_ENTRIES[kind]
    return StageCode(task, entries, validates)


def validates(train_section: Mapping[str, Any]) -> bool:
    """Whether a training section (a TrainConfig or RLConfig as a dict) validates during training."""
    return int(train_section.get("eval_every") or 0) > 0


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


def spec_digest(stage: str, section: Any, inputs: Mapping[str, Any], output_dir: Union[str, os.PathLike]) -> str:
    """sha256 of what a stage is asked to do, its code aside: its name, config section, input digests
    and absolute output folder. Two keys with the same spec digest differ by their code only (what
    ``colar retry`` checks before a failed stage resumes across a code change)."""
    payload = json.dumps({"stage": stage, "config": section, "inputs": dict(inputs),
                          "output_dir": str(absolute_dir(output_dir))}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def stage_key(stage: str, section: Any, inputs: Mapping[str, Any], output_dir: Union[str, os.PathLike],
              code: str) -> str:
    """The cache key of ``stage``: sha256 of its :func:`spec_digest` (name, config section, input
    digests, absolute output folder) and ``code``, the digest of the code it runs (:meth:`StageCode.digest`)."""
    return hashlib.sha256(f"{spec_digest(stage, section, inputs, output_dir)}:{code}".encode()).hexdigest()


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
