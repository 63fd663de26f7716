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
