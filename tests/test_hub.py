"""colar_core.hub: the one rule for "local path or hub id", which the readers, the pre-flight checks
and the model's save layout all follow, and the one read of the local Hugging Face cache (the stage
keys' revision, the pre-flight's "is it cached")."""

from __future__ import annotations

from pathlib import Path

import pytest

from colar_core.data import DataError, resolve_format
from colar_core.hub import DATA_SUFFIXES, CachedRepo, hub_cache, is_cached, is_saved_dataset, looks_like_path
from colar_core.model import base_is_local

#: Names that exist nowhere here: meant as paths, or hub ids.
PATHS = ["/abs/none", "./rel", "../up", "~/home-dir", "a/b/c", "dir\\file", ".hidden"]
HUB_IDS = ["org/name", "gpt2", "org/name-v1.5", "HuggingFaceTB/SmolLM2-135M"]
DATA_FILES = ["train.jsonl", "x.json", "x.txt", "sets.csv", "x.parquet", "x.gz", "org/x.jsonl"]


def test_names_meant_as_paths_and_hub_ids():
    assert all(looks_like_path(name) for name in PATHS)
    assert not any(looks_like_path(name) for name in HUB_IDS + DATA_FILES)
    assert all(looks_like_path(name, DATA_SUFFIXES) for name in DATA_FILES)
    assert not any(looks_like_path(name, DATA_SUFFIXES) for name in HUB_IDS)


def test_the_readers_follow_the_rule():
    """A missing source meant as a path is 'file not found' at once; a hub id is left to the hub."""
    for name in PATHS + DATA_FILES:
        with pytest.raises(DataError, match="file not found"):
            resolve_format(name)
    assert all(resolve_format(name) == "hf" for name in HUB_IDS)


def test_the_model_layout_follows_the_rule(tmp_path):
    """A LoRA model keeps its base in its folder unless the base is a hub id."""
    assert all(base_is_local(name) for name in [*PATHS, "tiny", str(tmp_path)])
    assert not any(base_is_local(name) for name in HUB_IDS)


def test_the_preflight_follows_the_rule(monkeypatch):
    from huggingface_hub import constants

    from flows.config import ConfigError, load_config, preflight

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # no network: a hub id is only looked up in the cache
    with pytest.raises(ConfigError, match=r"field 'data\.source': file or directory 'a/b/c\.jsonl' does not exist"):
        preflight(load_config(None, ["data.source=a/b/c.jsonl"]))
    with pytest.raises(ConfigError, match=r"field 'model\.name_or_path': directory '\./none' does not exist"):
        preflight(load_config(None, ["model.name_or_path=./none"]))
    with pytest.raises(ConfigError, match=r"field 'data\.source': 'org/none' is not .* offline mode"):
        preflight(load_config(None, ["data.source=org/none"]))


def test_saved_dataset_folders_are_known_by_their_marker_files(tmp_path):
    (tmp_path / "saved").mkdir()
    (tmp_path / "saved" / "dataset_dict.json").write_text("{}")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "train.jsonl").write_text("{}\n")
    (tmp_path / "file.json").write_text("{}")
    assert is_saved_dataset(tmp_path / "saved") and is_saved_dataset(str(tmp_path / "saved"))
    assert not any(is_saved_dataset(tmp_path / name) for name in ("plain", "file.json", "missing"))


@pytest.fixture
def hub_root(tmp_path, monkeypatch) -> Path:
    from huggingface_hub import constants

    root = tmp_path / "hub"
    root.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))
    return root


def _repo(root: Path, folder: str, main: str | None = None, snapshots: tuple[str, ...] = ()) -> None:
    if main is not None:
        (root / folder / "refs").mkdir(parents=True)
        (root / folder / "refs" / "main").write_text(main + "\n")
    for name in snapshots:
        (root / folder / "snapshots" / name).mkdir(parents=True)


def test_the_cache_resolves_refs_main_else_the_only_snapshot(hub_root):
    _repo(hub_root, "models--org--main", main="a" * 40, snapshots=("b" * 40, "c" * 40))
    _repo(hub_root, "models--org--one", snapshots=("d" * 40,))
    _repo(hub_root, "models--org--two", snapshots=("e" * 40, "f" * 40))
    _repo(hub_root, "datasets--org--empty-ref", main="", snapshots=("g" * 40,))
    assert hub_cache("org/main", "model").revision == "a" * 40
    assert hub_cache("org/one", "model") == CachedRepo(None, ("d" * 40,))
    assert hub_cache("org/one", "model").revision == "d" * 40
    assert hub_cache("org/two", "model").revision is None  # two snapshots and no ref: not resolved
    assert hub_cache("org/empty-ref", "dataset").revision is None
    assert hub_cache("org/none", "model") == CachedRepo()
    assert hub_cache("org/main", "dataset") == CachedRepo()  # the repo type is part of the folder


def test_cached_means_a_snapshot_or_the_datasets_cache(hub_root, tmp_path, monkeypatch):
    from datasets import config as ds_config

    monkeypatch.setattr(ds_config, "HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    _repo(hub_root, "models--org--llm", snapshots=("a" * 40,))
    _repo(hub_root, "models--org--ref-only", main="b" * 40)
    (tmp_path / "datasets" / "org___arith").mkdir(parents=True)
    assert is_cached("org/llm", "model") and is_cached("org/arith", "dataset")
    assert not is_cached("org/ref-only", "model")  # a ref without a snapshot loads nothing
    assert not is_cached("org/arith", "model") and not is_cached("org/llm", "dataset")
