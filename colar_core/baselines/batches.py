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
state) and picks each micro-batch's stage from the epochs consumed before it, on the schedule the
config's ``curriculum`` names (:func:`curriculum_stage`: the reference's code, colar's reading of its
config, or facebookresearch/coconut's).
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


def first_stage(cfg: CurriculumFields) -> int:
    """The stage a run starts at: 1 (the run starts from the CoT model), except under curriculum
    'coconut' without ``init_from_cot``, which starts with its plain-CoT stage 0."""
    return 0 if cfg.curriculum == "coconut" and not getattr(cfg, "init_from_cot", True) else 1


def last_stage(cfg: CurriculumFields) -> int:
    """The stage a run ends at, which removes every step: ``max_stage``, or ``max_stage + 1`` under
    curriculum 'coconut' (whose stage ``max_stage`` still keeps the steps after the first ``max_stage``)."""
    return cfg.max_stage + 1 if cfg.curriculum == "coconut" else cfg.max_stage


def curriculum_stage(epochs_done: float, cfg: CurriculumFields) -> int:
    """The stage after ``epochs_done`` training epochs, as ``cfg.curriculum`` schedules it:

    * 'colar': one stage per ``epochs_per_stage`` epochs, starting at 1, capped at ``max_stage``;
    * 'reference': ``min(max_stage, ceil(epoch + 1 / epochs_per_stage))`` over whole epochs, the
      reference's expression as written (by operator precedence, 1, 2, 3, 3, ... for any
      ``epochs_per_stage >= 1``);
    * 'coconut': ``epoch // epochs_per_stage`` (facebookresearch/coconut's run.py), plus 1 when the run
      starts from the CoT model (its GSM config resumes the CoT model at stage 1), capped at
      ``max_stage + 1``.
    """
    if cfg.curriculum == "reference":
        epoch = math.floor(epochs_done + 1e-9)  # the reference's current_epoch: whole epochs done
        return min(cfg.max_stage, math.ceil(epoch + 1 / cfg.epochs_per_stage))
    stages_done = int(math.floor(epochs_done / cfg.epochs_per_stage + 1e-9))
    return min(last_stage(cfg), stages_done + first_stage(cfg))


def last_stage_epochs(cfg: CurriculumFields) -> float:
    """Epochs of training before the last stage (:func:`last_stage`) starts."""
    if cfg.curriculum == "reference":  # the first whole epoch at max_stage
        return float(next(e for e in range(cfg.max_stage + 1) if curriculum_stage(e, cfg) >= cfg.max_stage))
    return (last_stage(cfg) - first_stage(cfg)) * cfg.epochs_per_stage


def remaining_steps(steps: Sequence[str], stage: int, max_stage: int, curriculum: str = "colar") -> tuple[str, ...]:
    """The chain a row keeps at ``stage``: without its first ``stage`` steps; none at the last stage
    (``max_stage``; ``max_stage + 1`` under curriculum 'coconut', whose stage ``max_stage`` keeps
    ``steps[max_stage:]``)."""
    last = max_stage + 1 if curriculum == "coconut" else max_stage
    return () if stage >= last else tuple(steps[stage:])


def thoughts_at(stage: int, cfg: BaselineConfig) -> int:
    """Continuous thoughts of a pass at ``stage``: ``min(stage, max_stage) * c`` for Coconut, the fixed
    count for Distill's student, 0 for iCoT."""
    if isinstance(cfg, CoconutConfig):
        return min(stage, cfg.max_stage) * cfg.thoughts_per_step
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
        key = (i, min(stage, last_stage(self.method)))
        if key not in self._kept:
            record = self.records[i]
            kept = remaining_steps(record.steps, stage, self.method.max_stage, self.method.curriculum)
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
