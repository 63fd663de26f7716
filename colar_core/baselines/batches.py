"""Batches of the baselines: the prompt, the continuous thoughts, and a block of text after them.

Every baseline pass has the same shape (``B`` rows)::

    [ pad .. question (Thinking speed: auto)### ]  [ thought_1 .. thought_n ]  [ steps..  ### Answer:a EOS  pad .. ]
      prompt, left-padded (DecodeState)            n sequential forwards      block: remaining steps + answer,
                                                   (n = 0 for iCoT)           right-padded, one forward

The loss is the CE of the block's tokens after its first one, predicted from the block's own
positions (as the reference: its label block starts after the thoughts). A row's chain is cut by
the curriculum (:func:`remaining_steps`): stage ``k`` drops its first ``k`` steps, the last stage
all of them. The prompt says ``(Thinking speed: auto)``, as in the reference's baselines.

:class:`CurriculumBatches` keeps the SFT data order (seeded epochs, length grouping, resumable
state) and picks each micro-batch's stage from the epochs consumed before it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from colar_core.baselines.config import BaselineConfig, CoconutConfig, CurriculumFields, DistillConfig
from colar_core.text import AUTO_SPEED, EncodedExample, PromptEncoder
from colar_core.training.config import TrainConfig
from colar_core.training.loop import StepBatch
from colar_core.training.sft import SFTBatches


def curriculum_stage(epochs_done: float, cfg: CurriculumFields) -> int:
    """The stage (1..max_stage) after ``epochs_done`` training epochs: one stage per
    ``epochs_per_stage`` epochs, starting at 1 (the run starts from the CoT model), capped at the last.

    The reference writes ``ceil(epoch + 1 / n_epochs_per_stage)``, which advances every epoch
    whatever ``n_epochs_per_stage`` says; this is the schedule its config describes.
    """
    return min(cfg.max_stage, int(math.floor(epochs_done / cfg.epochs_per_stage + 1e-9)) + 1)


def remaining_steps(steps: Sequence[str], stage: int, max_stage: int) -> tuple[str, ...]:
    """The chain a row keeps at ``stage``: without its first ``stage`` steps; none at the last stage."""
    return () if stage >= max_stage else tuple(steps[stage:])


def thoughts_at(stage: int, cfg: BaselineConfig) -> int:
    """Continuous thoughts of a pass at ``stage``: ``stage * c`` for Coconut, the fixed count for
    Distill's student, 0 for iCoT."""
    if isinstance(cfg, CoconutConfig):
        return stage * cfg.thoughts_per_step
    if isinstance(cfg, DistillConfig):
        return cfg.n_thoughts
    return 0


@dataclass
class ThoughtBatch:
    """One pass: prompts (token ids, padded by DecodeState), ``n_thoughts``, the right-padded block."""

    prompts: list[tuple[int, ...]]
    block_ids: torch.Tensor  # [B, L] long: remaining steps, then '###' Answer:a EOS, then pads
    block_mask: torch.Tensor  # [B, L] bool
    steps_len: torch.Tensor  # [B] long: step tokens at the start of each block
    n_thoughts: int
    pad_id: int

    def to(self, device) -> "ThoughtBatch":
        return dataclasses.replace(self, block_ids=self.block_ids.to(device), block_mask=self.block_mask.to(device),
                                   steps_len=self.steps_len.to(device))


@dataclass
class DistillBatch:
    """Distill's two passes over the same rows, and where their hidden states are matched: pairs
    (``rows[i]``, ``teacher_pos[i]``) and (``rows[i]``, ``student_pos[i]``) in block coordinates."""

    teacher: ThoughtBatch  # full chain, no thoughts
    student: ThoughtBatch  # no chain, n thoughts
    rows: torch.Tensor
    teacher_pos: torch.Tensor
    student_pos: torch.Tensor

    def to(self, device) -> "DistillBatch":
        return DistillBatch(self.teacher.to(device), self.student.to(device), self.rows.to(device),
                            self.teacher_pos.to(device), self.student_pos.to(device))


