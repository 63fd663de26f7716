"""Batch layout for CoLaR SFT: which token goes into which compressed group, and its label.

A row of the training sequence is laid out as three blocks::

    [ pad .. pad  question  speed ]  [ pad-groups  ###-group  step-group_1 .. step-group_g ]  [ ### Answer:a EOS  pad .. ]
      prompt, left-padded              compressed groups, left-padded                         answer, right-padded

The steps block keeps its leading ``###`` alone in its own group (so the model sees the exact
``###`` embedding, as at inference), and the step tokens are cut into groups of ``r``; the last
group may be short. Groups are described as a ``[B, G, r]`` tensor of token ids with a mask, so
the merge itself is one tensor operation on the device (see ``colar_core.merging``).

Each group gets one label, drawn uniformly from its real tokens; the ``###`` group gets none in
``group_labels``. Two more terms of the reference's objective are indexed separately, so that
``ObjectiveConfig`` switches them (``ColarModel.sft_loss``) without changing the rest of the batch:

* the *opening* ``###`` label (``open_label_index``): the last prompt position is trained to predict
  the ``###`` that opens the steps block, as the reference labels every token after the question;
* the *closing* latent (``end_latent_src`` / ``end_latent_tgt``): the row's last group (its last step
  group; the ``###`` group when the row has no steps) predicts, with the latent head, the embedding
  of the ``###`` that follows it, which is the merged embedding of the row's own ``###`` group (a
  one-token group merges to the token's embedding under every pooling).

What the backbone sees is the *packed* form of that layout: each row's real positions moved to the
front in order (prompt, groups, answer), pads only at the end. Only trailing pads are left, so the
backbone runs with plain causal attention (no padding mask; on a GPU this keeps SDPA's flash kernel
available) and a batch is as wide as its longest row, not as the sum of the three blocks' widths.
``collate`` computes, on the CPU, every index the loss needs in packed coordinates (where each
packed slot comes from, which slots carry a next-token label, which slots predict which group), so
the loss on the device is gathers only: no boolean-mask indexing and no host synchronisation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Optional, Sequence

import torch

from colar_core.text import EncodedExample, PromptEncoder, Speed

IGNORE = -100


@dataclass
class ColarBatch:
    """CPU (or device) tensors for one SFT step at compression factor ``r``."""

    prompt_ids: torch.Tensor  # [B, Lp] long, left-padded
    prompt_mask: torch.Tensor  # [B, Lp] bool
    group_ids: torch.Tensor  # [B, G, r] long; group G-1-g is the '###' group of a row with g step groups
    group_token_mask: torch.Tensor  # [B, G, r] bool: real tokens
    group_labels: torch.Tensor  # [B, G] long, IGNORE where no label
    answer_ids: torch.Tensor  # [B, La] long, right-padded; starts with '###', ends with EOS
    answer_mask: torch.Tensor  # [B, La] bool
    r: int
    # packed layout (see the module docstring); T = Lp + G + La, W = longest row
    pack_index: torch.Tensor  # [B * W] long: flat index into the [B * T] concatenated blocks
    packed_mask: torch.Tensor  # [B, W] bool: real positions (a prefix of each row)
    label_index: torch.Tensor  # [N] long: flat packed slots whose next position has a label
    label_targets: torch.Tensor  # [N] long: those labels
    latent_src: torch.Tensor  # [M] long: flat packed slots that predict a compressed embedding
    latent_tgt: torch.Tensor  # [M] long: flat index into [B * G] of the group each one predicts
    # the reference's two extra terms, one per row (see the module docstring)
    open_label_index: torch.Tensor  # [B] long: flat packed slot (last prompt slot) predicting the opening '###'
    open_label_targets: torch.Tensor  # [B] long: the '###' id
    end_latent_src: torch.Tensor  # [B] long: flat packed slot of each row's last group
    end_latent_tgt: torch.Tensor  # [B] long: flat index into [B * G] of that row's '###' group

    @property
    def group_mask(self) -> torch.Tensor:
        """[B, G] bool: groups holding at least one real token (the '###' group included)."""
        return self.group_token_mask.any(-1)

    @property
    def step_group_mask(self) -> torch.Tensor:
        """[B, G] bool: real groups that hold reasoning tokens (not the '###' group)."""
        return self.group_labels != IGNORE

    def to(self, device) -> "ColarBatch":
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for k, v in moved.items():
            if isinstance(v, torch.Tensor):
                moved[k] = v.to(device, non_blocking=True)
        return ColarBatch(**moved)


def _left_pad(rows: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max((len(x) for x in rows), default=0)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row):] = torch.as_tensor(row, dtype=torch.long)
            mask[i, width - len(row):] = True
    return ids, mask


def _right_pad(rows: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max((len(x) for x in rows), default=0)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, row in enumerate(rows):
        if row:
            ids[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
            mask[i, : len(row)] = True
    return ids, mask


def sample_group_labels(
    group_ids: torch.Tensor, token_mask: torch.Tensor, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """One label per group, drawn uniformly from its real tokens; IGNORE for empty groups."""
    noise = torch.rand(token_mask.shape, generator=generator, device=token_mask.device)
    noise = noise.masked_fill(~token_mask, -1.0)
    pick = noise.argmax(-1, keepdim=True)
    labels = group_ids.gather(-1, pick).squeeze(-1)
    return labels.masked_fill(~token_mask.any(-1), IGNORE)


def collate(
    examples: Sequence[EncodedExample],
    encoder: PromptEncoder,
    r: int,
    speed: Optional[Speed] = None,
    generator: Optional[torch.Generator] = None,
) -> ColarBatch:
    """Build the batch for compression factor ``r``; the prompt says ``speed`` (default ``r``; may be 'auto')."""
    if r < 1:
        raise ValueError(f"compression factor must be >= 1, got {r}")
    speed_ids = encoder.speed_ids(r if speed is None else speed)
    prompt_ids, prompt_mask = _left_pad([ex.question_ids + speed_ids for ex in examples], encoder.pad_id)
    answer_ids, answer_mask = _right_pad([ex.answer_ids for ex in examples], encoder.pad_id)

    n_groups = [math.ceil(len(ex.step_ids) / r) for ex in examples]
    width = 1 + max(n_groups, default=0)  # +1: the '###' group
    group_ids = torch.full((len(examples), width, r), encoder.pad_id, dtype=torch.long)
    token_mask = torch.zeros((len(examples), width, r), dtype=torch.bool)
    think_group = torch.zeros((len(examples), width), dtype=torch.bool)
    for i, (ex, g) in enumerate(zip(examples, n_groups)):
        start = width - g  # first step group of this row; its '###' group sits at start - 1
        group_ids[i, start - 1, 0] = encoder.think_id
        token_mask[i, start - 1, 0] = True
        think_group[i, start - 1] = True
        if g:
            flat = torch.full((g * r,), encoder.pad_id, dtype=torch.long)
            flat[: len(ex.step_ids)] = torch.as_tensor(ex.step_ids, dtype=torch.long)
            group_ids[i, start:] = flat.view(g, r)
            token_mask[i, start:].view(-1)[: len(ex.step_ids)] = True

    labels = sample_group_labels(group_ids, token_mask, generator)
    labels[think_group] = IGNORE  # the '###' group's label is the separate opening term (open_label_index)
    packing = pack_layout(prompt_mask, token_mask.any(-1), labels, answer_ids, answer_mask, encoder.think_id)
    return ColarBatch(prompt_ids, prompt_mask, group_ids, token_mask, labels, answer_ids, answer_mask, r, **packing)


def packing(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Packing of a ``[B, T]`` padding mask (pads anywhere) into rows with pads only at the end.

    Returns ``order`` ``[B, W]`` (padded-layout column of each packed slot, W = longest row; slots
    past a row's end point at its pads), ``packed_mask`` ``[B, W]`` and ``slot_of`` ``[B, T]`` (packed
    slot of each padded column; meaningful where ``mask`` is True).
    """
    lengths = mask.sum(1)
    width = int(lengths.max()) if mask.shape[0] else 0
    order = torch.argsort((~mask.bool()).to(torch.int8), dim=1, stable=True)[:, :width]  # real columns first, in order
    packed_mask = torch.arange(width, device=mask.device).unsqueeze(0) < lengths.unsqueeze(1)
    slot_of = (mask.long().cumsum(1) - 1).clamp(min=0)
    return order, packed_mask, slot_of


