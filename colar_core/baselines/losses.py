"""The baselines' losses, written as the reference computes them (see :mod:`.batches` for the layout).

* iCoT and Coconut: the CE of one pass (prompt, ``n`` thoughts, block), over the block's tokens
  after its first: ``icot_loss`` (``n = 0``) and ``coconut_loss`` (``n = stage * c``) are the same
  computation on different batches.
* Distill: ``alpha * CE(teacher) + beta * CE(student) + gamma * smooth_l1(student states, teacher
  states.detach())``, the states being every layer's output (embeddings excluded; the last one after
  the final norm, as HF's ``hidden_states``) at the matched answer positions.

Deliberate differences from the reference: pads are never labels (its ``labels=input_ids`` also
scores pad tokens), and the teacher and student each run their own prompt forward (the reference
reuses the question's KV cache, which recent ``transformers`` versions extend in place).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from colar_core.baselines.batches import DistillBatch, ThoughtBatch
from colar_core.baselines.config import DistillConfig
from colar_core.inference import DecodeState, feed_thoughts
from colar_core.losses import token_cross_entropy


def run_pass(model, batch: ThoughtBatch, all_layers: bool = False):
    """Prompt forward, ``batch.n_thoughts`` sequential thought forwards (KV cache), then the block in
    one forward. Returns the block's last hidden states ``[B, L, H]`` (every layer's with ``all_layers``)."""
    state = DecodeState(model, batch.prompts, batch.pad_id)
    feed_thoughts(state, model, batch.n_thoughts)
    return state.extend(model.embed(batch.block_ids), batch.block_mask, all_layers=all_layers)


def block_ce(model, hidden: torch.Tensor, batch: ThoughtBatch) -> torch.Tensor:
    """Mean CE of block tokens ``1..`` predicted from block positions ``0..`` (pads excluded)."""
    labelled = batch.block_mask[:, 1:]
    logits = model.token_logits(hidden[:, :-1][labelled])
    return token_cross_entropy(logits, batch.block_ids[:, 1:][labelled])


def _counts(batch: ThoughtBatch) -> dict[str, torch.Tensor]:
    n = batch.block_mask.sum()
    return {"n_label_tokens": batch.block_mask[:, 1:].sum(), "n_positions": n}


def pass_loss(model, batch: ThoughtBatch) -> dict[str, torch.Tensor]:
    """``loss`` = CE of one pass (iCoT, Coconut), with the counts the loop sums."""
    ce = block_ce(model, run_pass(model, batch), batch)
    return {"loss": ce, "ce": ce, **_counts(batch)}


icot_loss = pass_loss  #: iCoT: a pass without thoughts over the remaining steps and the answer
coconut_loss = pass_loss  #: Coconut: a pass with ``stage * c`` thoughts, then the remaining steps and answer


def distill_loss(model, batch: DistillBatch, cfg: DistillConfig) -> dict[str, torch.Tensor]:
    """Distill's total loss and its parts (``teacher_ce``, ``student_ce``, ``distill``)."""
    teacher = run_pass(model, batch.teacher, all_layers=True)
    student = run_pass(model, batch.student, all_layers=True)
    teacher_ce = block_ce(model, teacher[-1], batch.teacher)
    student_ce = block_ce(model, student[-1], batch.student)
    t = torch.stack(teacher[1:], dim=-1)[batch.rows, batch.teacher_pos]  # [M, H, layers]
    s = torch.stack(student[1:], dim=-1)[batch.rows, batch.student_pos]
    distill = F.smooth_l1_loss(s.float(), t.detach().float())
    total = cfg.alpha * teacher_ce + cfg.beta * student_ce + cfg.gamma * distill
    return {"loss": total, "teacher_ce": teacher_ce, "student_ce": student_ce, "distill": distill,
            **_counts(batch.teacher)}
