"""Typed configuration of the RL stage (GRPO over latent reasoning).

Defaults follow docs/METHOD.md's "RL (GRPO)" section where the reference has a value (8 rollouts per
question, reward 1 if correct else 0, epsilon 0.2, the loss averaged over latents and over answer
tokens separately and added, no KL, lr 1e-6, grad clip 1.0, one pass over each rollout); every other
default is our choice and says why. One exception: the reference takes one optimizer step per 8 of a
rollout's trajectories, which is ``trajectories_per_update: 8`` (set in the GPU recipes), while the
default (None) takes one step per rollout, which suits the small CPU runs.

Why not ``optim: TrainConfig``: a TrainConfig carries an SFT objective, SFT batch fields and SFT
validation fields that mean nothing (or something else) here. Instead :class:`RLConfig` holds the
engine's knobs under the same names as TrainConfig (lr, weight_decay, grad_clip, precision,
zero_stage, backend, ...) and :meth:`RLConfig.train_config` builds the TrainConfig the shared
engine, loop and validator take. The mapping is one place, so the two stay consistent.

Unknown keys are refused (``extra="forbid"``), so a typo is an error.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from colar_core.config import GenerationConfig, ObjectiveConfig, StrictModel
from colar_core.training.config import LauncherConfig, StageChecks, TrainConfig


class RewardConfig(StrictModel):
    """Weights of the reward parts; the total is ``correct * r_correct + length * r_length``.

    ``r_correct`` is 1 when the answer matches (``scoring.answers_match``), else 0 (reference).
    ``r_length`` is a bonus that only a *correct* rollout can earn, so a wrong answer never gets
    any reward and a correct one always beats a wrong one, whatever the weights (see
    :mod:`colar_core.rl.rewards`).
    """

    correct: float = Field(1.0, ge=0.0, description="Weight of the 0/1 correctness reward (reference: the only one).")
    length: float = Field(
        0.0, ge=0.0, description="Weight of the length bonus of correct rollouts (0 = off, the reference's main "
        "setting). Shortens chains; see length_form.")
    length_form: Literal["linear", "inverse"] = Field(
        "linear", description="'linear': correct * (1 - n_latents / max_latents), a gentle push towards shorter "
        "chains bounded in [0, 1); 'inverse': correct / n_latents (the paper's 'divided by #L' option), a strong "
        "push that halves the bonus from 1 to 2 latents. Both are 0 for a wrong answer.")

    @model_validator(mode="after")
    def _some_reward(self):
        if self.correct == 0 and self.length == 0:
            raise ValueError("reward weights are all zero: there is nothing to learn")
        return self


class RLConfig(StageChecks):
    """One RL stage: GRPO on a CoLaR-SFT model, on the shared engine / loop / checkpoints.

    One *RL step* = one rollout (``questions_per_step`` questions x ``group_size`` samples on every
    process) followed by ``update_epochs`` passes over it, each of ``updates_per_pass`` optimizer
    updates (one per ``trajectories_per_update`` trajectories; one per pass when that is None).
    ``max_steps``, ``checkpoint_every`` and ``eval_every`` count RL steps; metrics are logged per
    optimizer update (the same thing with the defaults: one update per rollout).
    """

    # ----- what is sampled -------------------------------------------------------------------------
    max_steps: int = Field(200, gt=0, description="RL steps (rollouts) of the stage. Our default: enough to see the "
                           "reward move on the tiny task at a higher lr; real runs set it.")
    questions_per_step: int = Field(8, gt=0, description="Distinct questions per RL step and process (so 64 "
                                    "trajectories with the default group). Our choice: fits one GPU for a 1B model.")
    group_size: int = Field(8, ge=2, description="Rollouts per question (reference 8). At least 2: a group of one "
                            "has no spread, so its advantage is always 0.")
    compression_factor: int = Field(2, ge=1, description="Thinking speed c in the prompt of every rollout "
                                    "(reference RL on MATH: c=2).")
    generation: GenerationConfig = Field(
        default_factory=GenerationConfig,
        description="Rollout decoding: latents sampled from the Gaussian head, tokens sampled (reference), "
        "max_latents is the chain cap (and the length bonus' denominator), batch_size the rollout chunk.")
    rewards: RewardConfig = Field(default_factory=RewardConfig, description="Reward weights (correct=1, length=0).")

    # ----- the objective ---------------------------------------------------------------------------
    clip_eps: float = Field(0.2, gt=0.0, lt=1.0, description="PPO clip range epsilon (reference 0.2).")
    loss_aggregation: Literal["part_mean", "token_mean", "sum", "sum_div32"] = Field(
        "part_mean", description="How each trajectory's per-action clipped loss (and KL) is combined; the result is "
        "then averaged over all trajectories of the optimizer step. 'part_mean' (default; the reference's "
        "average_per_token_loss: True, src/modules/grpo.py): the mean over the trajectory's latents plus the mean "
        "over its answer tokens (closing '###' included), so the answer weighs the same however long the chain "
        "is; continue_actions count with the latents. 'token_mean' (colar's earlier default): one mean over "
        "latents and answer tokens together, so answer tokens weigh less as chains grow. 'sum': the sum over all "
        "actions (the paper reports #L then runs to the cap). 'sum_div32': that sum divided by 32, exactly the "
        "reference's average_per_token_loss: False (masked_sum), the value its shipped colar.yaml sets.")
    kl_beta: float = Field(0.0, ge=0.0, description="Weight of the k3 KL estimate to the frozen starting policy "
                           "(0 = off, as in the reference). When on, every process keeps a full frozen copy of "
                           "the starting model.")
    continue_actions: bool = Field(
        False, description="Also count the 'go on' decisions, log(1 - p('###')) after every latent the chain "
        "continued from, as actions: the objective then holds the exact likelihood of the chain's length. Off = "
        "reference (only the closing '###' counts, so a wrong chain is never told to have stopped later).")
    update_epochs: int = Field(1, ge=1, description="Passes over each rollout's trajectories (reference 1). Old "
                               "log-probs are computed once, right after the rollout.")
    trajectories_per_update: Optional[int] = Field(
        None, gt=0, description="Trajectories per optimizer update, per process. Set: each rollout's questions_per_step "
        "* group_size trajectories are shuffled (seeded by the seed and the rollout's number, so a resumed run "
        "shuffles alike) and cut into mini-batches of this many, one AdamW step each, so a pass over the rollout "
        "takes (questions_per_step * group_size) / trajectories_per_update updates (the reference: exp_batch_size "
        "8 in src/configs/models/colar.yaml, one step per 8 trajectories of a shuffled replay buffer). None = one "
        "update per pass over all of the rollout's trajectories (colar's default).")
    micro_batch_size: Optional[int] = Field(
        None, gt=0, description="Trajectories per forward/backward; each update's trajectories (trajectories_per_update, "
        "else questions_per_step * group_size) are split into accumulated micro-batches of this many. None = one "
        "micro-batch per update.")
    disable_dropout: bool = Field(True, description="Set every dropout probability to 0 so the policy that is "
                                  "optimised is the one that sampled (ratio 1 at the first update), as TRL does.")

    # ----- optimisation (same names and meaning as TrainConfig) ------------------------------------
    lr: float = Field(1e-6, gt=0, description="AdamW learning rate (reference 1e-6).")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay (the reference's AdamW setting, 0.01).")
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas (torch defaults).")
    warmup_steps: int = Field(0, ge=0, description="Linear lr warm-up over this many optimizer updates (0: none).")
    lr_schedule: Literal["constant", "linear", "cosine"] = Field("constant", description="After warm-up (reference: "
                                                                 "constant).")
    grad_clip: float = Field(1.0, ge=0, description="Global gradient-norm clip (reference 1.0; 0 = off).")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="As TrainConfig.precision; 'fp32' for CPU runs "
                                               "and exact-resume checks, 'bf16' on GPUs.")
    zero_stage: Optional[int] = Field(None, description="As TrainConfig.zero_stage (DeepSpeed ZeRO 0-3; None: the "
                                      "deepspeed_config file's stage, else 2).")
    backend: Literal["deepspeed", "torch"] = Field("deepspeed", description="As TrainConfig.backend.")
    optimizer: Literal["auto", "adamw", "fused_adam", "cpu_adam"] = Field("auto", description="As "
                                                                           "TrainConfig.optimizer.")
    deepspeed_config: Optional[str] = Field(None, description="As TrainConfig.deepspeed_config.")
    seed: int = Field(0, description="Seeds the question order and the rollout sampling streams.")

    # ----- bookkeeping -----------------------------------------------------------------------------
    log_every: int = Field(1, gt=0, description="Call on_step every this many optimizer updates.")
    checkpoint_every: int = Field(50, ge=0, description="Save a resumable checkpoint every N RL steps (0 = only at "
                                  "the end). Always on a rollout boundary, so resume is exact.")
    keep_checkpoints: int = Field(2, ge=1, description="Keep the newest K resumable checkpoints.")
    eval_every: int = Field(0, ge=0, description="Validate every N RL steps and at the end (0 = never).")
    eval_compression_factors: Optional[list[int]] = Field(
        None, description="Factors validated; None = [compression_factor]. Score = their mean accuracy.")
    eval_size: Optional[int] = Field(200, gt=0, description="Validation examples used (the first N); None = all.")
    eval_seed: int = Field(0, description="Sampling seed of validation (the same every evaluation).")
    eval_generation: Optional[GenerationConfig] = Field(None, description="Decoding of validation; None = generation.")
    keep_best: int = Field(1, ge=0, description="Keep the K best models by validation score.")
    final_model: Literal["best", "last"] = Field(
        "last", description="What out/model holds: the last policy (default: RL is meant to move the policy, and "
        "the length bonus trades a little accuracy by design) or the best validated one.")
    early_stopping_patience: Optional[int] = Field(None, gt=0, description="Stop after this many evaluations "
                                                   "without improvement (None = off).")
    launcher: LauncherConfig = Field(default_factory=LauncherConfig, description="Process layout (see "
                                     "training/launch.py).")

    @model_validator(mode="after")
    def _consistent(self):
        if self.trajectories_per_update is not None and self.trajectories_per_step % self.trajectories_per_update:
            raise ValueError(f"trajectories_per_update ({self.trajectories_per_update}) must divide questions_per_step "
                             f"* group_size ({self.trajectories_per_step})")
        if self.micro_batch_size is not None and self.trajectories_per_update is not None and \
                self.trajectories_per_update % self.micro_batch_size:
            raise ValueError(f"micro_batch_size ({self.micro_batch_size}) must divide trajectories_per_update "
                             f"({self.trajectories_per_update})")
        if self.micro_batch_size is not None and self.trajectories_per_step % self.micro_batch_size:
            raise ValueError(f"micro_batch_size ({self.micro_batch_size}) must divide questions_per_step * "
                             f"group_size ({self.trajectories_per_step})")
        if not (self.generation.sample_latents or self.generation.do_sample):
            raise ValueError("generation samples neither latents nor tokens: every rollout of a group would be "
                             "identical and no advantage could be non-zero")
        if self.warmup_steps > self.total_updates:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) exceeds the stage's optimizer updates "
                             f"({self.total_updates})")
        return self

    # ----- derived ---------------------------------------------------------------------------------
    @property
    def trajectories_per_step(self) -> int:
        """Trajectories one process samples per RL step."""
        return self.questions_per_step * self.group_size

    @property
    def trajectories_per_optimizer_step(self) -> int:
        """Trajectories one process feeds one optimizer update (``trajectories_per_update``, else all of
        the rollout's)."""
        return self.trajectories_per_update or self.trajectories_per_step

    @property
    def updates_per_pass(self) -> int:
        """Optimizer updates of one pass over a rollout's trajectories."""
        return self.trajectories_per_step // self.trajectories_per_optimizer_step

    @property
    def updates_per_rollout(self) -> int:
        """Optimizer updates per RL step: ``update_epochs`` passes of ``updates_per_pass``."""
        return self.update_epochs * self.updates_per_pass

    @property
    def micro_batches_per_update(self) -> int:
        size = self.trajectories_per_optimizer_step
        return size // (self.micro_batch_size or size)

    @property
    def total_updates(self) -> int:
        """Optimizer updates of the whole stage (the shared loop's ``max_steps``)."""
        return self.max_steps * self.updates_per_rollout

    def eval_factors(self) -> list[int]:
        return self.eval_compression_factors or [self.compression_factor]

    def train_config(self) -> TrainConfig:
        """The TrainConfig the shared engine, loop and validator read (SFT-only fields at defaults).

        Steps there are optimizer updates: ``max_steps = max_steps * updates_per_rollout``, and
        ``checkpoint_every`` / ``eval_every`` are scaled the same way so they land on rollout
        boundaries. ``batch_size`` is the micro-batch of trajectories, ``grad_accum`` the micro-batches
        of one update.
        """
        e = self.updates_per_rollout
        return TrainConfig(
            objective=ObjectiveConfig(mode="colar", compression_factors=[self.compression_factor]),
            max_steps=self.total_updates,
            batch_size=self.micro_batch_size or self.trajectories_per_optimizer_step,
            grad_accum=self.micro_batches_per_update,
            lr=self.lr, weight_decay=self.weight_decay, adam_betas=self.adam_betas,
            warmup_steps=self.warmup_steps, lr_schedule=self.lr_schedule, grad_clip=self.grad_clip,
            precision=self.precision, zero_stage=self.zero_stage, backend=self.backend, optimizer=self.optimizer,
            deepspeed_config=self.deepspeed_config, seed=self.seed, log_every=self.log_every,
            checkpoint_every=self.checkpoint_every * e, keep_checkpoints=self.keep_checkpoints,
            eval_every=self.eval_every * e, eval_compression_factors=self.eval_factors(), eval_size=self.eval_size,
            eval_seed=self.eval_seed, keep_best=self.keep_best, final_model=self.final_model,
            early_stopping_patience=self.early_stopping_patience,
            generation=self.eval_generation or self.generation, launcher=self.launcher,
        )
