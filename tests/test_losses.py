"""Loss terms and the latent head's log-density, against torch.distributions."""

import math

import torch
import torch.nn.functional as F
from torch.distributions import Normal

from colar_core.latent_head import LatentHead
from colar_core.losses import gaussian_entropy, gaussian_log_prob, latent_loss, token_cross_entropy


def test_log_density_matches_torch_normal_mean_over_dims():
    g = torch.Generator().manual_seed(0)
    mean, log_std, x = (torch.randn(6, 9, generator=g) for _ in range(3))
    expected = Normal(mean, log_std.exp()).log_prob(x).mean(-1)
    assert torch.allclose(gaussian_log_prob(mean, log_std, x), expected, atol=1e-6)


def test_entropy_matches_torch_normal():
    log_std = torch.randn(4, 7)
    expected = Normal(torch.zeros(4, 7), log_std.exp()).entropy().mean(-1)
    assert torch.allclose(gaussian_entropy(log_std), expected, atol=1e-6)


def test_nll_latent_loss_is_negative_mean_log_density():
    mean, log_std, target = torch.zeros(3, 4), torch.full((3, 4), math.log(2.0)), torch.ones(3, 4)
    loss, _, _ = latent_loss(mean, log_std, target, "nll")
    expected = -Normal(mean, log_std.exp()).log_prob(target).mean()
    assert torch.allclose(loss, expected)


def test_soft_mse_uses_a_reparameterised_sample():
    mean, log_std, target = torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    loss, _, sample = latent_loss(mean, log_std, target, "soft_mse", generator=g1)
    noise = torch.randn(2, 3, generator=g2)
    assert torch.allclose(sample, noise)
    assert torch.allclose(loss, F.mse_loss(noise, target))


def test_deterministic_head_uses_mse_of_mean():
    mean, target = torch.tensor([[1.0, 3.0]]), torch.tensor([[0.0, 0.0]])
    loss, _, sample = latent_loss(mean, torch.zeros_like(mean), target, "nll", deterministic=True)
    assert torch.allclose(loss, torch.tensor(5.0)) and torch.equal(sample, mean)


def test_latent_head_shapes_and_deterministic_variant():
    head = LatentHead(8, 16)
    h = torch.randn(5, 8)
    z, mean, log_std = head.sample(h, generator=torch.Generator().manual_seed(0))
    assert z.shape == mean.shape == log_std.shape == (5, 8)
    assert not torch.allclose(z, mean)
    det = LatentHead(8, 16, deterministic=True)
    z, mean, _ = det.sample(h)
    assert torch.equal(z, mean)


def test_token_ce_on_no_labels_is_zero_and_differentiable():
    logits = torch.randn(0, 10, requires_grad=True)
    loss = token_cross_entropy(logits, torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert float(loss) == 0.0


def test_entropy_weight_is_added_to_the_sft_loss_as_the_reference():
    """The reference's colar.py: ``total_loss += entropy * entropy_weight``. A positive weight
    therefore pushes the latent head's entropy down (its log-std gradient is positive); a negative
    weight is a bonus, and is accepted."""
    from bench.tiny import PROBLEMS, encoder_for, tiny_model, tiny_tokenizer
    from colar_core.collate import collate
    from colar_core.config import ObjectiveConfig

    tok = tiny_tokenizer()
    enc = encoder_for(tok)
    torch.manual_seed(0)
    model = tiny_model(tok)
    batch = collate([enc.encode(r) for r in PROBLEMS], enc, r=2, generator=torch.Generator().manual_seed(0))
    for w in (0.5, -0.5):
        model.zero_grad(set_to_none=True)
        out = model.sft_loss(batch, ObjectiveConfig(ce_weight=0.0, latent_weight=0.0, entropy_weight=w))
        assert torch.isfinite(out["entropy"]) and out["entropy"].abs() > 0
        assert torch.allclose(out["loss"], w * out["entropy"])
        out["loss"].backward()
        # d(entropy per dim)/d(log_std) = 1 / H > 0: descending lowers the entropy iff w > 0
        assert (model.latent_head.log_std.bias.grad.sign() == math.copysign(1.0, w)).all()
    out = model.sft_loss(batch, ObjectiveConfig(entropy_weight=0.1))
    assert torch.allclose(out["loss"], out["ce"] + out["latent"] + 0.1 * out["entropy"])
