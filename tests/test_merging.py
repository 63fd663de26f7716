"""Merging of reasoning-token embeddings into compressed embeddings (hand-made tensors)."""

import math

import pytest
import torch

from colar_core.merging import merge_groups


def test_sqrt_pooling_divides_the_sum_by_sqrt_of_real_tokens():
    emb = torch.tensor([[[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]]])  # B=1, G=1, r=3, H=2
    mask = torch.tensor([[[True, True, False]]])
    out = merge_groups(emb, mask, "sqrt")
    assert torch.allclose(out, torch.tensor([[[4.0, 6.0]]]) / math.sqrt(2))


def test_mean_pooling_divides_by_count():
    emb = torch.tensor([[[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]]])
    mask = torch.tensor([[[True, True, True]]])
    assert torch.allclose(merge_groups(emb, mask, "mean"), torch.tensor([[[3.0, 4.0]]]))


def test_pad_slots_are_zeroed_and_empty_groups_merge_to_zero():
    emb = torch.full((1, 2, 2, 3), 7.0)
    mask = torch.tensor([[[False, False], [True, False]]])
    out = merge_groups(emb, mask, "sqrt")
    assert torch.equal(out[0, 0], torch.zeros(3))
    assert torch.allclose(out[0, 1], torch.full((3,), 7.0))


def test_single_token_group_is_the_token_embedding():
    emb = torch.randn(2, 4, 1, 5)
    mask = torch.ones(2, 4, 1, dtype=torch.bool)
    assert torch.allclose(merge_groups(emb, mask, "sqrt"), emb[:, :, 0])


def test_unknown_pooling_is_refused():
    with pytest.raises(ValueError, match="pooling"):
        merge_groups(torch.zeros(1, 1, 1, 1), torch.ones(1, 1, 1, dtype=torch.bool), "max")


# ----- order-aware poolings ----------------------------------------------------------------------
from colar_core.merging import MAX_SLOTS, GroupMerger, plane_pairing  # noqa: E402

ORDER_AWARE = ["rotate", "gain"]


def _two_orders(hidden=8):
    """Embeddings of a two-token group in both orders ("12" and "21"), all real tokens."""
    torch.manual_seed(0)
    one, two = torch.randn(hidden), torch.randn(hidden)
    emb = torch.stack([torch.stack([one, two]), torch.stack([two, one])]).view(1, 2, 2, hidden)
    return emb, torch.ones(1, 2, 2, dtype=torch.bool)


def test_plain_poolings_cannot_tell_12_from_21():
    emb, mask = _two_orders()
    out = GroupMerger("sqrt", 8)(emb, mask)
    assert torch.allclose(out[0, 0], out[0, 1])


@pytest.mark.parametrize("pooling", ORDER_AWARE)
def test_order_aware_poolings_merge_12_and_21_differently(pooling):
    emb, mask = _two_orders()
    out = GroupMerger(pooling, 8)(emb, mask)
    assert not torch.allclose(out[0, 0], out[0, 1], atol=1e-3)


@pytest.mark.parametrize("pooling", ORDER_AWARE)
def test_order_aware_poolings_leave_a_single_token_group_as_its_embedding(pooling):
    emb = torch.randn(2, 4, 1, 6)
    mask = torch.ones(2, 4, 1, dtype=torch.bool)
    assert torch.allclose(GroupMerger(pooling, 6)(emb, mask), emb[:, :, 0])


@pytest.mark.parametrize("pooling", ORDER_AWARE)
def test_order_aware_poolings_zero_pads_and_stay_near_the_plain_sum(pooling):
    torch.manual_seed(1)
    emb = torch.randn(3, 5, 4, 64)
    mask = torch.ones(3, 5, 4, dtype=torch.bool)
    mask[0, 0, 2:] = False
    mask[1, 1] = False
    out = GroupMerger(pooling, 64)(emb, mask)
    plain = merge_groups(emb, mask, "sqrt")
    assert torch.equal(out[1, 1], torch.zeros(64))
    cos = torch.nn.functional.cosine_similarity(out[mask.any(-1)], plain[mask.any(-1)], dim=-1)
    assert cos.min() > 0.8  # close to what the LM reads for the plain sum
    pads_changed = emb.clone()
    pads_changed[0, 0, 2:] = 99.0
    torch.manual_seed(2)
    merger = GroupMerger(pooling, 64)
    assert torch.allclose(merger(pads_changed, mask)[0, 0], merger(emb, mask)[0, 0])


def test_rotate_turns_slot_j_by_j_times_the_angle_in_every_plane():
    emb = torch.randn(1, 1, 3, 10).expand(1, 1, 3, 10).clone()
    emb[0, 0, 1:] = emb[0, 0, 0]
    merger = GroupMerger("rotate", 10, angle=0.3)
    turned = merger.slot_transform(emb)[0, 0]
    for j in range(3):
        cos = torch.nn.functional.cosine_similarity(turned[j], emb[0, 0, j], dim=0)
        assert abs(float(cos) - math.cos(0.3 * j)) < 1e-5
        assert torch.allclose(turned[j].norm(), emb[0, 0, j].norm(), atol=1e-5)  # a rotation


def test_rotate_pairing_is_fixed_and_pairs_every_dimension_of_an_even_size():
    partner, sign = plane_pairing(12)
    again, _ = plane_pairing(12)
    assert torch.equal(partner, again)
    assert torch.equal(partner[partner], torch.arange(12)) and bool((partner != torch.arange(12)).all())
    assert sorted(sign.tolist()) == [-1.0] * 6 + [1.0] * 6
    odd, odd_sign = plane_pairing(5)
    assert int((odd == torch.arange(5)).sum()) == 1 and float(odd_sign.abs().sum()) == 4.0


def test_gain_is_learned_and_groups_longer_than_its_slots_are_refused():
    merger = GroupMerger("gain", 4)
    assert [n for n, _ in merger.named_parameters()] == ["gain_delta"]
    emb, mask = torch.randn(1, 1, 3, 4), torch.ones(1, 1, 3, dtype=torch.bool)
    merger(emb, mask).sum().backward()
    assert merger.gain_delta.grad[:2].abs().sum() > 0 and merger.gain_delta.grad[2:].abs().sum() == 0
    with pytest.raises(ValueError, match="at most"):
        merger(torch.zeros(1, 1, MAX_SLOTS + 1, 4), torch.ones(1, 1, MAX_SLOTS + 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="GroupMerger"):
        merge_groups(emb, mask, "gain")