def pack_layout(prompt_mask: torch.Tensor, group_mask: torch.Tensor, group_labels: torch.Tensor,
                answer_ids: torch.Tensor, answer_mask: torch.Tensor, think_id: int) -> dict[str, torch.Tensor]:
    """Indices of the packed layout (CPU): real positions first in each row, pads at the end.

    Slot order inside a row, and row-major order of ``label_index``, ``latent_src`` and the per-row
    extra terms, follow the padded layout exactly, so losses (and the noise drawn for each latent)
    do not depend on packing. Every row holds its ``###`` group (its first real group) and its
    last group in column ``G - 1`` (groups are left-padded).
    """
    b, lp = prompt_mask.shape
    g = group_mask.shape[1]
    mask = torch.cat([prompt_mask, group_mask, answer_mask], dim=1)  # [B, T]
    t = mask.shape[1]
    order, packed_mask, slot_of = packing(mask)
    width = packed_mask.shape[1]
    rows = torch.arange(b).unsqueeze(1)
    pack_index = (rows * t + order).reshape(-1)

    labels = torch.cat([torch.full((b, lp), IGNORE, dtype=torch.long), group_labels,
                        answer_ids.masked_fill(~answer_mask, IGNORE)], dim=1)
    packed_labels = labels.gather(1, order).masked_fill(~packed_mask, IGNORE)
    next_labels = torch.cat([packed_labels[:, 1:], torch.full((b, 1), IGNORE, dtype=torch.long)], dim=1)
    labelled = next_labels != IGNORE
    label_index = labelled.reshape(-1).nonzero().squeeze(-1)

    # group position j predicts the compressed embedding of group j+1 when that one holds steps
    step_groups = group_labels != IGNORE
    predicts = torch.zeros_like(step_groups)
    predicts[:, :-1] = step_groups[:, 1:]
    src_slot = slot_of[:, lp: lp + g]
    bi, gj = predicts.nonzero(as_tuple=True)

    # the opening '###' is predicted by the slot before the row's '###' group, its last prompt slot
    think_col = group_mask.long().argmax(1)  # first real group of each row
    think_slot = slot_of[:, lp:][torch.arange(b), think_col]
    has_prompt = think_slot > 0
    open_rows = torch.arange(b)[has_prompt]
    # the row's last group (column G - 1) predicts the closing '###', i.e. its own '###' group's embedding
    end_rows = torch.arange(b)[group_mask[:, -1]]
    return {
        "pack_index": pack_index,
        "packed_mask": packed_mask,
        "label_index": label_index,
        "label_targets": next_labels.reshape(-1)[label_index],
        "latent_src": bi * width + src_slot[bi, gj],
        "latent_tgt": bi * g + gj + 1,
        "open_label_index": open_rows * width + think_slot[open_rows] - 1,
        "open_label_targets": torch.full((open_rows.numel(),), think_id, dtype=torch.long),
        "end_latent_src": end_rows * width + src_slot[end_rows, g - 1],
        "end_latent_tgt": end_rows * g + think_col[end_rows],
    }
