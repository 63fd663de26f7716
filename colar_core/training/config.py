"""Typed configuration of a training run (SFT now, RL reuses most of it).

Every field is documented with its default; defaults follow the reference code where it has one
(AdamW lr 1e-4, weight decay 0.01, bf16 on GPUs) and otherwise suit the tiny CPU recipe (gradient
clipping at 1.0: the reference does not clip in SFT; see ``grad_clip``). Unknown keys are refused so
that a typo is an error.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, Optional

from pydantic import Field, field_validator, model_validator

from colar_core.config import GenerationConfig, ObjectiveConfig, StrictModel


class StageChecks(StrictModel):
    """Field checks every training-stage config shares (TrainConfig, RLConfig): ``zero_stage`` is a
    DeepSpeed ZeRO stage 0-3 or None (the DeepSpeed config file's stage, else 2), and
    ``eval_compression_factors`` is None or a non-empty list of factors >= 1 (sorted, unique); the
    ``torch`` backend runs in one process."""

    if TYPE_CHECKING:  # fields every subclass declares (in its own order, which its dumps keep)
        backend: Literal["deepspeed", "torch"]
        launcher: LauncherConfig

    @field_validator("zero_stage", check_fields=False)
    @classmethod
    def _known_stage(cls, v):
        if v is not None and v not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {v}")
        return v

    @field_validator("eval_compression_factors", check_fields=False)
    @classmethod
    def _eval_factors(cls, v):
        if v is not None:
            if not v or any(r < 1 for r in v):
                raise ValueError(f"eval_compression_factors must be factors >= 1, got {v}")
            return sorted(set(v))
        return v

    @model_validator(mode="after")
    def _torch_is_one_process(self):
        if self.backend == "torch" and self.launcher.multi_process:
            raise ValueError("backend 'torch' runs in one process; use backend 'deepspeed' for several processes")
        return self


class LauncherConfig(StrictModel):
    """How many processes run the stage, and where. One process (the default) runs in-process;
    more are started with the ``deepspeed`` launcher or ``torchrun`` (see ``launch.py``)."""

    num_gpus: int = Field(1, ge=1, description="Processes per node (one per GPU; on CPU, gloo processes).")
    num_nodes: int = Field(1, ge=1, description="Nodes. More than one needs a hostfile (deepspeed) or one "
                           "torchrun per node with node_rank.")
    hostfile: Optional[str] = Field(None, description="DeepSpeed hostfile ('host slots=N' lines); enables multi-node.")
    master_addr: Optional[str] = Field(None, description="Rendezvous address; None = 127.0.0.1 / the launcher's choice.")
    master_port: Optional[int] = Field(None, ge=1, le=65535, description="Rendezvous port; None = a free port.")
    node_rank: int = Field(0, ge=0, description="This node's rank (torchrun multi-node only).")
    launcher: Literal["auto", "deepspeed", "torchrun"] = Field(
        "auto", description="'auto': the deepspeed launcher when CUDA is available or a hostfile is given, "
        "else torchrun (the deepspeed launcher cannot start several processes without GPUs).")
    collective_timeout_s: float = Field(
        600.0, gt=0, description="Seconds a rank waits at the rendezvous or inside one collective (an all-reduce, "
        "a barrier) before the job fails, instead of torch's 30 minutes: a node whose link is down ends the stage "
        "within this, so Prefect's retry can resume it. Several nodes started over ssh also get ssh keep-alives of "
        "a sixth of it (3 unanswered end the session). Raise it when one rank works alone for longer (e.g. rank 0 "
        "exporting a large model while the others wait).")

    @property
    def world_size(self) -> int:
        return self.num_gpus * self.num_nodes

    @property
    def multi_process(self) -> bool:
        """True when the stage must be started through a launcher rather than in-process."""
        return self.world_size > 1 or self.hostfile is not None


class TrainConfig(StageChecks):
    """One SFT stage (explicit CoT, no-CoT or CoLaR), run on a DeepSpeed or plain PyTorch engine.

    Steps are optimizer steps; one step consumes ``batch_size * grad_accum * world_size`` examples.
    """

    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig,
                                       description="Mode (colar / cot / nocot), compression factors and loss weights.")
    max_steps: int = Field(1000, gt=0, description="Optimizer steps of the stage (a resumed run finishes the same total).")
    batch_size: int = Field(32, gt=0, description="Micro-batch per process (reference global batch: 256).")
    grad_accum: int = Field(1, gt=0, description="Micro-batches accumulated per optimizer step.")
    length_grouping: int = Field(
        0, ge=0, description="0 = off. k > 0: each epoch's shuffled order is cut into pools of k global "
        "micro-batches; a pool is sorted by example length, cut into micro-batches, and those are shuffled, so "
        "a micro-batch holds examples of similar length and carries little padding (like group_by_length "
        "elsewhere). Order stays seeded and resumable.")
    lr: float = Field(1e-4, gt=0, description="Peak learning rate of AdamW (reference 1e-4).")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay (reference 0.01).")
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas (torch defaults).")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up from lr/warmup_steps to lr over this many steps.")
    lr_schedule: Literal["constant", "linear", "cosine"] = Field(
        "constant", description="After warm-up: constant (reference), linear or cosine decay to min_lr_ratio*lr at max_steps.")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="Floor of the linear / cosine decay, as a fraction of lr.")
    grad_clip: float = Field(
        1.0, ge=0, description="Clip the global gradient norm to this (0 = off). The reference does not clip in SFT "
        "(its Lightning trainer leaves gradient_clip_val empty; it clips at 1.0 only in RL), so the GPU recipes set "
        "0. Default 1.0: our choice for the from-scratch CPU recipes, trained at lr 3e-3 with warm-up.")
    precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="'bf16' with backend deepspeed: DeepSpeed bf16, which casts the module's parameters to "
        "bf16 for forward and backward and keeps fp32 master copies of the trained ones in the optimizer (ZeRO 1-2 "
        "partitions, checked); with backend torch: bf16 autocast over the model's weights as loaded, and AdamW "
        "updates those weights in their own dtype (fp32 only if the model is fp32). The reference trains under "
        "Lightning's bf16-mixed: fp32 weights, bf16 autocast. 'fp32' for CPU runs and exact-resume checks.")
    zero_stage: Optional[int] = Field(
        None, description="DeepSpeed ZeRO stage 0-3 (ignored by the torch backend). None: the stage of the "
        "deepspeed_config file if it names one, else 2.")
    backend: Literal["deepspeed", "torch"] = Field(
        "deepspeed", description="'deepspeed': DeepSpeed engine (one or many processes); 'torch': plain PyTorch, "
        "one process (notebooks, quick checks).")
    optimizer: Literal["auto", "adamw", "fused_adam", "cpu_adam"] = Field(
        "auto", description="'auto'/'adamw': torch.optim.AdamW (fused kernels on CUDA; no op build needed); "
        "'fused_adam': DeepSpeed FusedAdam (CUDA, JIT-built); 'cpu_adam': DeepSpeedCPUAdam (for ZeRO "
        "optimizer offload; JIT-built, ~100 s the first time). 'auto' picks cpu_adam only when the DeepSpeed "
        "config offloads the optimizer to CPU.")
    deepspeed_config: Optional[str] = Field(
        None, description="Path to a DeepSpeed JSON file (e.g. deployments/deepspeed/zero3.json) used as the base "
        "config; the values this TrainConfig controls (batch sizes, clipping, precision, and the ZeRO stage when "
        "zero_stage is set) are merged over it. An 'optimizer' or 'scheduler' section in it replaces ours "
        "(lr / schedule fields are then ignored).")
    seed: int = Field(0, description="Seeds model init, data order, the per-step r draw and label sampling.")
    log_every: int = Field(1, gt=0, description="Call on_step every this many steps (metrics averaged over them).")
    checkpoint_every: int = Field(500, ge=0, description="Save a resumable checkpoint every N steps (0 = only at the end).")
    keep_checkpoints: int = Field(2, ge=1, description="Keep the newest K resumable checkpoints.")
    eval_every: int = Field(0, ge=0, description="Validate every N steps and at the end (0 = never).")
    eval_compression_factors: Optional[list[int]] = Field(
        None, description="Compression factors validated in colar mode; None = the trained ones. The score used "
        "for best-k and early stopping is the mean accuracy over them.")
    eval_size: Optional[int] = Field(200, gt=0, description="Validation examples used (the first N); None = all.")
    eval_seed: int = Field(0, description="Sampling seed of validation generation (same every eval, so evals compare).")
    keep_best: int = Field(1, ge=0, description="Keep the K best models by validation accuracy (exported model dirs).")
    final_model: Literal["best", "last"] = Field(
        "best", description="What out/model holds at the end: the best validated model (reference: best by val "
        "accuracy) or the last weights. Without validation it is always the last.")
    early_stopping_patience: Optional[int] = Field(
        None, gt=0, description="Stop after this many evaluations without a better val accuracy (None = off).")
    generation: GenerationConfig = Field(default_factory=GenerationConfig,
                                         description="Decoding used by validation.")
    launcher: LauncherConfig = Field(default_factory=LauncherConfig, description="Process layout (see launch.py).")

    @model_validator(mode="after")
    def _consistent(self):
        if self.warmup_steps > self.max_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) exceeds max_steps ({self.max_steps})")
        return self

    def eval_factors(self) -> list[int]:
        """Compression factors validated in colar mode."""
        return self.eval_compression_factors or list(self.objective.compression_factors)