def thought_batch(examples: Sequence[EncodedExample], encoder: PromptEncoder, n_thoughts: int) -> ThoughtBatch:
    """The pass of ``examples`` (whose ``step_ids`` are the steps to keep) with ``n_thoughts`` thoughts."""
    blocks = [tuple(ex.step_ids) + tuple(ex.answer_ids) for ex in examples]
    width = max(len(b) for b in blocks)
    ids = torch.full((len(blocks), width), encoder.pad_id, dtype=torch.long)
    mask = torch.zeros((len(blocks), width), dtype=torch.bool)
    for i, block in enumerate(blocks):
        ids[i, : len(block)] = torch.as_tensor(block, dtype=torch.long)
        mask[i, : len(block)] = True
    prompts = [encoder.prompt_ids(ex.question_ids, AUTO_SPEED) for ex in examples]
    steps_len = torch.tensor([len(ex.step_ids) for ex in examples], dtype=torch.long)
    return ThoughtBatch(prompts, ids, mask, steps_len, n_thoughts, encoder.pad_id)


def distill_batch(examples: Sequence[EncodedExample], encoder: PromptEncoder, cfg: DistillConfig) -> DistillBatch:
    """Teacher pass (full chains) and student pass (``cfg.n_thoughts`` thoughts, no chain) of ``examples``.

    Matched positions, in the answer block ``### Answer : a EOS``: ``answer_prefix`` = the last token
    of ``Answer:`` (the reference's ':'), ``answer`` = that one through the token before EOS.
    """
    teacher = thought_batch(examples, encoder, 0)
    student = thought_batch([dataclasses.replace(ex, step_ids=()) for ex in examples], encoder, cfg.n_thoughts)
    first = len(encoder.answer_prefix_ids)  # answer_ids[0] is '###', then the prefix
    rows, t_pos, s_pos = [], [], []
    for i, ex in enumerate(examples):
        last = first + 1 if cfg.distill_at == "answer_prefix" else max(first + 1, len(ex.answer_ids) - 1)
        for j in range(first, last):
            rows.append(i)
            s_pos.append(j)
            t_pos.append(len(ex.step_ids) + j)
    as_long = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    return DistillBatch(teacher, student, as_long(rows), as_long(t_pos), as_long(s_pos))


class CurriculumBatches(SFTBatches):
    """Each optimizer step's micro-batches for a baseline (same order and checkpointed state as SFT).

    A micro-batch's stage comes from the epochs consumed before it (:func:`curriculum_stage`);
    Distill has no curriculum (every batch is the full teacher chain plus the student's thoughts).
    The step's ``info`` logs ``stage`` and ``n_thoughts``.
    """

    def __init__(self, records: Sequence, encoder: PromptEncoder, method: BaselineConfig, cfg: TrainConfig,
                 rank: int = 0, world_size: int = 1, device: Optional[torch.device] = None):
        self.records, self.method = list(records), method
        super().__init__([encoder.encode(r) for r in self.records], encoder, cfg, rank, world_size, device)
        self._kept: dict[tuple[int, int], EncodedExample] = {}

    def stage_of(self, epochs_done: float) -> int:
        return curriculum_stage(epochs_done, self.method) if isinstance(self.method, CurriculumFields) else 0

    def _example(self, i: int, stage: int) -> EncodedExample:
        """Record ``i`` encoded with the steps it keeps at ``stage`` (cached)."""
        if not isinstance(self.method, CurriculumFields):
            return self.examples[i]
        key = (i, min(stage, self.method.max_stage))
        if key not in self._kept:
            record = self.records[i]
            kept = remaining_steps(record.steps, stage, self.method.max_stage)
            self._kept[key] = self.encoder.encode(dataclasses.replace(record, steps=kept))
        return self._kept[key]

    def __call__(self, step: int) -> StepBatch:
        micro: list[ThoughtBatch | DistillBatch] = []
        stage = 0
        for _ in range(self.cfg.grad_accum):
            rows = self.order.next_indices()
            epochs_done = self.order.epoch + (self.order.index - self.global_micro) / len(self.examples)
            stage = self.stage_of(epochs_done)
            examples = [self._example(i, stage) for i in rows]
            if isinstance(self.method, DistillConfig):
                micro.append(distill_batch(examples, self.encoder, self.method))
            else:
                micro.append(thought_batch(examples, self.encoder, thoughts_at(stage, self.method)))
        return StepBatch(micro, {"stage": stage, "n_thoughts": thoughts_at(stage, self.method),
                                 "epoch": self.order.epoch})
