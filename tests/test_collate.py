"""Batch layout: the '###' group, group padding, label sampling (hand-made ids)."""

import pytest
import torch

from colar_core.collate import IGNORE, collate, sample_group_labels
from colar_core.text import EncodedExample

PAD, THINK, EOS = 0, 1, 2


class StubEncoder:
    pad_id, think_id, eos_id = PAD, THINK, EOS

    def speed_ids(self, r):
        return (90 + (r if isinstance(r, int) else 9),)


def ex(q, steps, ans):
    return EncodedExample(tuple(q), tuple(steps), (THINK,) + tuple(ans) + (EOS,), "x")


def test_think_token_sits_alone_and_steps_fill_groups_of_r():
    batch = collate([ex([10, 11], [20, 21, 22, 23, 24], [30])], StubEncoder(), r=2)
    assert batch.group_ids.shape == (1, 4, 2)  # '###' group + ceil(5/2) = 3 step groups
    assert batch.group_ids[0].tolist() == [[THINK, PAD], [20, 21], [22, 23], [24, PAD]]
    assert batch.group_token_mask[0].tolist() == [[True, False], [True, True], [True, True], [True, False]]


def test_groups_are_left_padded_across_the_batch_and_answers_right_padded():
    batch = collate([ex([10], [20, 21, 22, 23], [30, 31]), ex([10, 11, 12], [20], [30])], StubEncoder(), r=2)
    # row 1 has 1 step group: two pad groups, then '###', then its group
    assert batch.group_ids[1].tolist() == [[PAD, PAD], [THINK, PAD], [20, PAD]]
    assert batch.group_mask[1].tolist() == [False, True, True]
    assert batch.group_mask[0].tolist() == [True, True, True]
    assert batch.prompt_ids.tolist() == [[PAD, PAD, 10, 92], [10, 11, 12, 92]]
    assert batch.answer_ids.tolist() == [[THINK, 30, 31, EOS], [THINK, 30, EOS, PAD]]
    assert batch.answer_mask[1].tolist() == [True, True, True, False]


def test_labels_come_from_their_own_group_and_think_group_is_ignored():
    torch.manual_seed(0)
    batch = collate([ex([10], [20, 21, 22, 23, 24, 25, 26], [30])], StubEncoder(), r=3,
                    generator=torch.Generator().manual_seed(1))
    labels = batch.group_labels[0].tolist()
    assert labels[0] == IGNORE
    assert labels[1] in (20, 21, 22) and labels[2] in (23, 24, 25) and labels[3] == 26


def test_label_sampling_is_uniform_over_real_tokens_only():
    ids = torch.tensor([[[5, 6, 0]]]).expand(4000, 1, 3).contiguous()
    mask = torch.tensor([[[True, True, False]]]).expand(4000, 1, 3)
    labels = sample_group_labels(ids, mask, torch.Generator().manual_seed(0)).flatten()
    assert set(labels.tolist()) == {5, 6}
    assert abs((labels == 5).float().mean().item() - 0.5) < 0.05


def test_r1_is_plain_token_layout_and_no_step_rows_keep_the_think_group():
    batch = collate([ex([10], [20, 21], [30]), ex([10], [], [30])], StubEncoder(), r=1)
    assert batch.group_ids[:, :, 0].tolist() == [[THINK, 20, 21], [PAD, PAD, THINK]]
    assert batch.group_labels.tolist() == [[IGNORE, 20, 21], [IGNORE, IGNORE, IGNORE]]
    assert batch.step_group_mask.tolist() == [[False, True, True], [False, False, False]]


def test_auto_speed_prompt_and_bad_factor():
    batch = collate([ex([10], [20], [30])], StubEncoder(), r=3, speed="auto")
    assert batch.prompt_ids[0, -1].item() == 99
    with pytest.raises(ValueError, match="compression factor"):
        collate([ex([10], [20], [30])], StubEncoder(), r=0)
