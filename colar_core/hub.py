"""Local path or Hugging Face hub id, and what the local Hugging Face cache holds of a hub id.

A model or data source is named by one string: an existing file or folder is read from disk; a name
that does not exist is a hub id (``org/name``) unless it was plainly meant as a path
(:func:`looks_like_path`), which is then a missing file, not a hub query. The readers
(:mod:`colar_core.data.readers`), the pipeline's pre-flight checks (``flows.config``) and the model's
save layout (:func:`colar_core.model.base_is_local`) all decide by this one rule.

:func:`hub_cache` reads the local hub cache for a repo without the network: the stage keys
(``tasks.keys``) take the commit it resolves to, the pre-flight checks whether anything is cached.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional, Union

__all__ = ["DATA_SUFFIXES", "HF_MARKERS", "CachedRepo", "hub_cache", "is_cached", "is_saved_dataset",
           "looks_like_path"]

#: Suffixes of data files: a data source ending in one is a local file, even when it does not exist.
DATA_SUFFIXES = (".txt", ".jsonl", ".json", ".csv", ".parquet", ".gz")
#: Files that mark a folder written by ``datasets``' ``save_to_disk``.
HF_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")

RepoType = Literal["model", "dataset"]


def looks_like_path(name: str, suffixes: tuple[str, ...] = ()) -> bool:
    """True when ``name`` was meant as a local path rather than a hub id ``org/name``: it starts with
    ``/``, ``.`` or ``~``, has more than one ``/`` or a backslash, or ends in one of ``suffixes``
    (:data:`DATA_SUFFIXES` for data sources). Says nothing of whether the path exists."""
    return (name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name
            or (bool(suffixes) and Path(name).suffix.lower() in suffixes))


def is_saved_dataset(path: Union[str, os.PathLike]) -> bool:
    """True for a folder written by ``datasets``' ``save_to_disk`` (it holds one of :data:`HF_MARKERS`)."""
    folder = Path(path)
    return folder.is_dir() and any((folder / marker).exists() for marker in HF_MARKERS)


@dataclass(frozen=True)
class CachedRepo:
    """What the local Hugging Face hub cache holds of one repo: the commit its ``refs/main`` names
    (``""`` for an empty file, None without one) and the names of its snapshot folders."""

    main: Optional[str] = None
    snapshots: tuple[str, ...] = ()

    @property
    def revision(self) -> Optional[str]:
        """The commit the cache resolves the repo to: ``refs/main``, else its only snapshot; None when
        neither names one."""
        if self.main is not None:
            return self.main or None
        return self.snapshots[0] if len(self.snapshots) == 1 else None


def hub_cache(repo_id: str, repo_type: RepoType) -> CachedRepo:
    """The local hub cache's entry for ``repo_id``, read from disk without the network (empty when the
    cache holds nothing of it, or ``huggingface_hub`` is missing)."""
    try:
        from huggingface_hub import constants
        from huggingface_hub.file_download import repo_folder_name
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers
        return CachedRepo()
    repo = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type=repo_type)
    ref = repo / "refs" / "main"
    main = ref.read_text().strip() if ref.is_file() else None
    folder = repo / "snapshots"
    snapshots = tuple(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else ()
    return CachedRepo(main, snapshots)


def is_cached(repo_id: str, repo_type: RepoType) -> bool:
    """True when ``repo_id`` can be loaded without the network: the hub cache holds a snapshot of it, or
    (a dataset) the ``datasets`` library's own processed cache holds it (``org___name``)."""
    if hub_cache(repo_id, repo_type).snapshots:
        return True
    if repo_type == "dataset":
        try:
            from datasets import config as ds_config
        except ImportError:  # pragma: no cover - datasets is a dependency
            return False
        return (Path(ds_config.HF_DATASETS_CACHE) / repo_id.replace("/", "___")).is_dir()
    return False
