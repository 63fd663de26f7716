"""The CoLaR wrapper on Llama, Qwen2 and GPT-2 shapes: losses, save/load, LoRA, embedding scale."""

import json

import pytest
import torch

from bench.tiny import PROBLEMS, encoder_for, tiny_model, tiny_tokenizer
from colar_core.collate import collate
from colar_core.config import GenerationConfig, LoraConfig, ObjectiveConfig
from colar_core.inference import generate
from colar_core.model import CONFIG_FILE, ColarModel, paper_embedding_scale

GREEDY = GenerationConfig(do_sample=False, sample_latents=False, max_latents=8, max_answer_tokens=6)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_every_arch_trains_one_step_with_all_loss_parts(tok, arch):
    torch.manual_seed(0)
    model = tiny_model(tok, arch=arch)
    enc = encoder_for(tok)
    batch = collate([enc.encode(r) for r in PROBLEMS], enc, r=2, generator=torch.Generator().manual_seed(0))
    out = model.sft_loss(batch, ObjectiveConfig(second_pass_weight=0.5, entropy_weight=0.1))
    assert all(torch.isfinite(out[k]) for k in ("ce", "latent", "entropy", "second_pass", "loss"))
    assert out["latent"] > 0 and out["second_pass"] > 0
    expected = out["ce"] + out["latent"] + 0.1 * out["entropy"] + 0.5 * out["second_pass"]  # entropy added
    assert torch.allclose(out["loss"], expected)
    out["loss"].backward()
    assert model.latent_head.mean.weight.grad is not None
    assert model.causal_lm.get_input_embeddings().weight.grad is not None


@pytest.mark.parametrize("opening_label", [True, False])
def test_r1_cross_entropy_equals_the_plain_causal_lm_loss_on_the_training_text(tok, opening_label):
    """At r=1 the CoLaR batch is exactly the training text; its CE must match HF's own loss with the
    reference's labels: every token after the question and speed suffix, the opening '###' included
    (src/models/cot.py, colar.py). ``opening_think_label=False`` leaves that '###' out (colar's earlier objective)."""
    torch.manual_seed(0)
    model = tiny_model(tok)
    enc = encoder_for(tok)
    ex = enc.encode(PROBLEMS[0])
    batch = collate([ex], enc, r=1)
    ours = model.sft_loss(batch, ObjectiveConfig(mode="cot", opening_think_label=opening_label))["ce"]
    prompt = list(ex.question_ids + enc.speed_ids(1))
    ids = torch.tensor([prompt + [enc.think_id] + list(ex.step_ids) + list(ex.answer_ids)])
    labels = ids.clone()
    labels[0, : len(prompt) + (0 if opening_label else 1)] = -100  # question and speed are not learned
    reference = model.causal_lm(input_ids=ids, labels=labels).loss
    assert torch.allclose(ours, reference, atol=1e-5)


def test_cot_mode_trains_no_latent_loss(tok):
    model = tiny_model(tok)
    enc = encoder_for(tok)
    batch = collate([enc.encode(r) for r in PROBLEMS], enc, r=1)
    out = model.sft_loss(batch, ObjectiveConfig(mode="cot"))
    assert float(out["latent"]) == 0.0


def test_nll_objective_is_finite(tok):
    model = tiny_model(tok)
    enc = encoder_for(tok)
    batch = collate([enc.encode(r) for r in PROBLEMS], enc, r=3)
    out = model.sft_loss(batch, ObjectiveConfig(latent_loss="nll"))
    assert torch.isfinite(out["latent"]) and out["latent"] != 0


def test_save_and_load_round_trip_without_pickle(tok, tmp_path):
    torch.manual_seed(0)
    model = tiny_model(tok)
    enc = encoder_for(tok)
    before = generate(model, enc, [p.question for p in PROBLEMS], "latent", 2, GREEDY)
    model.save_pretrained(tmp_path / "m", tok)
    files = {p.name for p in (tmp_path / "m").rglob("*")}
    assert "latent_head.safetensors" in files and "model.safetensors" in files
    assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    loaded = ColarModel.from_pretrained(tmp_path / "m")
    after = generate(loaded, enc, [p.question for p in PROBLEMS], "latent", 2, GREEDY)
    assert [g.text for g in before] == [g.text for g in after]
    assert loaded.state.embedding_scale == model.state.embedding_scale


def test_lora_wraps_the_backbone_and_round_trips(tok, tmp_path):
    torch.manual_seed(0)
    model = tiny_model(tok, lora=LoraConfig(r=4, alpha=8))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_" in n for n in trainable) and any(n.startswith("latent_head") for n in trainable)
    assert not any("embed_tokens" in n for n in trainable)
    enc = encoder_for(tok)
    batch = collate([enc.encode(r) for r in PROBLEMS], enc, r=2)
    loss = model.sft_loss(batch, ObjectiveConfig())["loss"]
    model.save_pretrained(tmp_path / "lora", tok)
    assert (tmp_path / "lora" / "adapter").is_dir()
    loaded = ColarModel.from_pretrained(tmp_path / "lora")
    assert loaded.is_lora
    torch.manual_seed(1)
    a = loaded.sft_loss(batch, ObjectiveConfig(latent_weight=0))["loss"]
    torch.manual_seed(1)
    b = model.sft_loss(batch, ObjectiveConfig(latent_weight=0))["loss"]
    assert torch.allclose(a, b, atol=1e-5) and torch.isfinite(loss)


def test_embedding_scale_paper_constant_measured_or_configured(tok, tmp_path):
    assert paper_embedding_scale("meta-llama/Llama-3.2-1B-Instruct") == 0.018
    assert paper_embedding_scale("gpt2") == 0.12
    assert paper_embedding_scale("/models/my-llama") is None
    measured = tiny_model(tok)
    emb_std = float(measured.causal_lm.get_input_embeddings().weight.detach().std())
    assert measured.state.embedding_scale_source == "measured"
    assert measured.state.embedding_scale == pytest.approx(emb_std)
    fixed = tiny_model(tok, embedding_scale=0.5)
    assert (fixed.state.embedding_scale, fixed.state.embedding_scale_source) == (0.5, "config")
    fixed.save_pretrained(tmp_path / "f")
    assert json.loads((tmp_path / "f" / CONFIG_FILE).read_text())["embedding_scale"] == 0.5


def test_loading_a_non_model_directory_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a CoLaR model directory"):
        ColarModel.from_pretrained(tmp_path)
