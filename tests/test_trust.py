"""Issue 12, trust boundaries: a model folder is data. Its ``colar_config.json`` cannot turn on
remote code nor pick a LoRA base outside the folder (only the caller can), and a pickled LoRA
adapter is refused before anything is unpickled (docs/RELIABILITY.md, "Trust boundaries and secrets")."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from bench.tiny import tiny_model, tiny_tokenizer
from colar_core.config import LoraConfig, ModelConfig
from colar_core.model import CONFIG_FILE, ColarModel, UntrustedModelError
from colar_core.training.sft import SFTJob, load_model_and_tokenizer
from tests.helpers import Payload  # unpickling it would create a marker file

pytestmark = pytest.mark.one_torch_thread  # see tests/conftest.py


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    """A full fine-tune folder and a LoRA folder (with its own base/), both tiny."""
    tok = tiny_tokenizer()
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    tiny_model(tok, hidden=32, layers=1, heads=2).save_pretrained(root / "full", tok)
    tiny_model(tok, hidden=32, layers=1, heads=2, lora=LoraConfig(r=2, alpha=4)).save_pretrained(root / "lora", tok)
    return {"full": root / "full", "lora": root / "lora"}


def _copy_with_config(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / CONFIG_FILE).read_text())
    (dst / CONFIG_FILE).write_text(json.dumps({**config, **changes}))
    return dst


def _spy_auto_model(monkeypatch) -> list[dict]:
    from transformers import AutoModelForCausalLM

    calls: list[dict] = []
    original = AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        calls.append({"path": str(args[0]), **kwargs})
        return original(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    return calls


def test_a_folder_cannot_turn_on_remote_code_itself(saved, tmp_path, monkeypatch):
    folder = _copy_with_config(saved["full"], tmp_path / "asks", trust_remote_code=True)
    calls = _spy_auto_model(monkeypatch)
    for load in (ColarModel.from_pretrained, ColarModel.load_dir):
        with pytest.raises(UntrustedModelError) as info:
            load(folder)
        assert str(folder) in str(info.value) and "trust_remote_code=True" in str(info.value)
    assert calls == []  # refused before any weights were looked at
    model, _ = ColarModel.load_dir(folder, trust_remote_code=True)  # the caller allows it
    assert calls and all(c["trust_remote_code"] is True for c in calls)
    calls.clear()
    ColarModel.from_pretrained(saved["full"])  # an ordinary folder: nothing to allow
    assert [c["trust_remote_code"] for c in calls] == [False]


def test_the_lora_base_is_the_folders_own_or_the_callers_never_one_the_folder_names(saved, tmp_path, monkeypatch):
    outside = tmp_path / "somewhere-else"
    folder = _copy_with_config(saved["lora"], tmp_path / "lora", base_model=str(outside))
    shutil.move(str(folder / "base"), str(outside))
    calls = _spy_auto_model(monkeypatch)
    with pytest.raises(UntrustedModelError) as info:
        ColarModel.from_pretrained(folder)
    message = str(info.value)
    assert str(folder) in message and f"base_model={str(outside)!r}" in message and "explicitly" in message
    hub = _copy_with_config(folder, tmp_path / "hub", base_model="someone/evil-model")
    with pytest.raises(UntrustedModelError, match="'someone/evil-model'"):
        ColarModel.load_dir(hub)
    assert calls == []
    loaded = ColarModel.from_pretrained(folder, base_model=str(outside))  # the caller names it
    assert loaded.is_lora and [c["path"] for c in calls] == [str(outside)]
    calls.clear()
    ColarModel.from_pretrained(saved["lora"])  # its own base/ folder
    assert [c["path"] for c in calls] == [str(saved["lora"] / "base")]


def test_a_pickled_lora_adapter_is_refused_unopened(saved, tmp_path, monkeypatch):
    folder = tmp_path / "pickled"
    shutil.copytree(saved["lora"], folder)
    (folder / "adapter" / "adapter_model.safetensors").unlink()
    marker = tmp_path / "pwned"
    with open(folder / "adapter" / "adapter_model.bin", "wb") as fh:
        pickle.dump({"base_model.model.lm_head.weight": Payload(str(marker))}, fh)
    loads: list = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a) or pytest.fail("torch.load was called"))
    with pytest.raises(UntrustedModelError, match=r"adapter_model\.bin \(pickled weights, refused unopened\)"):
        ColarModel.load_dir(folder)
    assert loads == [] and not marker.exists()


def test_the_callers_config_decides_for_init_from_and_the_pyfunc(saved, tmp_path):
    from tasks.pyfunc_model import ColarPyfunc

    folder = _copy_with_config(saved["full"], tmp_path / "asks", trust_remote_code=True)
    job = SFTJob(output_dir=str(tmp_path / "out"), init_from=str(folder))
    with pytest.raises(UntrustedModelError, match="trust_remote_code"):
        load_model_and_tokenizer(job, [], [])
    allowed = job.model_copy(update={"model": ModelConfig(trust_remote_code=True)})
    model, _ = load_model_and_tokenizer(allowed, [], [])
    assert model.state.trust_remote_code

    context = SimpleNamespace(artifacts={"colar_model": str(folder)}, model_config={})
    with pytest.raises(UntrustedModelError, match="trust_remote_code"):
        ColarPyfunc().load_context(context)
    context.model_config = {"trust_remote_code": True}  # mlflow.pyfunc.load_model(uri, model_config=...)
    ColarPyfunc().load_context(context)

    assert ColarModel.load_options(ModelConfig()) == {"trust_remote_code": False, "base_model": None}
    assert ColarModel.load_options(ModelConfig(name_or_path="org/base", trust_remote_code=True)) == {
        "trust_remote_code": True, "base_model": "org/base"}
