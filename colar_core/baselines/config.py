"""Typed configs of the baselines, one per method, with the reference's defaults.

Reference: ``src/configs/models/{icot,coconut,distill}.yaml`` of xiaomi-research/colar (3 stages of
2 epochs each; 2 thoughts per removed step; 6 thoughts and weights 1 / 1 / 20 for Distill). Each
holds the method's own fields and the :class:`~colar_core.training.config.TrainConfig` of its stage
(optimizer, steps, engine, validation); that ``train.objective`` is not used by a baseline (its loss
is the method's).
"""

from __future__ import annotations

from typing import Literal, Union

from pydantic import Field

from colar_core.config import ObjectiveConfig, StrictModel
from colar_core.training.config import TrainConfig

METHODS = ("icot", "coconut", "distill")


def _baseline_train() -> TrainConfig:
    # objective unused by the baselines; 'cot' keeps its (ignored) fields from suggesting latents
    return TrainConfig(objective=ObjectiveConfig(mode="cot", compression_factors=[1]))


class _BaselineBase(StrictModel):
    init_from_cot: bool = Field(
        True, description="Start from the CoT-SFT model (reference: iCoT and Coconut load the CoT checkpoint and "
        "start at stage 1). False: start from the pipeline's backbone (the pipeline then needs no sft_cot for it).")
    train: TrainConfig = Field(default_factory=_baseline_train,
                               description="The stage's training run (steps, batch, lr, engine, validation).")


#: The schedules a curriculum may follow (colar_core.baselines.batches.curriculum_stage).
Curriculum = Literal["reference", "colar", "coconut"]


class CurriculumFields(StrictModel):
    """Stepwise removal of reasoning steps (iCoT and Coconut)."""

    curriculum: Curriculum = Field(
        "colar", description="The stage schedule. 'colar': one stage per `epochs_per_stage` epochs, 1..max_stage "
        "(what the reference's config says). 'reference': the reference's code, ceil(epoch + 1 / epochs_per_stage) "
        "over whole epochs, which by operator precedence is one stage per epoch (1, 2, 3, 3, ...) whenever "
        "epochs_per_stage >= 1 (coconut.py:23-26, icot.py:19-22 of xiaomi-research/colar). 'coconut': "
        "facebookresearch/coconut's run.py, epoch // epochs_per_stage (its GSM config: 3): stage 0 is plain CoT "
        "(skipped when init_from_cot, as its GSM run resumes the CoT model at stage 1), stage k <= max_stage "
        "drops k steps for k * c thoughts (max_stage keeps the steps after it), then a last stage max_stage + 1 "
        "drops every step. Default 'colar': it keeps `epochs_per_stage` meaningful and earlier runs unchanged; "
        "configs/table1*.yaml choose 'reference' to be set beside the paper's numbers.")
    epochs_per_stage: float = Field(
        2.0, gt=0, description="Training epochs per curriculum stage (reference 2; facebookresearch/coconut 3). "
        "Fractions are allowed: the stage follows the examples consumed, so 0.25 advances every quarter epoch "
        "(CPU-sized runs). Under curriculum 'reference' only ceil(1 / epochs_per_stage) matters (see there).")
    max_stage: int = Field(
        3, ge=1, description="Last stage that removes steps one by one (reference 3; facebookresearch/coconut's "
        "max_latent_stage 3). Stage k < max_stage removes the first k steps of every chain; stage max_stage "
        "removes all of them ('coconut': keeps the steps after the first max_stage, and stage max_stage + 1 "
        "removes all). Training starts at stage 1 (see `curriculum` for 'coconut') and stays at the last stage.")


class ICoTConfig(_BaselineBase, CurriculumFields):
    """iCoT (stepwise internalization): stage k trains on the text with its first k steps removed
    (all steps at the last stage); inference decodes whatever steps remain, then the answer."""

    method: Literal["icot"] = Field("icot", description="The method (what a job file and a saved model name).")


class CoconutConfig(_BaselineBase, CurriculumFields):
    """Coconut: stage k replaces the first k steps with ``min(k, max_stage) * thoughts_per_step``
    continuous thoughts between the prompt and the remaining steps; inference runs
    ``max_stage * thoughts_per_step`` thoughts, then decodes the answer."""

    method: Literal["coconut"] = Field("coconut", description="The method (what a job file and a saved model name).")
    thoughts_per_step: int = Field(2, ge=1, description="Continuous thoughts per removed step, c (reference 2 on GSM).")
    projection: bool = Field(
        False, description="Feed each thought through a 2-layer MLP (Linear-GELU-Linear) before it is the next "
        "input embedding (reference coconut_proj: false: the raw last hidden state).")

    @property
    def n_thoughts(self) -> int:
        """Thoughts at the last stage: what inference runs."""
        return self.max_stage * self.thoughts_per_step


class DistillConfig(_BaselineBase):
    """Distill (CODI-style self-distillation, the reference's distill.py): one teacher pass over
    question + steps + answer and one student pass over question + ``n_thoughts`` continuous thoughts
    + answer; loss ``alpha * teacher CE + beta * student CE + gamma * smooth-L1`` between the
    student's and the (detached) teacher's hidden states of every layer at the distilled answer
    positions."""

    method: Literal["distill"] = Field("distill", description="The method (what a job file and a saved model name).")
    n_thoughts: int = Field(6, ge=1, description="Continuous thoughts of the student (reference 6).")
    alpha: float = Field(1.0, ge=0, description="Weight of the teacher's CE over steps + answer (reference 1).")
    beta: float = Field(1.0, ge=0, description="Weight of the student's CE over the answer (reference 1).")
    gamma: float = Field(20.0, ge=0, description="Weight of the smooth-L1 hidden-state distillation (reference 20).")
    projection: bool = Field(
        True, description="Feed each thought through a 2-layer MLP (Linear-GELU-Linear). The reference builds and "
        "applies that projector unconditionally (its distill_proj: false is never read), hence true.")
    distill_at: Literal["answer_prefix", "answer"] = Field(
        "answer_prefix", description="Where hidden states are matched: 'answer_prefix' = the last token of "
        "'Answer:', the position that predicts the answer (reference: the ':' token); 'answer' = every position "
        "of the answer block from that token to the one before EOS.")


BaselineConfig = Union[ICoTConfig, CoconutConfig, DistillConfig]
