"""Typed, validated configuration for every part of the method.

Each class documents its fields; defaults follow the paper / reference code where one exists and
say so. Unknown keys are refused (``extra="forbid"``) so that a typo is an error, not a silent
default. These classes are plain pydantic: the pipeline composes them, the library takes them.
"""

from __future__ import annotations

import os
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class ConfigError(ValueError):
    """A configuration problem, with the dotted field path(s) and reasons in the message."""


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
        "directory loaded with AutoModelForCausalLM.from_pretrained (safetensors only); or, with "
        "`gguf_file`, that file (filled in from it).",
    )
    gguf_file: Optional[str] = Field(
        None,
        description="A GGUF checkpoint to start from (e.g. SmolLM2-135M-Instruct.Q4_1.gguf; `colar model "
        "fetch-smollm2` fetches that one): converted once into a safetensors model folder with its tokenizer, "
        "cached under $COLAR_CACHE_DIR (default ~/.cache/colar) by the file's sha256, and used as backbone and "
        "tokenizer (colar_core.gguf_import). `name_or_path` then names the same file (a .gguf name_or_path "
        "sets this field). `colar model import` writes such a folder where you choose.",
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
    pooling: Literal["sqrt", "mean", "rotate", "gain"] = Field(
        "sqrt", description="Merge a group as sum / sqrt(n real tokens) (paper default) or the mean (ablation); "
        "both ignore token order inside a group. Order-aware, for tokenizers that split numbers into digits "
        "(colar_core.merging): 'rotate' turns slot j by j * merge_angle radians in fixed 2-D planes before the "
        "sum / sqrt(n) (no parameters); 'gain' multiplies slot j by a learned per-dimension gain near 1 (saved "
        "with the model). Slot 0 is untouched by both, so r = 1 is the plain token embedding. See "
        "docs/BENCHMARKS.md, 'Order-aware merge vs digit tokens', before choosing one."
    )
    merge_angle: float = Field(
        0.2, gt=0.0, le=1.0, description="Rotation per slot of pooling 'rotate', in radians (slot j keeps cosine "
        "cos(j * merge_angle) with its own embedding). Ignored by the other poolings."
    )
    add_number_tokens: int = Field(
        0, ge=0, le=9999, description="Add every integer 0..N as one token (with and without a leading space) to "
        "a pretrained tokenizer that splits numbers into digits (SmolLM2, Qwen, Mistral), so a merge never "
        "sees digits; each new embedding starts as the mean of its digit pieces' embeddings and is trained "
        "(colar_core.number_tokens). 0 = off. Not for the built-in tokenizer, which keeps numbers whole "
        "unless `number_tokens` says 'digits'."
    )
    number_tokens: Literal["whole", "digits"] = Field(
        "whole", description="For 'tiny' without `tokenizer`: the built-in tokenizer keeps every integer up to "
        "1000 as one token ('whole', default) or splits numbers into digits as most pretrained tokenizers do "
        "('digits', for measuring the merge)."
    )
    dtype: Literal["float32", "bfloat16"] = "float32"

    @model_validator(mode="after")
    def _number_tokens_train_under_lora(self):
        if self.add_number_tokens and self.lora is not None and \
                not any("embed_tokens" in m for m in self.lora.modules_to_save):
            raise ValueError("model.add_number_tokens with LoRA: the new number embeddings would stay at their "
                             "initial values; add 'embed_tokens' (and an untied 'lm_head') to "
                             "model.lora.modules_to_save")
        return self

    @field_validator("embedding_scale")
    @classmethod
    def _positive_scale(cls, v):
        if v != "auto" and not v > 0:
            raise ValueError("must be 'auto' or a positive number")
        return v

    @model_validator(mode="before")
    @classmethod
    def _gguf_names_the_backbone(cls, data):
        """``gguf_file`` and ``name_or_path`` name one backbone: the GGUF fills an unset (or 'tiny')
        ``name_or_path``, a ``.gguf`` name_or_path fills ``gguf_file``; two different ones are refused.
        A leading '~' is expanded here, so keys, preflight and loaders all see the same path."""
        if not isinstance(data, dict):
            return data
        gguf, name = data.get("gguf_file"), data.get("name_or_path")
        if gguf is None and isinstance(name, str) and name.lower().endswith(".gguf"):
            gguf = name
        if not isinstance(gguf, str):
            return data
        gguf = os.path.expanduser(gguf)
        if name not in (None, "tiny") and (not isinstance(name, str) or os.path.expanduser(name) != gguf):
            raise ValueError(f"gguf_file {gguf!r} and name_or_path {name!r} name two backbones; "
                             "give the GGUF file alone")
        return {**data, "gguf_file": gguf, "name_or_path": gguf}


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
    entropy_weight: float = Field(
        0.0, description="Weight of the latent head's entropy (per dim, mean over latent positions), ADDED to the "
        "loss as the reference does (total += entropy_weight * entropy): a positive weight lowers the entropy "
        "(an entropy penalty), a negative one is an entropy bonus. Reference default 0. Applies to both latent "
        "losses. (Before this matched the reference, colar subtracted it.)")
    second_pass_weight: float = Field(
        0.0, ge=0.0, description="CE of a second forward pass fed the predicted latents (0 = off)."
    )
    opening_think_label: bool = Field(
        True, description="Cross-entropy label on the '###' that opens the steps block, predicted from the last "
        "prompt position, as the reference labels every token after the question (src/models/colar.py, the "
        "'###' group's label; cot.py likewise). Every mode. Inference feeds that '###' as part of the prompt, so "
        "the label is never sampled; it is on to match the reference's objective. False: colar's earlier "
        "objective (no label there).")
    closing_think_latent: bool = Field(
        True, description="Mode 'colar': a latent-loss term at each row's last step group (the '###' group if a row "
        "has no steps) whose target is the embedding of the closing '###' that follows it (divided by the "
        "embedding scale, like every target), as the reference's latent loss covers every real steps position "
        "with the next input embedding as target. Part of the latent-loss mean (and of the entropy term); not "
        "fed to the second pass. False: colar's earlier objective (no latent target after the last step group).")

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
    top_p: float = Field(
        0.9, gt=0.0, le=1.0,
        description="Nucleus sampling of the answer tokens and of an explicit CoT chain (with do_sample): only "
        "the most likely tokens whose probabilities (at `temperature`) add up to top_p may be drawn; 1.0 = off. "
        "Reference: 0.9 (answer_generation_config in its colar.yaml, passed to HF generate, which also decodes "
        "its CoT baseline). Not applied to the '###' stop check after each latent, which the reference samples "
        "from the full softmax.")
    batch_size: int = Field(64, gt=0)


#: The prepared test split of the pipeline's own data, as an ``eval.datasets`` source.
TEST_SPLIT = "test"
#: Names an evaluation set may not take: the average over sets, and the modes of the metric names.
RESERVED_SET_NAMES = frozenset({"avg", "cot", "nocot", "icot", "coconut", "distill", "cot-reference",
                                "icot-reference", "coconut-reference", "distill-reference"})
_SET_NAME = r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$"


class EvalSet(StrictModel):
    """One named test set of the evaluation. Its metrics are ``accuracy/{name}/c{c}``,
    ``mean_latents/{name}/c{c}``, ``accuracy/{name}/cot``, ... (see :mod:`colar_core.evaluation`).

    Written in a config either in full or as a bare string, which is both name and source
    (``- svamp`` is ``{name: svamp, source: svamp}``).
    """

    name: str = Field(pattern=_SET_NAME, description="Name in metric keys and the Table-1 report "
                      "(letters, digits, '_', '.', '-'; not 'avg' nor a method: cot, nocot, icot, coconut, distill).")
    source: str = Field(TEST_SPLIT, min_length=1, description="'test' (the prepared test split of `data`), a "
                        "bundled set (gsm8k-test, gsm8k-aug-test, gsm-hard, svamp, multiarith, ...), a file, or a "
                        "Hugging Face dataset id / saved folder.")
    format: str = Field("auto", description="Reader format, as `data.format` (auto recognises every bundled set).")
    split: Optional[str] = Field(None, description="Split of a Hugging Face dataset that has several.")
    n_examples: Optional[int] = Field(None, gt=0, description="First N problems of this set; None = eval.n_examples.")

    @model_validator(mode="before")
    @classmethod
    def _bare_name(cls, value):
        return {"name": value, "source": value} if isinstance(value, str) else value

    @field_validator("format")
    @classmethod
    def _known_format(cls, v):
        from colar_core.data.readers import known_format  # the readers import this module's neighbours

        return known_format(v)

    @field_validator("name")
    @classmethod
    def _not_reserved(cls, v):
        if v in RESERVED_SET_NAMES:
            raise ValueError(f"set name {v!r} is reserved (metric keys use {sorted(RESERVED_SET_NAMES)})")
        return v


class EvalConfig(StrictModel):
    """The evaluation sweep: CoLaR at each compression factor, plus the CoT / no-CoT baselines, on
    each set of ``datasets`` (default: the test split of the training data)."""

    compression_factors: list[int] = Field(default_factory=lambda: [1, 2, 3, 4, 5])
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], description="Sampling seeds (paper: 5).")
    n_examples: Optional[int] = Field(None, gt=0, description="Evaluate the first N test problems; None = all.")
    cot_baseline: bool = Field(True, description="Evaluate the CoT-SFT model with explicit decoding.")
    nocot_baseline: bool = Field(False, description="Train and evaluate an answer-only model.")
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    datasets: list[EvalSet] = Field(
        default_factory=list, description="Named test sets, each evaluated at every factor and seed (and the "
        "baselines); the first is the primary set, whose metrics are also logged without the set name "
        "(accuracy/c{c}, as runs before named sets). Empty: the test split of `data`, named 'test'.")
    thoughts_questions: int = Field(
        3, ge=0, description="How many questions of the primary set (its first) the evaluate stage shows step by "
        "step in `thoughts.html` (colar_core.latent_inspect: each latent's nearest tokens, LM-head tokens and sigma "
        "at every compression factor, beside the CoT text); 0 = none. One extra generation per factor and model "
        "for these questions, with the first seed.")
    protocol: Literal["colar", "reference", "both"] = Field(
        "colar", description="How the baselines are decoded and #L counted. 'colar': the methods as their papers "
        "describe them (metric names accuracy/icot, mean_tokens/cot, ...). 'reference': as the reference's own "
        "evaluation (xiaomi-research/colar model_base.py): iCoT after the bare question with 16 new tokens, Coconut "
        "and Distill with 6 thoughts each run without the cache (each sees only the thought before it) and 16 "
        "answer tokens, #L of explicit outputs = index('###') - 1, else index(':') - 3, else the output width; "
        "logged as {setting}-reference (accuracy/icot-reference, mean_tokens/cot-reference). 'both': both, "
        "Table 1 then has a reference row per baseline. CoLaR and No-CoT are the same under both (one decoding; "
        "CoT is decoded once and counted both ways); each baseline costs one more decoding per seed.")

    def protocols(self) -> tuple[str, ...]:
        """The protocols to evaluate under: ``('colar',)``, ``('reference',)`` or both."""
        return ("colar", "reference") if self.protocol == "both" else (self.protocol,)

    @field_validator("datasets")
    @classmethod
    def _distinct_names(cls, v):
        names = [s.name for s in v]
        if dupes := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"set names must be distinct; repeated: {dupes}")
        return v

    def sets(self) -> list[EvalSet]:
        """The sets to evaluate, primary first: ``datasets``, or the test split named 'test'."""
        return list(self.datasets) or [EvalSet(name=TEST_SPLIT, source=TEST_SPLIT)]

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
