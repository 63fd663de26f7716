"""A LoRA model folder is portable: copied elsewhere with the original (and, for a local base, the
base folder) deleted, it still loads and gives the same output; nothing it loads from names a path
of the machine it was saved on."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from bench.tiny import PROBLEMS, encoder_for, tiny_model, tiny_tokenizer
from colar_core.config import GenerationConfig, LoraConfig, ModelConfig
from colar_core.inference import generate
from colar_core.model import ColarModel

pytestmark = pytest.mark.one_torch_thread  # see tests/conftest.py
GREEDY = GenerationConfig(do_sample=False, sample_latents=False, max_latents=4, max_answer_tokens=4)
LORA = LoraConfig(r=4, alpha=8)


def _texts(model, tok):
    return [g.text for g in generate(model, encoder_for(tok), [p.question for p in PROBLEMS], "latent", 2, GREEDY)]


def _no_paths(folder, tmp_path):
    """Only colar_config.json may name where the base came from (its record, not a load path)."""
    for f in folder.rglob("*.json"):
        if f.name != "colar_config.json":
            assert str(tmp_path) not in f.read_text(), f"{f} names a path of where it was saved"


def test_a_tiny_lora_folder_saved_twice_moves_and_loads(tmp_path):
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    model = tiny_model(tok, hidden=32, layers=1, heads=2, lora=LORA)
    model.save_pretrained(tmp_path / "a", tok)
    again, tok_a = ColarModel.load_dir(tmp_path / "a")  # loaded from a/base: peft would record that path
    again.save_pretrained(tmp_path / "b", tok_a)
    expected = _texts(again.eval(), tok_a)
    shutil.copytree(tmp_path / "b", tmp_path / "c")
    shutil.rmtree(tmp_path / "a")
    shutil.rmtree(tmp_path / "b")
    _no_paths(tmp_path / "c", tmp_path)
    assert json.loads((tmp_path / "c" / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] is None
    loaded, tok_c = ColarModel.load_dir(tmp_path / "c", is_trainable=False)
    assert loaded.is_lora and _texts(loaded, tok_c) == expected


def test_a_lora_model_on_a_local_base_folder_keeps_its_base(tmp_path):
    """A pretrained backbone from a local folder (e.g. an imported GGUF): the LoRA folder keeps a
    copy of the base, so neither the base folder nor a caller's base_model is needed to load it."""
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    pretrained = tiny_model(tok, hidden=32, layers=1, heads=2)
    pretrained.causal_lm.save_pretrained(tmp_path / "base-src")
    tok.save_pretrained(tmp_path / "base-src")
    cfg = ModelConfig(name_or_path=str(tmp_path / "base-src"), lora=LORA)
    model = ColarModel.build(cfg, tok)
    model.save_pretrained(tmp_path / "m", tok)
    assert (tmp_path / "m" / "base" / "model.safetensors").is_file()
    expected = _texts(model.eval(), tok)
    shutil.move(str(tmp_path / "m"), str(tmp_path / "moved"))
    shutil.rmtree(tmp_path / "base-src")
    _no_paths(tmp_path / "moved", tmp_path)
    loaded, tok2 = ColarModel.load_dir(tmp_path / "moved", is_trainable=False)  # no base_model given
    assert _texts(loaded, tok2) == expected


def test_a_hub_base_is_named_not_copied(tmp_path, monkeypatch):
    """A base named by a hub id stays outside the folder (the caller names it when loading), and the
    adapter config names that id."""
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    model = tiny_model(tok, hidden=32, layers=1, heads=2, lora=LORA)
    model.state.base_model = "org/some-model"
    model.save_pretrained(tmp_path / "m", tok)
    assert not (tmp_path / "m" / "base").exists()
    assert json.loads((tmp_path / "m" / "adapter" / "adapter_config.json").read_text())[
        "base_model_name_or_path"] == "org/some-model"
