"""Capacity plan: what each training stage of a pipeline config costs on a named GPU, before anyone books one.

From the model's architecture alone (its Hugging Face ``config.json`` values, never its weights) and a
sample of the training data, every stage (``sft-cot``, ``sft-colar``, ``rl``, ``sft-nocot``, the baselines)
gets: the parameters it trains, the memory per GPU (weights, gradients, optimizer state, activations with
and without gradient checkpointing), its FLOPs, and its hours at a stated MFU. ``colar plan`` prints it.

Where the architecture comes from (:func:`resolve_arch`): the tiny settings for ``tiny``; otherwise a
``config.json`` in a local model folder, in the local Hugging Face cache, or carried by the repository
in ``colar_core/archs/<model name in lower case>.json``. Where the token counts come from
(:func:`load_sample`, :func:`make_counter`): the run's training data (bundled or on disk), tokenized with the
config's tokenizer when it can be had offline; otherwise the text is cut with the tokenizer family's
pre-tokenizer pattern and each piece counted as one token (a lower bound: a rare word BPE splits counts
once), which the plan says.

The formulas (all counts are matmul FLOPs, 2 per multiply-add, as ``torch.utils.flop_counter`` counts them;
norms, activations, softmax and other elementwise work are not counted):

- forward: ``2 P`` per position for the decoder's matrices ``P`` (q, k, v, o, gate, up, down, and the LoRA
  A/B pairs), ``4 A W`` per position and layer for attention over a row of width ``W`` (scores and values,
  the full ``W x W`` as the counter and MFU conventions count it; ``A`` = heads x head dim), the LM head
  ``2 H V`` only at labelled positions (colar computes logits there only) and the latent head at latent
  positions;
- backward: the input gradient of every matmul the gradient passes through (``2 P``: all of them from the
  first trained parameter on) plus the weight gradient of every trained matrix (``2 P_trained``), and
  twice the attention forward. Full fine-tuning is then the familiar ``6 N`` per token; LoRA is
  ``4 N_frozen + 6 N_lora``: the frozen weights cost their forward and the input gradient, not ``2 N``.
- RL: the rollout (prefill, then one decoder step per latent and answer token, LM head at each step),
  one forward for the old log-probs, and ``update_epochs`` forward + backward passes over the trajectories.

Memory per GPU follows what autograd keeps for the backward of a Llama-style layer (checked against
torch's measured peak in ``tests/test_capacity_plan.py``): weights at their dtype, gradients and AdamW
state of the trained parameters (mixed precision: bf16 gradients, fp32 master copy + m + v = 12 bytes,
the ZeRO paper's accounting), ZeRO-1 partitioning the optimizer state, ZeRO-2 the gradients too, ZeRO-3
the weights as well. Pure functions, no torch at import; nothing here loads weights.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Protocol, Sequence, Union

from colar_core.config import ConfigError, EvalConfig, LoraConfig, ModelConfig, TinyBackboneConfig
from colar_core.data.records import Record
from colar_core.text import ANSWER_PREFIX, question_text, speed_text, steps_text

if TYPE_CHECKING:
    from colar_core.rl.config import RLConfig
    from colar_core.training.config import TrainConfig

__all__ = [
    "GPUS",
    "GPUSpec",
    "Arch",
    "Trained",
    "Numerics",
    "ParamCounts",
    "Memory",
    "StagePlan",
    "Plan",
    "arch_from_hf_config",
    "arch_from_tiny",
    "resolve_arch",
    "param_counts",
    "numerics",
    "decoder_flops",
    "activation_bytes",
    "training_memory",
    "build_plan",
    "render_plan",
]

# ---------------------------------------------------------------------------------------------------------
# GPUs


@dataclass(frozen=True)
class GPUSpec:
    """One GPU type: peak dense bf16 tensor-core throughput, memory (as sold, and as the driver reports it)
    and memory bandwidth, with the source."""

    key: str
    name: str
    bf16_tflops: float
    memory_gb: float
    bandwidth_gbs: float
    visible_mib: int
    source: str

    @property
    def memory_bytes(self) -> float:
        """What the driver reports as total memory (nvidia-smi's MiB), the most a process can be given."""
        return self.visible_mib * 2.0**20


#: Peak dense BF16 tensor-core TFLOP/s (NVIDIA's datasheets print twice these "with sparsity"), memory in GB
#: and bandwidth in GB/s from NVIDIA's product datasheets; the total memory nvidia-smi reports on each card
#: (MiB), which the fit check uses.
GPUS: dict[str, GPUSpec] = {
    g.key: g
    for g in (
        GPUSpec(
            "h100",
            "NVIDIA H100 SXM5 80GB",
            989.4,
            80.0,
            3350.0,
            81559,
            "NVIDIA H100 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/h100): BF16 Tensor Core "
            "1,979 TFLOPS with sparsity (989.4 dense), 80 GB HBM3, 3.35 TB/s (SXM5); nvidia-smi total 81,559 MiB",
        ),
        GPUSpec(
            "h200",
            "NVIDIA H200 SXM 141GB",
            989.4,
            141.0,
            4800.0,
            143771,
            "NVIDIA H200 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/h200): BF16 Tensor Core "
            "1,979 TFLOPS with sparsity (989.4 dense), 141 GB HBM3e, 4.8 TB/s (SXM); nvidia-smi total 143,771 MiB",
        ),
        GPUSpec(
            "a100-80gb",
            "NVIDIA A100 SXM4 80GB",
            312.0,
            80.0,
            2039.0,
            81920,
            "NVIDIA A100 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/a100): BF16 Tensor Core "
            "312 TFLOPS (624 with sparsity), 80 GB HBM2e, 2,039 GB/s (SXM4); nvidia-smi total 81,920 MiB",
        ),
        GPUSpec(
            "l40s",
            "NVIDIA L40S 48GB",
            362.05,
            48.0,
            864.0,
            46068,
            "NVIDIA L40S datasheet (nvidia.com/en-us/data-center/l40s): BF16 Tensor Core 362.05 TFLOPS "
            "(733 with sparsity), 48 GB GDDR6, 864 GB/s; nvidia-smi total 46,068 MiB",
        ),
    )
}

#: Share of a GPU's memory (as the driver reports it) the plan lets a stage use: the rest is for the CUDA
#: context, NCCL buffers and the caching allocator's fragmentation.
USABLE_MEMORY = 0.90

# ---------------------------------------------------------------------------------------------------------
# Architecture

#: Hugging Face model types the plan models: Llama-style decoders (RMSNorm, rotary positions, gated MLP,
#: grouped-query attention); qwen2 adds biases on q, k and v.
LLAMA_LIKE = ("llama", "mistral", "qwen2")
#: Architecture files carried by the repository (one HF config.json per model, named by the model's name).
ARCHS_DIR = Path(__file__).resolve().parent / "archs"


@dataclass(frozen=True)
class Arch:
    """The shape of a Llama-style decoder, as its config.json gives it."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool
    head_dim: int
    max_positions: int
    qkv_bias: bool = False
    source: str = ""

    @property
    def attn_width(self) -> int:
        """Width of the queries and of the attention output (heads x head dim)."""
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each matrix of one layer, by the module names LoRA targets use."""
        h, a, k, i = self.hidden, self.attn_width, self.kv_width, self.intermediate
        return {
            "q_proj": (h, a),
            "k_proj": (h, k),
            "v_proj": (h, k),
            "o_proj": (a, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }


def arch_from_hf_config(conf: dict, source: str) -> Arch:
    """The :class:`Arch` of a Hugging Face ``config.json`` (a Llama-style model; ConfigError otherwise)."""
    kind = conf.get("model_type")
    if kind not in LLAMA_LIKE:
        raise ConfigError(
            f"model.name_or_path: {source} has model_type {kind!r}; the capacity plan models "
            f"Llama-style decoders only ({', '.join(LLAMA_LIKE)})"
        )
    try:
        hidden, heads = int(conf["hidden_size"]), int(conf["num_attention_heads"])
        return Arch(
            hidden=hidden,
            layers=int(conf["num_hidden_layers"]),
            heads=heads,
            kv_heads=int(conf.get("num_key_value_heads") or heads),
            intermediate=int(conf["intermediate_size"]),
            vocab=int(conf["vocab_size"]),
            tied=bool(conf.get("tie_word_embeddings", False)),
            head_dim=int(conf.get("head_dim") or hidden // heads),
            max_positions=int(conf.get("max_position_embeddings", 0)),
            qkv_bias=bool(conf.get("attention_bias", kind == "qwen2")),
            source=source,
        )
    except (KeyError, TypeError, ValueError) as err:
        raise ConfigError(f"model.name_or_path: {source} lacks a usable architecture field ({err!r})") from None


def arch_from_tiny(tiny: TinyBackboneConfig, vocab: int) -> Arch:
    """The :class:`Arch` that ``colar_core.model.build_tiny_backbone`` builds from ``model.tiny``."""
    if tiny.arch == "gpt2":
        raise ConfigError(
            "model.tiny.arch: gpt2 is not modelled by the capacity plan (Llama-style decoders only: llama, qwen2)"
        )
    return Arch(
        hidden=tiny.hidden_size,
        layers=tiny.num_layers,
        heads=tiny.num_heads,
        kv_heads=tiny.num_kv_heads or tiny.num_heads,
        intermediate=tiny.intermediate_size or 4 * tiny.hidden_size,
        vocab=vocab,
        tied=tiny.tie_word_embeddings,
        head_dim=tiny.hidden_size // tiny.num_heads,
        max_positions=tiny.max_position_embeddings,
        qkv_bias=tiny.arch == "qwen2",
        source="model.tiny (built from scratch)",
    )


def _model_stem(name_or_path: str) -> str:
    """The file name an architecture is carried under: the model's last path part, lower case, without
    a GGUF suffix and its quantisation (``SmolLM2-135M-Instruct.Q4_1.gguf`` -> ``smollm2-135m-instruct``)."""
    name = name_or_path.rstrip("/").split("/")[-1]
    if name.lower().endswith(".gguf"):
        name = name[: -len(".gguf")].split(".")[0]
    return name.lower()


def _config_json_of(name_or_path: str) -> tuple[Optional[Path], Optional[Path]]:
    """``(config.json, folder holding the tokenizer)`` found offline for a model name, or Nones."""
    from colar_core.hub import hub_cache, looks_like_path

    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return (path / "config.json" if (path / "config.json").is_file() else None), path
    if path.is_file() and path.suffix.lower() == ".json":  # an architecture file (colar_core.model.build_arch_backbone)
        return path, None
    if path.is_file() and path.suffix.lower() == ".gguf":
        from colar_core.gguf_import import converted_dir

        folder = converted_dir(path)
        if (folder / "config.json").is_file():
            return folder / "config.json", folder
        return None, None
    if looks_like_path(name_or_path) or name_or_path.lower().endswith(".gguf"):
        return None, None
    try:
        from huggingface_hub import constants
        from huggingface_hub.file_download import repo_folder_name
    except ImportError:  # pragma: no cover - comes with transformers
        return None, None
    revision = hub_cache(name_or_path, "model").revision
    if revision is None:
        return None, None
    snap = (
        Path(constants.HF_HUB_CACHE)
        / repo_folder_name(repo_id=name_or_path, repo_type="model")
        / "snapshots"
        / revision
    )
    return (snap / "config.json" if (snap / "config.json").is_file() else None), snap


def resolve_arch(model: ModelConfig, vocab: Optional[int] = None) -> Arch:
    """The backbone's architecture, read offline: ``model.tiny`` (with ``vocab``, the built-in tokenizer's
    size) for 'tiny'; else the ``config.json`` of a local folder, of a converted GGUF, of the Hugging Face
    cache, or carried in :data:`ARCHS_DIR`. ConfigError naming ``model.name_or_path`` when none is found."""
    name = model.name_or_path
    if name == "tiny":
        if vocab is None:
            raise ValueError("a tiny model's vocabulary comes from its tokenizer: pass vocab")
        return arch_from_tiny(model.tiny, vocab)
    found, _ = _config_json_of(name)
    carried = ARCHS_DIR / f"{_model_stem(name)}.json"
    path = found or (carried if carried.is_file() else None)
    if path is None:
        raise ConfigError(
            f"model.name_or_path: no architecture for {name!r} offline (no config.json in a local "
            f"folder or the Hugging Face cache, and no {carried.relative_to(ARCHS_DIR.parent.parent)}); "
            "add that file with the model's config.json values"
        )
    try:
        conf = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ConfigError(f"model.name_or_path: cannot read the architecture file {path} ({err})") from None
    root = ARCHS_DIR.parent.parent
    shown = path.relative_to(root) if path.is_relative_to(root) else path
    arch = arch_from_hf_config(conf, str(shown))
    return replace(arch, vocab=max(arch.vocab, vocab or 0))


# ---------------------------------------------------------------------------------------------------------
# What is trained, and the parameters


@dataclass(frozen=True)
class Trained:
    """Which parameters a stage trains: the whole backbone, or LoRA adapters (and ``modules_to_save``);
    the latent head always (it is in the optimizer of every stage)."""

    full: bool
    lora_r: int = 0
    lora_targets: frozenset[str] = frozenset()
    embeddings: bool = False  # the input embedding table (full fine-tuning, or in modules_to_save)
    lm_head: bool = False  # the output projection (tied: the same table)

    @classmethod
    def of(cls, model: ModelConfig, arch: Arch) -> Trained:
        lora = model.lora
        if lora is None:
            return cls(full=True, embeddings=True, lm_head=True)
        return cls.lora_of(lora, arch)

    @classmethod
    def lora_of(cls, lora: LoraConfig, arch: Arch) -> Trained:
        known = set(arch.linears())
        bad = sorted(set(lora.target_modules) - known)
        if bad:
            raise ConfigError(
                f"model.lora.target_modules: {bad} are not modelled by the capacity plan (one of {sorted(known)})"
            )
        saved = set(lora.modules_to_save)
        if bad := sorted(saved - {"embed_tokens", "lm_head"}):
            raise ConfigError(f"model.lora.modules_to_save: {bad} are not modelled (embed_tokens, lm_head)")
        embed = "embed_tokens" in saved
        return cls(
            full=False,
            lora_r=lora.r,
            lora_targets=frozenset(lora.target_modules),
            embeddings=embed,
            lm_head="lm_head" in saved or (embed and arch.tied),
        )

    def label(self) -> str:
        if self.full:
            return "full"
        extra = [m for m, on in (("embed_tokens", self.embeddings), ("lm_head", self.lm_head)) if on]
        return f"LoRA r={self.lora_r} on {','.join(sorted(self.lora_targets))}" + (
            f" + {','.join(extra)}" if extra else ""
        )


@dataclass(frozen=True)
class ParamCounts:
    """Parameters of the CoLaR model: ``total`` held (backbone, adapters, copies, latent head, merge), and the
    ``trained`` ones the optimizer updates."""

    backbone: int
    embedding: int
    per_layer: int
    lora: int
    saved_copies: int
    latent_head: int
    merge: int
    total: int
    trained: int


def latent_head_params(hidden: int, inter: int) -> int:
    """Linear(H, I), Linear(I, I), LayerNorm(I), Linear(I, H) for the mean and for the log-std."""
    return (hidden * inter + inter) + (inter * inter + inter) + 2 * inter + 2 * (inter * hidden + hidden)


def param_counts(
    arch: Arch, trained: Trained, latent_inter: Optional[int] = None, pooling: str = "sqrt"
) -> ParamCounts:
    h, v = arch.hidden, arch.vocab
    linears = arch.linears()
    per_layer = sum(i * o for i, o in linears.values()) + 2 * h
    if arch.qkv_bias:
        per_layer += arch.attn_width + 2 * arch.kv_width
    embedding = v * h
    backbone = embedding * (1 if arch.tied else 2) + arch.layers * per_layer + h
    lora = arch.layers * sum(trained.lora_r * sum(linears[m]) for m in trained.lora_targets)
    copies = embedding * (int(trained.embeddings) + int(trained.lm_head and not arch.tied)) if not trained.full else 0
    head = latent_head_params(h, latent_inter or h)
    merge = 15 * h if pooling == "gain" else 0  # merging.MAX_SLOTS - 1 per-dimension gains
    total = backbone + lora + copies + head + merge
    trained_n = (backbone if trained.full else lora + copies) + head + merge
    return ParamCounts(backbone, embedding, per_layer, lora, copies, head, merge, total, trained_n)


# ---------------------------------------------------------------------------------------------------------
# Numerics: bytes per parameter and per activation


@dataclass(frozen=True)
class Numerics:
    """Bytes a stage spends per weight, per gradient, per trained parameter in the optimizer, per activation
    element; the LoRA adapters' dtype; the ZeRO stage."""

    weight: int
    grad: int
    optim: int
    act: int
    adapter: int
    zero_stage: int
    label: str


def numerics(
    model_dtype: str, precision: str, backend: str, zero_stage: Optional[int], deepspeed_config: Optional[str] = None
) -> Numerics:
    """How a stage holds its numbers (colar_core.training.engines):

    - DeepSpeed bf16 casts the model to bf16 (adapters included): 2-byte weights, gradients and activations;
      its optimizer keeps an fp32 master copy with AdamW's m and v (12 bytes per trained parameter);
    - fp32 (DeepSpeed or torch): weights and gradients at the model's dtype, AdamW m and v at it too;
    - torch with bf16 autocast: weights and optimizer as fp32 training, matmul outputs in bf16 (activations
      counted at 2 bytes: approximate, autocast keeps some in fp32); peft keeps adapters of a bf16 base in fp32.
    The torch backend is one process (no ZeRO); DeepSpeed's stage is ``zero_stage``, else the config file's, else 2.
    """
    dtype_bytes = 2 if model_dtype == "bfloat16" else 4
    if backend == "deepspeed":
        stage = zero_stage
        if stage is None and deepspeed_config:
            try:
                stage = json.loads(Path(deepspeed_config).read_text()).get("zero_optimization", {}).get("stage")
            except (OSError, ValueError) as err:
                raise ConfigError(f"deepspeed_config: cannot read {deepspeed_config} ({err})") from None
        stage = 2 if stage is None else int(stage)
        if precision == "bf16":
            return Numerics(2, 2, 12, 2, 2, stage, f"DeepSpeed ZeRO-{stage} bf16 (fp32 master + AdamW m, v)")
        return Numerics(
            dtype_bytes,
            dtype_bytes,
            2 * dtype_bytes,
            dtype_bytes,
            dtype_bytes,
            stage,
            f"DeepSpeed ZeRO-{stage} {model_dtype}",
        )
    adapter = 4  # peft keeps adapters in fp32 (autocast_adapter_dtype) under a bf16 base
    if precision == "bf16":
        return Numerics(
            dtype_bytes, dtype_bytes, 2 * dtype_bytes, 2, adapter, 0, f"torch bf16 autocast, {model_dtype} weights"
        )
    return Numerics(dtype_bytes, dtype_bytes, 2 * dtype_bytes, dtype_bytes, adapter, 0, f"torch {model_dtype}")


# ---------------------------------------------------------------------------------------------------------
# One decoder pass: FLOPs and saved activations, walked module by module


@dataclass
class _Walk:
    fwd: float = 0.0  # matmul FLOPs per position (forward)
    bwd: float = 0.0  # per position (backward)
    attn_fwd: float = 0.0  # coefficient of sum over rows of W^2 (forward)
    attn_bwd: float = 0.0
    saved: float = 0.0  # bytes kept for the backward, per position


def _linear(walk: _Walk, arch: Arch, t: Trained, nm: Numerics, name: str, in_req: bool) -> bool:
    """Add one matrix (and its LoRA pair) to ``walk``; returns whether its output requires grad."""
    d_in, d_out = arch.linears()[name]
    full, lora = t.full, name in t.lora_targets
    walk.fwd += 2 * d_in * d_out
    walk.bwd += 2 * d_in * d_out * (int(in_req) + int(full))
    if lora:
        r = t.lora_r
        walk.fwd += 2 * r * (d_in + d_out)
        walk.bwd += 2 * r * d_in * (1 + int(in_req)) + 4 * r * d_out  # A: weight (+ input); B: weight + input
        walk.saved += nm.adapter * r  # A's output, kept for B's weight gradient
        if nm.adapter != nm.act:  # peft casts the input to the adapters' dtype: a copy per adapted module
            walk.saved += nm.adapter * d_in
    return in_req or full or lora


def _input_kept(t: Trained, nm: Numerics, consumers: Sequence[str]) -> bool:
    """A matmul input is kept (once) when a consumer trains its weight in full, or a LoRA consumer reads it
    in the activations' own dtype (else each adapter keeps its own cast copy, counted in :func:`_linear`)."""
    return t.full or (nm.adapter == nm.act and any(m in t.lora_targets for m in consumers))


def _layer(arch: Arch, t: Trained, nm: Numerics, g_in: bool) -> tuple[_Walk, bool]:
    """One decoder layer whose input requires grad (``g_in``) or not; returns its walk and whether its
    output requires grad."""
    w, h, b = _Walk(), arch.hidden, nm.act
    a, k, i = arch.attn_width, arch.kv_width, arch.intermediate
    # input RMSNorm: keeps its input upcast to fp32 and 1/rms; the normalised input when its weight trains
    w.saved += (4 * h + 4) * int(g_in) + b * h * int(t.full)
    n1 = g_in or t.full
    w.saved += b * h * int(_input_kept(t, nm, ("q_proj", "k_proj", "v_proj")))
    q, kk, v = (_linear(w, arch, t, nm, m, n1) for m in ("q_proj", "k_proj", "v_proj"))
    attn_req = q or kk or v
    w.attn_fwd += 4 * a
    w.attn_bwd += 2 * a * (int(q or kk) + int(v) + int(q) + int(kk))  # dP, dV, dQ, dK
    if attn_req:  # SDPA keeps q, k, v, its output (o_proj's input) and the log-sum-exp per head
        w.saved += b * (2 * a + 2 * k) + 4 * arch.heads
    o = _linear(w, arch, t, nm, "o_proj", attn_req)
    mid = g_in or o
    w.saved += (4 * h + 4) * int(mid) + b * h * int(t.full)  # post-attention RMSNorm
    n2 = mid or t.full
    w.saved += b * h * int(_input_kept(t, nm, ("gate_proj", "up_proj")))
    gate, up = _linear(w, arch, t, nm, "gate_proj", n2), _linear(w, arch, t, nm, "up_proj", n2)
    act = gate or up
    if act:  # SiLU keeps its input; the product keeps both factors
        w.saved += 3 * b * i
    w.saved += b * i * int(_input_kept(t, nm, ("down_proj",)))
    down = _linear(w, arch, t, nm, "down_proj", act)
    return w, mid or down


@dataclass(frozen=True)
class PassShape:
    """The work of one batch through the model: ``positions`` decoder positions (rows x padded width),
    ``attn`` = sum over rows of width^2, ``labels`` positions with a next-token label (LM head),
    ``latents`` positions the latent head reads."""

    positions: float
    attn: float
    labels: float
    latents: float = 0.0


def _decoder(arch: Arch, t: Trained, nm: Numerics) -> tuple[_Walk, bool]:
    """All layers (the first may differ: its input needs no gradient when the embeddings are frozen) and the
    final norm; returns the summed walk and whether the final hidden states require grad."""
    first, g = _layer(arch, t, nm, t.embeddings)
    total = _Walk(**asdict(first))
    if arch.layers > 1:
        rest, g2 = _layer(arch, t, nm, g)
        for key in ("fwd", "bwd", "attn_fwd", "attn_bwd", "saved"):
            setattr(total, key, getattr(total, key) + (arch.layers - 1) * getattr(rest, key))
        g = g2
    total.saved += (4 * arch.hidden + 4) * int(g) + nm.act * arch.hidden * int(t.full)  # final norm
    total.saved += 2 * nm.act * arch.head_dim  # the rotary cos / sin of the pass
    return total, g


def decoder_flops(
    arch: Arch, t: Trained, nm: Numerics, shape: PassShape, latent_inter: int, backward: bool = True
) -> float:
    """Matmul FLOPs of one pass (forward, plus backward when ``backward``) over ``shape``."""
    walk, g = _decoder(arch, t, nm)
    h, v = arch.hidden, arch.vocab
    flops = (walk.fwd + walk.bwd * backward) * shape.positions + (walk.attn_fwd + walk.attn_bwd * backward) * shape.attn
    flops += 2 * h * v * shape.labels * (1 + backward * (int(g) + int(t.lm_head)))
    lh = h * latent_inter + latent_inter * latent_inter + 2 * latent_inter * h  # latent head matrices
    flops += 2 * lh * shape.latents * (1 + backward * (1 + int(g)))
    return flops


def activation_bytes(
    arch: Arch, t: Trained, nm: Numerics, shape: PassShape, latent_inter: int, checkpointing: bool = False
) -> float:
    """Peak memory of one micro-batch's forward and backward above the weights, gradients and optimizer
    state: what the forward keeps for the backward, plus the cross-entropy's gradients and the LM head's
    weight gradient (made before it is added to the stored one) at the start of the backward; or, when the
    embeddings train, the end of the backward: their dense gradient (tied: also the LM head's, held until
    then, and the sum of the two). With ``checkpointing`` (each decoder layer recomputed in the backward)
    only every layer's input is kept, and one layer's activations at a time."""
    walk, g = _decoder(arch, t, nm)
    v, h = arch.vocab, arch.hidden
    head = shape.labels * (nm.act * h * int(t.lm_head) + 4 * v)  # LM-head input; fp32 log-softmax kept by the CE
    ce_grads = shape.labels * v * (8 + (2 if nm.act == 2 else 0))  # two fp32 [labels, V] gradients (+ the bf16 cast)
    head_grad = v * h * nm.grad * int(t.lm_head)
    latent = shape.latents * (nm.act * (h + 4 * latent_inter) + 24 * h)  # head trunk, and the loss's fp32 terms
    end = v * h * nm.grad * (3 if arch.tied else 1) * int(t.embeddings)
    if not checkpointing:
        return max(walk.saved * shape.positions + head + ce_grads + head_grad + latent, end)
    # every layer's input, the final norm; then either the head's backward or one recomputed layer at a time
    # with its backward's gradient buffers (two of the MLP's width, two of the hidden size); in fp32 the
    # recomputed layer's first norm keeps the stored input itself, not a copy
    one, _ = _layer(arch, t, nm, True)
    kept = (arch.layers * nm.act * h + (4 * h + 4) * int(g) + nm.act * h * int(t.full)) * shape.positions
    layer = (one.saved - (4 * h if nm.act == 4 else 0) + 2 * nm.act * (arch.intermediate + h)) * shape.positions
    return max(kept + max(head + ce_grads + head_grad, layer + head_grad) + latent, end)


@dataclass(frozen=True)
class Memory:
    """Bytes per GPU of one training stage."""

    weights: float
    grads: float
    optim: float
    activations: float
    activations_ckpt: float

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optim + self.activations

    @property
    def total_ckpt(self) -> float:
        return self.weights + self.grads + self.optim + self.activations_ckpt


def training_memory(
    arch: Arch, t: Trained, nm: Numerics, counts: ParamCounts, shape: PassShape, latent_inter: int, n_gpus: int = 1
) -> Memory:
    """Weights, gradients, optimizer state (partitioned by the ZeRO stage over ``n_gpus``) and the
    activations of one micro-batch of ``shape``."""
    zero = nm.zero_stage
    weights = float(counts.total * nm.weight)
    if zero >= 3 and n_gpus > 1:  # partitioned, one layer gathered at a time
        weights = weights / n_gpus + counts.per_layer * nm.weight
    grads = counts.trained * nm.grad / (n_gpus if zero >= 2 else 1)
    optim = counts.trained * nm.optim / (n_gpus if zero >= 1 else 1)
    return Memory(
        weights,
        grads,
        optim,
        activation_bytes(arch, t, nm, shape, latent_inter),
        activation_bytes(arch, t, nm, shape, latent_inter, checkpointing=True),
    )


# ---------------------------------------------------------------------------------------------------------
# Token counts of the training data

#: Pre-tokenizer patterns: Llama 3's (numbers in groups of up to 3 digits) and the GPT-2 one with single
#: digits (SmolLM2, Qwen2, Mistral split numbers into digits).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
DIGITS_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
#: Records tokenized for the lengths (a seeded sample when the data has more).
SAMPLE_SIZE = 4000


class TokenCounter(Protocol):
    """Token counts of the pieces of colar's training text (colar_core.text)."""

    how: str

    def question(self, question: str) -> int: ...  # start tokens + "Question: ... step by step:"
    def speed(self, r: Union[int, str]) -> int: ...
    def steps(self, steps: Sequence[str]) -> int: ...
    def answer(self, answer: str) -> int: ...  # closing '###' + "Answer:{a}" + EOS


class _ExactCounter:
    """Counts with the run's own tokenizer, through the encoder training uses."""

    def __init__(self, tokenizer, how: str):
        from colar_core.text import PromptEncoder

        self.enc, self.how = PromptEncoder(tokenizer), how

    def question(self, question: str) -> int:
        return len(self.enc.encode_question(question))

    def speed(self, r: Union[int, str]) -> int:
        return len(self.enc.speed_ids(r))

    def steps(self, steps: Sequence[str]) -> int:
        return len(self.enc._encode(steps_text(steps))) if steps else 0

    def answer(self, answer: str) -> int:
        return 2 + len(self.enc._encode(f"{ANSWER_PREFIX}{answer}"))


class _PieceCounter:
    """Counts pre-tokenizer pieces (``###`` is one added token), one token each: a lower bound of BPE."""

    def __init__(self, pattern: str, start_tokens: int, how: str):
        from tokenizers import Regex, pre_tokenizers

        self._split = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
        self.start, self.how = start_tokens, how

    def _count(self, text: str) -> int:
        parts = text.split("###")
        return len(parts) - 1 + sum(len(self._split.pre_tokenize_str(p)) for p in parts if p)

    def question(self, question: str) -> int:
        return self.start + self._count(question_text(question))

    def speed(self, r: Union[int, str]) -> int:
        return self._count(speed_text(r))

    def steps(self, steps: Sequence[str]) -> int:
        return self._count(steps_text(steps)) if steps else 0

    def answer(self, answer: str) -> int:
        return 2 + self._count(f"{ANSWER_PREFIX}{answer}")


def make_counter(model: ModelConfig, records: Sequence[Record]) -> tuple[TokenCounter, Optional[int]]:
    """The token counter of ``model`` and its vocabulary size when a tokenizer was loaded: the built-in
    word-level tokenizer built from ``records`` for 'tiny'; the config's tokenizer when it is on disk or in the
    Hugging Face cache; else an estimate from the pre-tokenizer pattern of its family (Llama 3: numbers in
    groups of 3 and a begin-of-text token; others: single digits, no start token)."""
    name = model.tokenizer or model.name_or_path
    if model.tokenizer is None and model.name_or_path == "tiny":
        from colar_core.tokenizer import build_tokenizer

        tok = build_tokenizer(list(records), numbers=model.number_tokens)
        return _ExactCounter(tok, f"the built-in word-level tokenizer built from {len(records):,} records"), len(tok)
    _, folder = _config_json_of(name)
    if folder is not None and ((folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file()):
        from colar_core.number_tokens import add_number_tokens
        from colar_core.tokenizer import load_tokenizer

        tok = load_tokenizer(str(folder), trust_remote_code=model.trust_remote_code)
        if model.add_number_tokens:
            add_number_tokens(tok, model.add_number_tokens)
        return _ExactCounter(tok, f"the tokenizer of {name} ({folder})"), len(tok)
    if "llama-3" in name.lower() or "llama3" in name.lower():
        return _PieceCounter(
            LLAMA3_PATTERN,
            1,
            f"ESTIMATED: {name}'s tokenizer is not available offline; Llama 3's "
            "pre-tokenizer pieces counted as one token each (a lower bound) + <|begin_of_text|>",
        ), None
    return _PieceCounter(
        DIGITS_PATTERN,
        0,
        f"ESTIMATED: {name}'s tokenizer is not available offline; GPT-2-style "
        "pre-tokenizer pieces with single digits counted as one token each (a lower bound)",
    ), None


class _DataLike(Protocol):
    @property
    def source(self) -> str: ...
    @property
    def format(self) -> str: ...
    @property
    def policy(self) -> str: ...
    @property
    def val_fraction(self) -> float: ...
    @property
    def test_fraction(self) -> float: ...
    @property
    def seed(self) -> int: ...
    @property
    def builtin(self) -> Any: ...


@dataclass(frozen=True)
class DataSample:
    """Training records whose lengths stand for the run's, how many the run trains on (None: unknown),
    its validation split's size, and where they come from."""

    records: list[Record]
    n_train: Optional[int]
    n_val: Optional[int]
    description: str
    tokenizer_records: list[Record] = field(default_factory=list)  # what a built-in tokenizer is built from


PROXY_SET = "gsm8k-aug-valid"


def load_sample(data: _DataLike, seed: int = 0) -> DataSample:
    """The training records of ``data`` (the built-in problems, a bundled set, a file or a folder of split
    files). A source that cannot be read offline (a hub id, a missing file) is stood for by the bundled
    GSM8k-Aug validation file (same line format and problem style as GSM8k-Aug's train file), which the
    description says."""
    from colar_core.data.bundled import BUNDLED, resolve_bundled
    from colar_core.data.readers import read_records

    if data.source == "builtin":
        from colar_core.data.synthetic import builtin_splits

        b = data.builtin
        splits = builtin_splits(b.n_train, b.n_val, b.n_test, seed=b.seed, difficulty=b.difficulty)
        return DataSample(
            _sampled(splits["train"], seed),
            b.n_train,
            b.n_val,
            f"the built-in problems ({b.n_train:,} train, difficulty {b.difficulty})",
            splits["train"] + splits["val"],
        )
    bundled = resolve_bundled(data.source)
    path = Path(bundled[0] if bundled else data.source).expanduser()
    if path.is_dir():
        trains = sorted(p for p in path.iterdir() if p.is_file() and p.name.split(".", 1)[0].lower() == "train")
        path = trains[0] if trains else path
        carve = 1.0
    else:
        carve = 1.0 - data.val_fraction - data.test_fraction
    if path.is_file():
        records = read_records(str(path), data.format if not bundled else bundled[1], data.policy).records
        n_train = round(len(records) * carve)
        return DataSample(
            _sampled(records, seed),
            n_train,
            round(len(records) * data.val_fraction) or None,
            f"{data.source} ({n_train:,} of {len(records):,} records train)",
            records,
        )
    proxy = read_records(str(BUNDLED[PROXY_SET].path), BUNDLED[PROXY_SET].format).records
    return DataSample(
        _sampled(proxy, seed),
        None,
        None,
        f"PROXY: data.source {data.source!r} cannot be read here; lengths from the bundled "
        f"{PROXY_SET} ({len(proxy)} GSM8k-Aug problems, the train file's format)",
        proxy,
    )


def _sampled(records: Sequence[Record], seed: int) -> list[Record]:
    if len(records) <= SAMPLE_SIZE:
        return list(records)
    return random.Random(seed).sample(list(records), SAMPLE_SIZE)


@dataclass(frozen=True)
class Lengths:
    """Token counts of each sampled record: question (with start tokens), steps, answer block; and the
    speed suffix by factor."""

    question: tuple[int, ...]
    steps: tuple[int, ...]
    answer: tuple[int, ...]
    speed: dict[str, int]
    step_suffixes: tuple[tuple[int, ...], ...]  # tokens of steps[k:], k = 0..n_steps (the curricula)

    @classmethod
    def of(
        cls, records: Sequence[Record], counter: TokenCounter, factors: Sequence[int], suffixes: bool = False
    ) -> Lengths:
        speed = {str(r): counter.speed(r) for r in sorted({1, *factors})}
        suff = (
            tuple(tuple(counter.steps(rec.steps[k:]) for k in range(len(rec.steps) + 1)) for rec in records)
            if suffixes
            else ()
        )
        return cls(
            tuple(counter.question(r.question) for r in records),
            tuple(counter.steps(r.steps) for r in records),
            tuple(counter.answer(r.answer) for r in records),
            speed,
            suff,
        )

    def rows(
        self, mode: str, r: int, opening_label: bool = True, closing_latent: bool = True
    ) -> list[tuple[int, int, int]]:
        """``(positions, labels, latents)`` per record of an SFT batch at factor ``r`` (colar_core.collate):
        prompt + speed + the '###' group + ceil(steps / r) step groups + answer block."""
        out = []
        speed = self.speed[str(r)]
        for q, s, a in zip(self.question, self.steps, self.answer):
            g = 0 if mode == "nocot" else math.ceil(s / r)
            pos = q + speed + 1 + g + a
            labels = g + a + int(opening_label)
            latents = (g + int(closing_latent)) if mode == "colar" else 0
            out.append((pos, labels, latents))
        return out


@dataclass(frozen=True)
class BatchStats:
    """Per example of a stage: real positions, executed (padded) positions, sum of width^2 per row, labels and
    latents on average; and the worst micro-batch's shape (the memory peak)."""

    real: float
    executed: float
    attn: float
    labels: float
    latents: float
    worst: PassShape

    @property
    def padding(self) -> float:
        return self.executed / self.real if self.real else 1.0

    def per_example(self) -> PassShape:
        return PassShape(self.executed, self.attn, self.labels, self.latents)


def batch_stats(rows: Sequence[tuple[int, int, int]], micro: int, grouping: int = 0, seed: int = 0) -> BatchStats:
    """Micro-batches of ``micro`` rows in a seeded shuffled order (``grouping`` k > 0: pools of k micro-batches
    sorted by length first, as the sampler's length grouping), each padded to its longest row."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    if grouping > 0:
        pool = grouping * micro
        order = [i for s in range(0, len(order), pool) for i in sorted(order[s : s + pool], key=lambda j: rows[j][0])]
    executed = attn = 0.0
    for s in range(0, len(order), micro):
        chunk = [rows[i][0] for i in order[s : s + micro]]
        width = max(chunk)
        executed += len(chunk) * width
        attn += len(chunk) * width * width
    n = max(len(rows), 1)
    worst_pos = max(r[0] for r in rows)
    worst = PassShape(
        micro * worst_pos, micro * worst_pos**2, micro * max(r[1] for r in rows), micro * max(r[2] for r in rows)
    )
    return BatchStats(
        sum(r[0] for r in rows) / n,
        executed / n,
        attn / n,
        sum(r[1] for r in rows) / n,
        sum(r[2] for r in rows) / n,
        worst,
    )


def _mean_stats(stats: Sequence[BatchStats]) -> BatchStats:
    """The average over factors drawn uniformly (one per step), worst case over them."""
    n = len(stats)
    worst = max((s.worst for s in stats), key=lambda w: w.positions * 1e6 + w.labels)
    mean = {k: sum(getattr(s, k) for s in stats) / n for k in ("real", "executed", "attn", "labels", "latents")}
    return BatchStats(mean["real"], mean["executed"], mean["attn"], mean["labels"], mean["latents"], worst)


# ---------------------------------------------------------------------------------------------------------
# Generation (validation, rollouts, evaluation): forward FLOPs, and the weight-streaming floor of decoding


def generation_flops(
    arch: Arch, counts: ParamCounts, latent_inter: int, prompt: float, generated: float, latents: float
) -> float:
    """Forward FLOPs of generating ``generated`` tokens/latents after a ``prompt`` (one row): the prefill, then
    per step the decoder, the LM head (the stop check or the next token) and, for latents, the latent head;
    attention over the growing context."""
    body = 2 * (counts.per_layer - 2 * arch.hidden) * arch.layers  # matmul weights of the layers
    attn = 4 * arch.attn_width * arch.layers
    lh = 2 * (arch.hidden * latent_inter + latent_inter**2 + 2 * latent_inter * arch.hidden)
    prefill = body * prompt + attn * prompt * prompt
    steps = generated * (body + 2 * arch.hidden * arch.vocab + attn * (prompt + generated / 2)) + latents * lh
    return prefill + steps


# ---------------------------------------------------------------------------------------------------------
# Stages


@dataclass
class StagePlan:
    """One stage of the plan. ``flops`` is what the stage executes (padding included); ``hours`` the wall
    time on ``n_gpus`` at the plan's MFU (decoding at least the weight-streaming time)."""

    name: str
    trained: str
    trained_params: int
    examples: int
    epochs: Optional[float]
    tokens_per_example: float
    padding: float
    micro_batch: int
    flops: float
    flops_parts: dict[str, float]
    hours: float
    gpu_hours: float
    memory: Memory
    numerics: str
    fits: bool
    fits_ckpt: bool
    notes: list[str] = field(default_factory=list)
    needed: float = 0.0  # bytes per GPU compared with the usable memory (the larger of update and rollout for RL)

    def __post_init__(self) -> None:
        self.needed = max(self.needed, self.memory.total)


@dataclass
class Plan:
    config: str
    gpu: GPUSpec
    n_gpus: int
    mfu: float
    model: str
    arch: Arch
    params_total: int
    tokens: str
    data: str
    stages: list[StagePlan]
    assumptions: list[str]

    @property
    def hours(self) -> float:
        return sum(s.hours for s in self.stages)

    @property
    def gpu_hours(self) -> float:
        return sum(s.gpu_hours for s in self.stages)

    def warnings(self) -> list[str]:
        usable = self.gpu.memory_bytes * USABLE_MEMORY / 2**30
        out = []
        for s in self.stages:
            if not s.fits:
                hint = (
                    "fits with gradient checkpointing (not enabled by the pipeline today)"
                    if s.fits_ckpt
                    else "does not fit even with gradient checkpointing: cut the micro-batch, use LoRA, a "
                    "higher ZeRO stage over more GPUs, or a larger GPU"
                )
                out.append(
                    f"WARNING: {s.name} needs {s.needed / 2**30:.1f} GiB per GPU, more than "
                    f"{usable:.1f} GiB usable on a {self.gpu.name} ({USABLE_MEMORY:.0%}); {hint}"
                )
        return out

    def as_dict(self) -> dict:
        def mem(m: Memory) -> dict:
            return {
                **{k: v / 2**30 for k, v in asdict(m).items()},
                "total": m.total / 2**30,
                "total_ckpt": m.total_ckpt / 2**30,
            }

        return {
            "config": self.config,
            "gpu": asdict(self.gpu),
            "n_gpus": self.n_gpus,
            "mfu": self.mfu,
            "model": self.model,
            "arch": asdict(self.arch),
            "params_total": self.params_total,
            "tokens": self.tokens,
            "data": self.data,
            "stages": [
                {**{k: v for k, v in asdict(s).items() if k != "memory"}, "memory_gib": mem(s.memory)}
                for s in self.stages
            ],
            "hours": self.hours,
            "gpu_hours": self.gpu_hours,
            "warnings": self.warnings(),
            "assumptions": self.assumptions,
        }


class _PipelineLike(Protocol):
    """What the plan reads of a pipeline config (flows.config.PipelineConfig)."""

    @property
    def data(self) -> Any: ...
    @property
    def model(self) -> ModelConfig: ...
    @property
    def sft_cot(self) -> Optional[TrainConfig]: ...
    @property
    def sft_colar(self) -> TrainConfig: ...
    @property
    def rl(self) -> Optional[RLConfig]: ...
    @property
    def baselines(self) -> Any: ...
    @property
    def eval(self) -> EvalConfig: ...


@dataclass
class _Ctx:
    arch: Arch
    model: ModelConfig
    gpu: GPUSpec
    n_gpus: int
    mfu: float
    lengths: Lengths
    counter: TokenCounter
    sample: DataSample
    latent_inter: int

    def trained(self) -> Trained:
        return Trained.of(self.model, self.arch)

    def counts(self) -> ParamCounts:
        return param_counts(self.arch, self.trained(), self.latent_inter, self.model.pooling)

    def compute_hours(self, flops: float) -> float:
        return flops / (self.n_gpus * self.gpu.bf16_tflops * 1e12 * self.mfu) / 3600


def _split_batch(global_examples: int, micro: int, n_gpus: int) -> tuple[int, float]:
    """The micro-batch per GPU and the accumulation that keep the recipe's global batch on ``n_gpus``."""
    per_gpu = global_examples / n_gpus
    micro = max(1, min(micro, int(per_gpu)))
    return micro, per_gpu / micro


def _decode_hours(ctx: _Ctx, counts: ParamCounts, flops: float, steps: float, weight_bytes: int) -> float:
    """Decoding time: compute at the MFU, but at least one read of the weights per decoding step."""
    stream = steps * counts.total * weight_bytes / (ctx.gpu.bandwidth_gbs * 1e9) / ctx.n_gpus
    return max(ctx.compute_hours(flops), stream / 3600)


def _validation(
    ctx: _Ctx, counts: ParamCounts, tc: TrainConfig, mode: str, n_val: Optional[int], weight_bytes: int
) -> tuple[float, float, str]:
    """FLOPs and hours of a stage's validation (decoding ``eval_size`` questions every ``eval_every`` steps)."""
    if not tc.eval_every:
        return 0.0, 0.0, ""
    n_evals = tc.max_steps // tc.eval_every + int(tc.max_steps % tc.eval_every > 0)
    questions = tc.eval_size or n_val or len(ctx.lengths.question)
    gen = tc.generation
    factors = list(tc.eval_factors()) if mode == "colar" else [1]
    flops = steps = 0.0
    lq = ctx.lengths
    for r in factors:
        if mode == "colar":
            chain = [min(math.ceil(s / r) + 1, gen.max_latents) for s in lq.steps]
        elif mode == "cot":
            chain = [min(s, gen.max_cot_tokens) for s in lq.steps]
        else:
            chain = [0 for _ in lq.steps]
        answer = [min(a - 1, gen.max_answer_tokens) for a in lq.answer]
        prompt = sum(lq.question) / len(lq.question) + lq.speed[str(r)] + 1
        per_q = sum(
            generation_flops(ctx.arch, counts, ctx.latent_inter, prompt, c + a, c if mode == "colar" else 0)
            for c, a in zip(chain, answer)
        ) / len(chain)
        flops += per_q * questions
        steps += math.ceil(questions / gen.batch_size) * max(c + a for c, a in zip(chain, answer))
    return (
        flops * n_evals,
        _decode_hours(ctx, counts, flops * n_evals, steps * n_evals, weight_bytes),
        f"validation: {n_evals} x {questions} questions x {len(factors)} factor(s)",
    )


def plan_sft(
    ctx: _Ctx,
    name: str,
    tc: TrainConfig,
    rows_by_r: dict[int, list[tuple[int, int, int]]],
    passes: int = 1,
    note: str = "",
) -> StagePlan:
    """An SFT-shaped stage: ``rows_by_r`` are the (positions, labels, latents) per record at each factor
    drawn uniformly per step; ``passes`` decoder passes per example (2 with a second pass)."""
    t, counts = ctx.trained(), ctx.counts()
    nm = numerics(ctx.model.dtype, tc.precision, tc.backend, tc.zero_stage, tc.deepspeed_config)
    global_batch = tc.batch_size * tc.grad_accum * tc.launcher.world_size
    micro, accum = _split_batch(global_batch, tc.batch_size, ctx.n_gpus)
    stats = _mean_stats([batch_stats(rows, micro, tc.length_grouping, tc.seed) for rows in rows_by_r.values()])
    examples = tc.max_steps * global_batch
    per_ex = decoder_flops(ctx.arch, t, nm, stats.per_example(), ctx.latent_inter) * passes
    train_flops = per_ex * examples
    mode = tc.objective.mode
    val_flops, val_hours, val_note = _validation(ctx, counts, tc, mode, ctx.sample.n_val, nm.weight)
    worst = stats.worst
    if passes > 1:
        worst = replace(worst, positions=worst.positions * passes, labels=worst.labels * passes)
    memory = training_memory(ctx.arch, t, nm, counts, worst, ctx.latent_inter, ctx.n_gpus)
    hours = ctx.compute_hours(train_flops) + val_hours
    usable = ctx.gpu.memory_bytes * USABLE_MEMORY
    notes = [f"global batch {global_batch} = {micro} per GPU x {accum:g} accumulation x {ctx.n_gpus} GPU(s)"]
    if val_note:
        notes.append(val_note)
    if note:
        notes.append(note)
    n_train = ctx.sample.n_train
    return StagePlan(
        name,
        t.label() + " + latent head",
        counts.trained,
        examples,
        examples / n_train if n_train else None,
        stats.real,
        stats.padding,
        micro,
        train_flops + val_flops,
        {"train": train_flops, "validation": val_flops},
        hours,
        hours * ctx.n_gpus,
        memory,
        nm.label,
        memory.total <= usable,
        memory.total_ckpt <= usable,
        notes,
    )


def _sft_rows(ctx: _Ctx, tc: TrainConfig) -> dict[int, list[tuple[int, int, int]]]:
    obj = tc.objective
    factors = obj.compression_factors if obj.mode == "colar" else [1]
    return {r: ctx.lengths.rows(obj.mode, r, obj.opening_think_label, obj.closing_think_latent) for r in factors}


def plan_rl(ctx: _Ctx, rl: RLConfig) -> StagePlan:
    """GRPO: per RL step ``questions_per_step x group_size`` trajectories per process are rolled out (prefill +
    one step per latent and answer token), scored once without gradients (old log-probs), then trained on for
    ``update_epochs`` passes. Chains are assumed as long as the data's compressed chains at the stage's factor
    (ceil(steps / c) latents + the stop), capped at ``max_latents``."""
    t, counts = ctx.trained(), ctx.counts()
    nm = numerics(ctx.model.dtype, rl.precision, rl.backend, rl.zero_stage, rl.deepspeed_config)
    c, gen, lq = rl.compression_factor, rl.generation, ctx.lengths
    global_traj = rl.trajectories_per_step * rl.launcher.world_size
    per_update = int(getattr(rl, "trajectories_per_optimizer_step", rl.trajectories_per_step))
    micro, _ = _split_batch(global_traj, rl.micro_batch_size or per_update, ctx.n_gpus)
    rows, prompts, chains, answers = [], [], [], []
    for q, s, a in zip(lq.question, lq.steps, lq.answer):
        prompt, chain, answer = (
            q + lq.speed[str(c)] + 1,
            min(math.ceil(s / c) + 1, gen.max_latents),
            min(a - 1, gen.max_answer_tokens) + 1,
        )
        prompts.append(prompt)
        chains.append(chain)
        answers.append(answer)
        rows.append((prompt + chain + answer, answer + int(rl.continue_actions) * chain, chain))
    stats = batch_stats(rows, micro, 0, rl.seed)
    trajectories = rl.max_steps * global_traj
    rollout = sum(
        generation_flops(ctx.arch, counts, ctx.latent_inter, p, ch + an, ch)
        for p, ch, an in zip(prompts, chains, answers)
    ) / len(rows)
    shape = stats.per_example()
    old_logp = decoder_flops(ctx.arch, t, nm, shape, ctx.latent_inter, backward=False)
    update = decoder_flops(ctx.arch, t, nm, shape, ctx.latent_inter) * rl.update_epochs
    parts = {"rollout": rollout * trajectories, "old_logp": old_logp * trajectories, "update": update * trajectories}
    decode_steps = (
        rl.max_steps * math.ceil(global_traj / gen.batch_size) * max(ch + an for ch, an in zip(chains, answers))
    )
    hours = _decode_hours(ctx, counts, parts["rollout"], decode_steps, nm.weight) + ctx.compute_hours(
        parts["old_logp"] + parts["update"]
    )
    memory = training_memory(ctx.arch, t, nm, counts, stats.worst, ctx.latent_inter, ctx.n_gpus)
    kv = (
        2
        * ctx.arch.layers
        * ctx.arch.kv_width
        * nm.act
        * min(gen.batch_size, global_traj)
        * max(p + ch + an for p, ch, an in zip(prompts, chains, answers))
    )
    usable = ctx.gpu.memory_bytes * USABLE_MEMORY
    rollout_mem = counts.total * nm.weight + kv
    notes = [
        f"{rl.max_steps} rollouts x {global_traj} trajectories ({rl.questions_per_step} questions x "
        f"{rl.group_size} per process), {rl.update_epochs} update pass(es), micro-batch {micro} trajectories",
        f"chains assumed: the data's steps at c={c} (mean {sum(chains) / len(chains):.1f} latents incl. the "
        f"stop, cap {gen.max_latents}); rollout KV cache {kv / 2**30:.2f} GiB at generation batch "
        f"{gen.batch_size}",
    ]
    if rl.eval_every:
        notes.append("RL validation decoding is not counted")
    n_train = ctx.sample.n_train
    return StagePlan(
        "rl",
        t.label() + " + latent head",
        counts.trained,
        trajectories,
        rl.max_steps * rl.questions_per_step * rl.launcher.world_size / n_train if n_train else None,
        stats.real,
        stats.padding,
        micro,
        sum(parts.values()),
        parts,
        hours,
        hours * ctx.n_gpus,
        memory,
        nm.label,
        max(memory.total, rollout_mem) <= usable,
        max(memory.total_ckpt, rollout_mem) <= usable,
        notes,
        needed=rollout_mem,
    )


def _baseline_rows(
    ctx: _Ctx, method: str, cfg: Any, n_train: Optional[int], global_batch: int, max_steps: int
) -> tuple[dict[int, list[tuple[int, int, int]]], int, str]:
    """Rows of a baseline's batches, averaged over its curriculum: iCoT trains on the chain without its first
    k steps, Coconut puts k x thoughts_per_step thoughts in their place (stage k < max_stage), both at the
    last stage with no steps; Distill runs a teacher pass on the whole chain and a student pass on
    n_thoughts thoughts (two passes)."""
    lq = ctx.lengths
    base = [(q + lq.speed["1"] + 1, a) for q, a in zip(lq.question, lq.answer)]
    if method == "distill":
        teacher = [(p + s + a, s + a + 1, 0) for (p, a), s in zip(base, lq.steps)]
        student = [(p + cfg.n_thoughts + a, a + 1, 0) for p, a in base]
        merged = [(t[0] + u[0], t[1] + u[1], 0) for t, u in zip(teacher, student)]
        return {1: merged}, 1, "teacher (whole chain) + student (thoughts) passes"
    epochs = max_steps * global_batch / n_train if n_train else float(cfg.max_stage * cfg.epochs_per_stage)
    weights = [
        min(cfg.epochs_per_stage, max(0.0, epochs - (k - 1) * cfg.epochs_per_stage)) for k in range(1, cfg.max_stage)
    ]
    weights.append(max(0.0, epochs - (cfg.max_stage - 1) * cfg.epochs_per_stage))
    rows_by_stage = {}
    for k, w in enumerate(weights, start=1):
        if w <= 0:
            continue
        rows = []
        for (p, a), suffixes in zip(base, lq.step_suffixes):
            removed = min(k, len(suffixes) - 1) if k < cfg.max_stage else len(suffixes) - 1
            left = suffixes[removed]
            thoughts = cfg.thoughts_per_step * (k if k < cfg.max_stage else cfg.max_stage) if method == "coconut" else 0
            rows.append((p + thoughts + left + a, left + a + 1, 0))
        rows_by_stage[k] = rows
    return rows_by_stage, 1, f"curriculum stages weighted by their epochs ({epochs:.1f} in all)"


def build_plan(
    cfg: _PipelineLike,
    gpu: str = "h100",
    n_gpus: Optional[int] = None,
    mfu: float = 0.4,
    config_name: str = "(defaults)",
) -> Plan:
    """The capacity plan of ``cfg`` on ``n_gpus`` (default: the config's own process count) of ``gpu``."""
    if gpu not in GPUS:
        raise ConfigError(f"--gpu: unknown GPU {gpu!r}; choose one of {', '.join(GPUS)}")
    if not 0 < mfu <= 1:
        raise ConfigError(f"--mfu: must be in (0, 1], got {mfu}")
    if n_gpus is not None and n_gpus < 1:
        raise ConfigError(f"--gpus: must be at least 1, got {n_gpus}")
    model = cfg.model
    sample = load_sample(cfg.data)
    counter, vocab = make_counter(model, sample.tokenizer_records or sample.records)
    arch = resolve_arch(model, vocab)
    factors = sorted({*cfg.sft_colar.objective.compression_factors, *([cfg.rl.compression_factor] if cfg.rl else [])})
    baselines = list(cfg.baselines.selected())
    lengths = Lengths.of(sample.records, counter, factors, suffixes=bool(baselines))
    n = n_gpus or cfg.sft_colar.launcher.world_size
    ctx = _Ctx(arch, model, GPUS[gpu], n, mfu, lengths, counter, sample, model.latent_intermediate_size or arch.hidden)
    stages: list[StagePlan] = []
    if cfg.sft_cot is not None:
        stages.append(plan_sft(ctx, "sft-cot", cfg.sft_cot, _sft_rows(ctx, cfg.sft_cot)))
    colar = cfg.sft_colar
    stages.append(
        plan_sft(
            ctx, "sft-colar", colar, _sft_rows(ctx, colar), passes=2 if colar.objective.second_pass_weight > 0 else 1
        )
    )
    if cfg.rl is not None:
        stages.append(plan_rl(ctx, cfg.rl))
    if cfg.eval.nocot_baseline:
        section = cfg.sft_cot or cfg.sft_colar
        nocot = section.model_copy(
            update={"objective": section.objective.model_copy(update={"mode": "nocot", "compression_factors": [1]})}
        )
        stages.append(plan_sft(ctx, "sft-nocot", nocot, _sft_rows(ctx, nocot)))
    for method, bcfg in baselines:
        tc = bcfg.train
        global_batch = tc.batch_size * tc.grad_accum * tc.launcher.world_size
        rows, passes, note = _baseline_rows(ctx, method, bcfg, sample.n_train, global_batch, tc.max_steps)
        stages.append(
            plan_sft(
                ctx,
                f"sft-{method}",
                tc.model_copy(update={"eval_every": 0}),
                rows,
                passes,
                note + "; validation not counted",
            )
        )
    counts = ctx.counts()
    assumptions = [
        f"architecture: {arch.source}"
        + ("" if model.name_or_path == "tiny" else " (config.json values; no weights read)"),
        f"token counts: {counter.how}",
        f"data: {sample.description}; lengths from {len(sample.records):,} records",
        f"GPU: {ctx.gpu.source}",
        f"hours = FLOPs / ({n} GPU(s) x {ctx.gpu.bf16_tflops:g} TFLOP/s x MFU {mfu:.0%}); FLOPs count the padded "
        "positions each micro-batch executes; decoding (validation, rollouts) takes at least one read of the "
        "weights per step at the GPU's memory bandwidth",
        "FLOPs: matmuls only; training 2 P forward + 2 P input gradients through every matrix after the first "
        "trained one + 2 P_trained weight gradients per position (full fine-tuning = 6 N; LoRA = 4 N_frozen + "
        "6 N_lora); attention 4 x heads x head_dim x width per position and layer forward, twice that backward; "
        "LM head only at labelled positions, latent head at latent positions",
        f"memory: weights + gradients + AdamW state of the trained parameters (by the ZeRO stage over {n} GPU(s)) "
        f"+ activations of the longest micro-batch (the sample's longest example x the micro-batch); fits = under "
        f"{USABLE_MEMORY:.0%} of the GPU's memory. 'ckpt' = with gradient checkpointing, which the pipeline does "
        "not enable today",
        "the recipe's global batch is kept on any GPU count (micro-batch per GPU as configured, accumulation "
        "adjusted); the final evaluate stage (decoding only) and communication time are not counted",
    ]
    return Plan(
        config_name,
        ctx.gpu,
        n,
        mfu,
        model.name_or_path,
        arch,
        counts.total,
        counter.how,
        sample.description,
        stages,
        assumptions,
    )


# ---------------------------------------------------------------------------------------------------------
# Text


def _si(x: float) -> str:
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def _num(x: float) -> str:
    """Two decimals, or three significant digits below 1 (a CPU-sized run's hours)."""
    return f"{x:.2f}" if x >= 1 or x == 0 else f"{x:.3g}"


def render_plan(plan: Plan) -> str:
    """The plan as a person reads it: the model, a compute table and a memory table per stage, warnings, and
    the assumptions it rests on."""
    a = plan.arch
    gib = 2**30
    lines = [
        f"Capacity plan: {plan.config} on {plan.n_gpus} x {plan.gpu.name} "
        f"({plan.gpu.bf16_tflops:g} TFLOP/s bf16 dense, {plan.gpu.memory_gb:g} GB) at MFU {plan.mfu:.0%}",
        f"Model: {plan.model}: {a.layers} layers, hidden {a.hidden}, {a.heads} heads ({a.kv_heads} kv), MLP "
        f"{a.intermediate}, vocab {a.vocab}{', tied' if a.tied else ''}; {plan.params_total / 1e6:,.1f} M "
        "parameters with adapters and latent head",
        "",
    ]
    head = ["stage", "trained", "params", "examples", "epochs", "tok/ex", "pad", "FLOPs", "hours", "GPU-h"]
    rows = [
        [
            s.name,
            s.trained,
            _si(s.trained_params),
            f"{s.examples:,}",
            _num(s.epochs) if s.epochs is not None else "?",
            f"{s.tokens_per_example:.0f}",
            f"{s.padding:.2f}x",
            f"{s.flops:.2e}",
            _num(s.hours),
            _num(s.gpu_hours),
        ]
        for s in plan.stages
    ]
    rows.append(
        [
            "total",
            "",
            "",
            "",
            "",
            "",
            "",
            f"{sum(s.flops for s in plan.stages):.2e}",
            _num(plan.hours),
            _num(plan.gpu_hours),
        ]
    )
    lines += _table(head, rows) + [""]
    head = ["stage", "numerics", "micro", "weights", "grads", "optim", "act", "act ckpt", "total", "total ckpt", "fits"]
    rows = [
        [
            s.name,
            s.numerics,
            str(s.micro_batch),
            *(
                f"{x / gib:.2f}"
                for x in (
                    s.memory.weights,
                    s.memory.grads,
                    s.memory.optim,
                    s.memory.activations,
                    s.memory.activations_ckpt,
                    s.memory.total,
                    s.memory.total_ckpt,
                )
            ),
            "yes" if s.fits else ("ckpt only" if s.fits_ckpt else "NO"),
        ]
        for s in plan.stages
    ]
    lines += ["Memory per GPU (GiB):"] + _table(head, rows)
    for s in plan.stages:
        lines.append(f"  {s.name}: " + "; ".join(s.notes))
    lines += plan.warnings()
    lines += ["", "Assumptions:"] + [f"  - {x}" for x in plan.assumptions]
    return "\n".join(lines)


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    fmt: Callable[[list[str]], str] = lambda r: "  ".join(  # noqa: E731
        c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))
    )
    return [fmt(head), "  ".join("-" * w for w in widths), *(fmt(r) for r in rows)]
