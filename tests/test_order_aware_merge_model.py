"""Order-aware merges inside the CoLaR model: trained, saved and loaded (full and LoRA)."""

import pytest
import torch

from bench.tiny import PROBLEMS, encoder_for, tiny_model, tiny_tokenizer
from colar_core.collate import collate
from colar_core.config import GenerationConfig, LoraConfig, ObjectiveConfig
from colar_core.inference import generate
from colar_core.model import MERGE_FILE, ColarModel

GREEDY = GenerationConfig(do_sample=False, sample_latents=False, max_latents=8, max_answer_tokens=6)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.mark.parametrize("pooling", ["rotate", "gain"])
def test_sft_loss_uses_the_configured_merge_for_inputs_and_latent_targets(tok, pooling):
    torch.manual_seed(0)
    plain, aware = tiny_model(tok), tiny_model(tok, pooling=pooling)
    aware.load_state_dict(plain.state_dict(), strict=False)  # same backbone and head, only the merge differs
    enc = encoder_for(tok)
    batch = collate([enc.encode(r) for r in PROBLEMS], enc, r=3, generator=torch.Generator().manual_seed(0))
    a = plain.sft_loss(batch, ObjectiveConfig(), generator=torch.Generator().manual_seed(0))
    b = aware.sft_loss(batch, ObjectiveConfig(), generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(a["ce"], b["ce"]) and not torch.allclose(a["latent"], b["latent"])
    b["loss"].backward()
    if pooling == "gain":
        assert aware.merger.gain_delta.grad is not None and aware.merger.gain_delta.grad.abs().sum() > 0


@pytest.mark.parametrize("lora", [None, LoraConfig(r=4, alpha=8)])
def test_learned_merge_round_trips_through_save_and_load(tok, tmp_path, lora):
    torch.manual_seed(0)
    model = tiny_model(tok, pooling="gain", lora=lora)
    assert "merger.gain_delta" in {n for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        model.merger.gain_delta.add_(0.5)  # as if trained
    enc = encoder_for(tok)
    batch = collate([enc.encode(r) for r in PROBLEMS], enc, r=2)
    model.save_pretrained(tmp_path / "m", tok)
    assert (tmp_path / "m" / MERGE_FILE).is_file()
    loaded = ColarModel.from_pretrained(tmp_path / "m")
    assert loaded.state.pooling == "gain" and torch.equal(loaded.merger.gain_delta, model.merger.gain_delta)
    gen = torch.Generator().manual_seed(3)
    a = model.sft_loss(batch, ObjectiveConfig(), generator=gen)["loss"]
    b = loaded.sft_loss(batch, ObjectiveConfig(), generator=torch.Generator().manual_seed(3))["loss"]
    assert torch.allclose(a, b, atol=1e-5)
    (tmp_path / "m" / MERGE_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=MERGE_FILE):
        ColarModel.from_pretrained(tmp_path / "m")


def test_rotate_merge_keeps_its_angle_and_needs_no_extra_file(tok, tmp_path):
    torch.manual_seed(0)
    model = tiny_model(tok, pooling="rotate", merge_angle=0.35)
    enc = encoder_for(tok)
    before = generate(model, enc, [p.question for p in PROBLEMS], "latent", 2, GREEDY)
    model.save_pretrained(tmp_path / "m", tok)
    assert not (tmp_path / "m" / MERGE_FILE).exists()
    loaded = ColarModel.from_pretrained(tmp_path / "m")
    assert loaded.merger.pooling == "rotate" and loaded.merger.angle == 0.35
    after = generate(loaded, enc, [p.question for p in PROBLEMS], "latent", 2, GREEDY)
    assert [g.text for g in before] == [g.text for g in after]
    batch = collate([enc.encode(r) for r in PROBLEMS], enc, r=2)
    a = model.sft_loss(batch, ObjectiveConfig(), generator=torch.Generator().manual_seed(3))["loss"]
    b = loaded.sft_loss(batch, ObjectiveConfig(), generator=torch.Generator().manual_seed(3))["loss"]
    assert torch.allclose(a, b, atol=1e-5)
