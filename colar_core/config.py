"""Typed, validated configuration for every part of the method.

Each class documents its fields; defaults follow the paper / reference code where one exists and
say so. Unknown keys are refused (``extra="forbid"``) so that a typo is an error, not a silent
default. These classes are plain pydantic: the pipeline composes them, the library takes them.
"""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TinyBackboneConfig(StrictModel):
    """A causal LM built from scratch (random weights): the embedded default and the benchmarks.

    No weights are downloaded; the architecture comes from ``transformers`` config classes.
    """

    arch: Literal["llama", "qwen2", "gpt2"] = "llama"
    hidden_size: int = Field(128, gt=0)
    num_layers: int = Field(2, gt=0)
    num_heads: int = Field(4, gt=0)
    num_kv_heads: Optional[int] = Field(None, gt=0, description="GQA key/value heads; None = num_heads.")
    intermediate_size: Optional[int] = Field(None, gt=0, description="MLP width; None = 4 x hidden_size.")
    max_position_embeddings: int = Field(512, gt=0)
    tie_word_embeddings: bool = True

    @model_validator(mode="after")
    def _heads_divide(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})")
        if self.num_kv_heads is not None and self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be divisible by num_kv_heads ({self.num_kv_heads})")
        return self


class LoraConfig(StrictModel):
    """LoRA adapters via peft. Reference: r=128, alpha=32 on q_proj and v_proj."""

    r: int = Field(128, gt=0)
    alpha: int = Field(32, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"])
    modules_to_save: list[str] = Field(
        default_factory=list,
        description="Extra modules trained in full (e.g. ['embed_tokens'] when '###' was added to the vocabulary).",
    )


class ModelConfig(StrictModel):
    """Which backbone to wrap and how the CoLaR parts are shaped."""

    name_or_path: str = Field(
        "tiny",
        description="'tiny' builds a small model from scratch (see `tiny`); otherwise a hub id or local "
        "directory loaded with AutoModelForCausalLM.from_pretrained (safetensors only).",
    )
    tiny: TinyBackboneConfig = Field(default_factory=TinyBackboneConfig)
    tokenizer: Optional[str] = Field(
        None,
        description="Tokenizer id or directory. None: the backbone's own, or for 'tiny' a word-level "
        "tokenizer built from the training data (numbers stay whole tokens).",
    )
    trust_remote_code: bool = False
    lora: Optional[LoraConfig] = Field(None, description="None = full fine-tune (default for tiny).")
    latent_intermediate_size: Optional[int] = Field(
        None, gt=0, description="Width of the latent head's MLP; None = the backbone's hidden size."
    )
    deterministic_latents: bool = Field(
        False, description="Deterministic latent head variant (sigma ~ 0): the head outputs its mean."
    )
    embedding_scale: Union[float, Literal["auto"]] = Field(
        "auto",
        description="Divides latent targets and multiplies sampled latents. 'auto': the paper's constant "
        "for a model it names (e.g. 0.018 for Llama-3.2-1B), otherwise the std of the model's own "
        "input-embedding table measured when the CoLaR model is first built (then frozen in its config).",
    )
    pooling: Literal["sqrt", "mean"] = Field(
        "sqrt", description="Merge a group as sum / sqrt(n real tokens) (paper default) or the mean (ablation)."
    )
    dtype: Literal["float32", "bfloat16"] = "float32"

    @field_validator("embedding_scale")
    @classmethod
    def _positive_scale(cls, v):
        if v != "auto" and not v > 0:
            raise ValueError("must be 'auto' or a positive number")
        return v


class ObjectiveConfig(StrictModel):
    """What the SFT loss looks like. Reference defaults on GSM: CE 1, soft-MSE 1, entropy 0, 2nd pass 0."""

    mode: Literal["colar", "cot", "nocot"] = Field(
        "colar",
        description="'colar': compressed latents with a random factor per step; 'cot': explicit chain "
        "(r=1 text; the CoLaR start point); 'nocot': answer directly (baseline, steps dropped).",
    )
    compression_factors: list[int] = Field(
        default_factory=lambda: [1, 2, 3, 4, 5],
        description="One factor is drawn uniformly per optimizer step and shared by the batch.",
    )
    auto_prob: float = Field(0.0, ge=0.0, le=1.0, description="Probability the prompt says 'auto' instead of r.")
    latent_loss: Literal["soft_mse", "nll"] = "soft_mse"
    ce_weight: float = Field(1.0, ge=0.0)
    latent_weight: float = Field(1.0, ge=0.0)
    entropy_weight: float = Field(0.0, ge=0.0, description="Entropy bonus of the latent head (soft-MSE only).")
    second_pass_weight: float = Field(
        0.0, ge=0.0, description="CE of a second forward pass fed the predicted latents (0 = off)."
    )

    @field_validator("compression_factors")
    @classmethod
    def _factors_positive(cls, v):
        if not v:
            raise ValueError("needs at least one factor")
        bad = [r for r in v if r < 1]
        if bad:
            raise ValueError(f"factors must be >= 1, got {bad}")
        return sorted(set(v))


class GenerationConfig(StrictModel):
    """How latent / text reasoning is decoded at evaluation and in RL rollouts."""

    max_latents: int = Field(64, gt=0, description="Cap on latent steps (reference: 64 on GSM, 128 on MATH).")
    max_answer_tokens: int = Field(16, gt=0, description="Answer decoding budget after the closing '###'.")
    max_cot_tokens: int = Field(256, gt=0, description="Budget for an explicit chain (CoT baseline).")
    sample_latents: bool = Field(True, description="Sample latents from the Gaussian head (reference) or use its mean.")
    do_sample: bool = Field(True, description="Sample tokens (stop check and answer) or decode greedily.")
    temperature: float = Field(1.0, gt=0.0)
    batch_size: int = Field(64, gt=0)


class EvalConfig(StrictModel):
    """The evaluation sweep: CoLaR at each compression factor, plus the CoT / no-CoT baselines."""

    compression_factors: list[int] = Field(default_factory=lambda: [1, 2, 3, 4, 5])
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], description="Sampling seeds (paper: 5).")
    n_examples: Optional[int] = Field(None, gt=0, description="Evaluate the first N test problems; None = all.")
    cot_baseline: bool = Field(True, description="Evaluate the CoT-SFT model with explicit decoding.")
    nocot_baseline: bool = Field(False, description="Train and evaluate an answer-only model.")
    generation: GenerationConfig = Field(default_factory=GenerationConfig)

    @field_validator("compression_factors")
    @classmethod
    def _positive(cls, v):
        bad = [c for c in v if c < 1]
        if bad or not v:
            raise ValueError(f"compression factors must be integers >= 1, got {v}")
        return v

    @field_validator("seeds")
    @classmethod
    def _some_seed(cls, v):
        if not v:
            raise ValueError("needs at least one seed")
        return v
