"""The CoLaR model: any Hugging Face causal LM plus a latent head.

``ColarModel`` wraps a backbone (``AutoModelForCausalLM``, optionally with LoRA adapters) and adds
only the latent logic: merging reasoning-token embeddings into compressed embeddings, the latent
head, and the SFT losses. Training loops, inference and RL live elsewhere and call it.

Saved layout (loading never unpickles; every tensor is safetensors; what a folder may ask for on
its own word is limited: :func:`check_model_dir`)::

    model_dir/
      colar_config.json        ColarState: scale, pooling, head shape, base model, LoRA settings
      backbone/                save_pretrained of the full causal LM (full fine-tune)
      adapter/ (+ base/)       or: the peft adapter, and the base weights unless the base is a hub id
                               (a from-scratch, local-folder or GGUF base is kept in base/, so the
                               folder can be moved or copied and still loads: portable)
      latent_head.safetensors
      merge.safetensors        only for a learned merge (pooling 'gain'): its per-slot gains
      thought_projection.safetensors  only for the Coconut / Distill baselines with a projection
      tokenizer/               the tokenizer the model was trained with
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, cast

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from colar_core.collate import ColarBatch, packing
from colar_core.config import LoraConfig, ModelConfig, ObjectiveConfig
from colar_core.hub import looks_like_path
from colar_core.latent_head import LatentHead
from colar_core.losses import latent_loss, token_cross_entropy
from colar_core.merging import GroupMerger
from colar_core.number_tokens import add_number_tokens, init_number_embeddings, input_embedding_table
from colar_core.tokenizer import load_tokenizer

if TYPE_CHECKING:  # heavy, and peft only for LoRA models: imported where they are used
    from peft import PeftModel
    from transformers import PreTrainedConfig, PreTrainedModel
    from typing_extensions import TypeIs

CONFIG_FILE = "colar_config.json"
HEAD_FILE = "latent_head.safetensors"
MERGE_FILE = "merge.safetensors"
PROJECTION_FILE = "thought_projection.safetensors"
TOKENIZER_DIR = "tokenizer"
FORMAT_VERSION = 1

# Constants the reference code hard-codes per backbone (std of the merged embeddings, roughly).
PAPER_EMBEDDING_SCALES = {
    "llama-3.2-1b": 0.018,
    "llama-3.2-3b": 0.018,
    "llama-3.1-8b": 0.008,
    "deepseek-r1-distill-qwen-1.5b": 0.03,
    "gpt2": 0.12,
}


@dataclass
class ColarState:
    """Everything besides weights that defines a saved CoLaR model (``colar_config.json``)."""

    base_model: str
    hidden_size: int
    latent_intermediate_size: int
    deterministic_latents: bool = False
    pooling: str = "sqrt"
    merge_angle: float = 0.2  # pooling 'rotate' only
    embedding_scale: float = 1.0
    embedding_scale_source: str = "measured"  # "paper" | "measured" | "config"
    trained_compression_factors: list[int] = field(default_factory=list)
    lora: Optional[dict] = None
    trust_remote_code: bool = False
    # which method trained the folder (inference dispatches on it): "colar", or a baseline of
    # colar_core.baselines ("icot", "coconut", "distill") with its number of continuous thoughts
    method: str = "colar"
    n_thoughts: int = 0
    thought_projection: bool = False  # Coconut / Distill: thought_projection.safetensors is saved
    format_version: int = FORMAT_VERSION

    @classmethod
    def from_json(cls, path: Path) -> "ColarState":
        data = json.loads(Path(path).read_text())
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def paper_embedding_scale(name_or_path: str) -> Optional[float]:
    """The reference's hard-coded scale for a backbone it names, matched on the model id."""
    name = name_or_path.lower().rstrip("/").split("/")[-1]
    for key, value in PAPER_EMBEDDING_SCALES.items():
        if name == key or name.startswith(key + "-") or name.startswith(key + "_"):
            return value
    return None


def measured_embedding_scale(embedding: torch.Tensor) -> float:
    """Std of an input-embedding table: the typical per-dimension size of one token embedding.

    A group merged as sum/sqrt(n) of near-independent embeddings keeps that size, so dividing by it
    puts latent targets at roughly unit scale, which is what the paper's constants achieve.
    """
    return float(embedding.detach().float().std())


def build_tiny_backbone(cfg: ModelConfig, tokenizer) -> PreTrainedModel:
    """A small causal LM with random weights, shaped by ``cfg.tiny``; nothing is downloaded."""
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config  # heavy: when used

    t = cfg.tiny
    common = dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=t.tie_word_embeddings,
    )
    inter = t.intermediate_size or 4 * t.hidden_size
    conf: PreTrainedConfig
    if t.arch == "gpt2":
        conf = GPT2Config(n_embd=t.hidden_size, n_layer=t.num_layers, n_head=t.num_heads, n_inner=inter,
                          n_positions=t.max_position_embeddings, **common)
    else:
        conf_cls = LlamaConfig if t.arch == "llama" else Qwen2Config
        conf = conf_cls(hidden_size=t.hidden_size, num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads,
                        num_key_value_heads=t.num_kv_heads or t.num_heads, intermediate_size=inter,
                        max_position_embeddings=t.max_position_embeddings, **common)
    return AutoModelForCausalLM.from_config(conf)


def is_architecture_file(name_or_path: str) -> bool:
    """True when ``name_or_path`` is a ``.json`` file: a model's ``config.json`` values (architecture only,
    e.g. ``colar_core/archs/llama-3.2-1b-instruct.json``), from which :func:`build_arch_backbone` builds a
    backbone with random weights."""
    path = Path(name_or_path).expanduser()
    return path.suffix.lower() == ".json" and path.is_file()


def build_arch_backbone(path: str, tokenizer, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """A causal LM with random weights in the architecture a ``config.json`` file describes (its keys
    starting with ``_`` are notes, dropped); nothing is read from a hub. Rehearsing a recipe's shapes,
    memory and time before its weights are at hand (``flows.rehearsal``) builds its model this way.

    The vocabulary size stays the architecture's (a smaller tokenizer uses the first ids; a larger one
    grows the table, as for any backbone); the special-token ids become the tokenizer's, which encodes
    the text. Built directly in ``dtype`` (no float32 copy of a bf16 model on the way)."""
    from transformers import AutoConfig, AutoModelForCausalLM  # heavy: when used

    try:
        values = json.loads(Path(path).expanduser().read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"model.name_or_path: cannot read the architecture file {path} ({err})") from None
    if not isinstance(values, dict) or not isinstance(values.get("model_type"), str):
        raise ValueError(f"model.name_or_path: {path} is not a model's config.json (no model_type)")
    values = {k: v for k, v in values.items() if not k.startswith("_") and k not in ("torch_dtype", "dtype")}
    values.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id)
    conf = AutoConfig.for_model(values.pop("model_type"), **values)
    return AutoModelForCausalLM.from_config(conf, dtype=dtype)


def load_backbone(cfg: ModelConfig, tokenizer) -> PreTrainedModel:
    """The configured backbone: built from scratch for 'tiny' or an architecture file (random weights),
    else loaded from safetensors weights."""
    if cfg.name_or_path == "tiny":
        model = build_tiny_backbone(cfg, tokenizer)
    elif is_architecture_file(cfg.name_or_path):
        dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
        model = build_arch_backbone(cfg.name_or_path, tokenizer, dtype)
    else:
        from transformers import AutoModelForCausalLM  # heavy: only when a model is loaded

        from colar_core.gguf_import import resolve_model_path  # a GGUF file -> its converted folder

        model = AutoModelForCausalLM.from_pretrained(
            resolve_model_path(cfg.name_or_path), trust_remote_code=cfg.trust_remote_code, use_safetensors=True
        )
    if len(tokenizer) > input_embedding_table(model).shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    if cfg.dtype == "bfloat16":
        model = model.to(torch.bfloat16)  # type: ignore[arg-type]  # transformers' wrapped `to` is typed without self
    return model


def base_is_local(name_or_path: str) -> bool:
    """True when a backbone exists only on this machine: built from scratch ('tiny'), a local folder
    or a GGUF file (a name meant as a path counts, :func:`colar_core.hub.looks_like_path`). A LoRA model on
    such a base keeps a copy of it (``base/``) when saved."""
    return name_or_path == "tiny" or Path(name_or_path).expanduser().exists() or looks_like_path(name_or_path)


def _apply_lora(model: PreTrainedModel, lora: LoraConfig) -> PeftModel:
    # peft is heavy and only needed with LoRA
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_cfg = PeftLoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
        modules_to_save=lora.modules_to_save or None, task_type="CAUSAL_LM",
    )
    return get_peft_model(model, peft_cfg)


class UntrustedModelError(ValueError):
    """A model directory asks for something only the caller may allow (remote code, an outside
    base model) or holds pickled weights."""


def check_model_dir(root: Path, trust_remote_code: bool = False,
                    base_model: Optional[str] = None) -> tuple[ColarState, Optional[str | Path]]:
    """The state of a saved model directory and, for a LoRA model, where its base comes from.

    A folder is data, not configuration: its ``colar_config.json`` cannot turn on
    ``trust_remote_code`` (only the caller's argument can) nor pick a base model outside the folder
    (the base is the folder's own ``base/``, else the caller's ``base_model``). A LoRA adapter must
    be ``adapter_model.safetensors``: a pickled ``adapter_model.bin`` is refused unopened. Raises
    :class:`UntrustedModelError` naming the folder and how to allow what it asks for.
    """
    if not (root / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{root}: not a CoLaR model directory (no {CONFIG_FILE})")
    state = ColarState.from_json(root / CONFIG_FILE)
    if state.trust_remote_code and not trust_remote_code:
        raise UntrustedModelError(
            f"{root}: its {CONFIG_FILE} asks for trust_remote_code (running Python code shipped with the "
            "model); a model folder cannot enable that itself. Allow it only for a folder you trust: "
            "pass trust_remote_code=True (pipeline: model.trust_remote_code: true)")
    adapter = root / "adapter"
    if not adapter.is_dir():
        return state, None
    if not (adapter / "adapter_model.safetensors").is_file():
        found = "adapter_model.bin (pickled weights, refused unopened)" if (adapter / "adapter_model.bin").exists() \
            else "no adapter_model.safetensors"
        raise UntrustedModelError(f"{adapter}: {found}; LoRA adapters load from safetensors only")
    own_base = root / "base"
    if own_base.is_dir():
        if not own_base.resolve().is_relative_to(root.resolve()):
            raise UntrustedModelError(f"{own_base}: links outside the model folder {root}")
        return state, own_base
    if base_model is not None:
        return state, base_model
    raise UntrustedModelError(
        f"{root}: a LoRA model without its own base/ folder; its {CONFIG_FILE} names the base model "
        f"{state.base_model!r}, which is not loaded on the folder's word: pass base_model={state.base_model!r} "
        "explicitly if you trust it")


def _is_peft(lm: PreTrainedModel | PeftModel) -> TypeIs[PeftModel]:
    """A LoRA backbone (peft's wrapper) rather than a plain causal LM; told by duck type, so that a
    full fine-tune never imports peft."""
    return hasattr(lm, "get_base_model")


def _save_module(module: nn.Module, path: Path) -> None:
    """A small module's weights as one safetensors file (on the CPU, contiguous)."""
    save_file({k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}, str(path))


def _save_adapter(lm: PeftModel, adapter_dir: Path, base_name: Optional[str]) -> None:
    """``lm``'s peft adapter, its config naming the base as ``base_name`` (a hub id, or None for a
    base kept in the folder) and never the path a base happened to be loaded from: a folder
    copied elsewhere names nothing that was left behind."""
    configs = lm.peft_config.values()
    for c in configs:  # peft fills a None from the base's load path: set it before and after
        c.base_model_name_or_path = base_name
    lm.save_pretrained(str(adapter_dir))
    for c in configs:
        c.base_model_name_or_path = base_name
    config_file = adapter_dir / "adapter_config.json"
    data = json.loads(config_file.read_text())
    data["base_model_name_or_path"] = base_name
    config_file.write_text(json.dumps(data, indent=2, sort_keys=True))


class ColarModel(nn.Module):
    """A causal LM that reasons in compressed latents. See the module docstring for the layout."""

    # Coconut / Distill only: the MLP feeding hidden states back as inputs, attached as a submodule
    # by colar_core.baselines.thoughts.attach_projection (absent otherwise; read it with getattr)
    thought_projection: nn.Module

    def __init__(self, lm: PreTrainedModel | PeftModel, head: LatentHead, state: ColarState,
                 merger: Optional[GroupMerger] = None):
        super().__init__()
        self.lm = lm
        self.latent_head = head
        self.state = state
        if merger is None:
            merger = GroupMerger(state.pooling, state.hidden_size, state.merge_angle).to(head.mean.weight.dtype)
        self.merger = merger

    # ----- construction, save, load -------------------------------------------------------------
    @classmethod
    def build(cls, cfg: ModelConfig, tokenizer) -> "ColarModel":
        """Wrap the backbone named by ``cfg`` (random for 'tiny') with a fresh latent head.

        With ``cfg.add_number_tokens`` the number tokens are first added to ``tokenizer`` (in place;
        save that tokenizer with the model) and their embeddings start from their digit pieces."""
        pieces = add_number_tokens(tokenizer, cfg.add_number_tokens) if cfg.add_number_tokens else {}
        backbone = load_backbone(cfg, tokenizer)
        if pieces:
            init_number_embeddings(backbone, pieces)
        hidden = input_embedding_table(backbone).shape[1]
        if cfg.embedding_scale != "auto":
            scale, source = float(cfg.embedding_scale), "config"
        elif (paper := paper_embedding_scale(cfg.name_or_path)) is not None:
            scale, source = paper, "paper"
        else:
            scale, source = measured_embedding_scale(input_embedding_table(backbone)), "measured"
        state = ColarState(
            base_model=cfg.name_or_path,
            hidden_size=hidden,
            latent_intermediate_size=cfg.latent_intermediate_size or hidden,
            deterministic_latents=cfg.deterministic_latents,
            pooling=cfg.pooling,
            merge_angle=cfg.merge_angle,
            embedding_scale=scale,
            embedding_scale_source=source,
            lora=cfg.lora.model_dump() if cfg.lora else None,
            trust_remote_code=cfg.trust_remote_code,
        )
        lm = _apply_lora(backbone, cfg.lora) if cfg.lora else backbone
        head = LatentHead(hidden, state.latent_intermediate_size, state.deterministic_latents)
        return cls(lm, head.to(backbone.dtype), state)

    def save_pretrained(self, out_dir, tokenizer=None) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        lm = self.lm
        if _is_peft(lm):
            own_base = base_is_local(self.state.base_model)
            _save_adapter(lm, out / "adapter", None if own_base else self.state.base_model)
            if own_base:  # a base that exists only here (from scratch, a local folder, a GGUF): keep it
                base = self.causal_lm
                frozen = {
                    k.replace(".base_layer.", ".").replace(".original_module.", "."): v
                    for k, v in base.state_dict().items()
                    if "lora_" not in k and ".modules_to_save." not in k
                }
                base.save_pretrained(out / "base", state_dict=frozen)
        else:
            lm.save_pretrained(out / "backbone")
        _save_module(self.latent_head, out / HEAD_FILE)
        if self.merger.has_parameters:
            _save_module(self.merger, out / MERGE_FILE)
        projection = getattr(self, "thought_projection", None)
        if projection is not None:  # Coconut / Distill (colar_core.baselines)
            _save_module(projection, out / PROJECTION_FILE)
        if tokenizer is not None:
            tokenizer.save_pretrained(out / TOKENIZER_DIR)
        (out / CONFIG_FILE).write_text(json.dumps(asdict(self.state), indent=2, sort_keys=True))
        return out

    @classmethod
    def from_pretrained(cls, model_dir, is_trainable: bool = True, dtype: Optional[torch.dtype] = None,
                        trust_remote_code: bool = False, base_model: Optional[str] = None) -> "ColarModel":
        """Load a directory written by :meth:`save_pretrained`; see :func:`check_model_dir` for what
        the caller's ``trust_remote_code`` and ``base_model`` decide (never the folder's own config)."""
        from transformers import AutoModelForCausalLM  # heavy: only when a model is loaded

        root = Path(model_dir)
        state, base_path = check_model_dir(root, trust_remote_code, base_model)
        kw: dict[str, Any] = dict(trust_remote_code=trust_remote_code, use_safetensors=True)
        if dtype is not None:
            kw["dtype"] = dtype
        if base_path is not None:
            from peft import PeftModel  # heavy: only for LoRA models

            from colar_core.gguf_import import resolve_model_path  # a GGUF base -> its converted folder

            base = AutoModelForCausalLM.from_pretrained(resolve_model_path(base_path), **kw)
            lm: PreTrainedModel | PeftModel = PeftModel.from_pretrained(base, root / "adapter",
                                                                        is_trainable=is_trainable)
        else:
            lm = AutoModelForCausalLM.from_pretrained(root / "backbone", **kw)
        head = LatentHead(state.hidden_size, state.latent_intermediate_size, state.deterministic_latents)
        head.load_state_dict(load_file(str(root / HEAD_FILE)))
        merger = GroupMerger(state.pooling, state.hidden_size, state.merge_angle)
        if merger.has_parameters:
            if not (root / MERGE_FILE).is_file():
                raise FileNotFoundError(f"{root}: pooling {state.pooling!r} needs its learned merge {MERGE_FILE}")
            merger.load_state_dict(load_file(str(root / MERGE_FILE)))
        model = cls(lm, head.to(lm.dtype), state, merger.to(lm.dtype))
        if state.thought_projection:  # Coconut / Distill: the MLP feeding hidden states back as inputs
            from colar_core.baselines.thoughts import attach_projection  # only these baselines need it

            attach_projection(model).load_state_dict(load_file(str(root / PROJECTION_FILE)))
        return model

    @classmethod
    def load_dir(cls, model_dir, is_trainable: bool = True, dtype: Optional[torch.dtype] = None,
                 trust_remote_code: bool = False, base_model: Optional[str] = None):
        """``(model, tokenizer)`` of a directory written by :meth:`save_pretrained` with its
        tokenizer (``model_dir/tokenizer``); ``is_trainable=False`` returns the model in eval mode.
        ``trust_remote_code`` and ``base_model``: as in :meth:`from_pretrained`."""
        model = cls.from_pretrained(model_dir, is_trainable=is_trainable, dtype=dtype,
                                    trust_remote_code=trust_remote_code, base_model=base_model)
        tokenizer = load_tokenizer(str(Path(model_dir) / TOKENIZER_DIR), trust_remote_code=trust_remote_code)
        return (model if is_trainable else model.eval()), tokenizer

    @staticmethod
    def load_options(cfg: ModelConfig) -> dict:
        """What a caller's own model config allows when it loads a folder it trained from that config:
        its ``trust_remote_code``, and its backbone as the LoRA base ('tiny' has none outside the folder)."""
        return {"trust_remote_code": cfg.trust_remote_code,
                "base_model": None if cfg.name_or_path == "tiny" else cfg.name_or_path}

    # ----- backbone access ----------------------------------------------------------------------
    @property
    def is_lora(self) -> bool:
        return _is_peft(self.lm)

    @property
    def causal_lm(self) -> PreTrainedModel:
        lm = self.lm
        # peft types its base nn.Module; under a CAUSAL_LM adapter it is the wrapped causal LM
        return cast("PreTrainedModel", lm.get_base_model()) if _is_peft(lm) else lm

    @property
    def decoder(self) -> nn.Module:
        """The transformer body without the LM head (e.g. LlamaModel, GPT2Model)."""
        lm = self.causal_lm
        return getattr(lm, lm.base_model_prefix)

    @property
    def device(self) -> torch.device:
        return self.latent_head.mean.weight.device

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.causal_lm.get_input_embeddings()(ids)

    def token_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.causal_lm.get_output_embeddings()(hidden)

    def run_decoder(self, inputs_embeds, attention_mask, position_ids, past_key_values=None, use_cache=False):
        """Hidden states of the body; ``attention_mask`` None means plain causal attention (no pads
        before a real position)."""
        out = self.decoder(
            inputs_embeds=inputs_embeds, position_ids=position_ids,
            attention_mask=None if attention_mask is None else attention_mask.long(),
            past_key_values=past_key_values, use_cache=use_cache,
        )
        return out.last_hidden_state, (out.past_key_values if use_cache else None)

    def run_decoder_packed(self, inputs_embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Hidden states of a padded layout (pads anywhere in a row), computed on its packed form.

        Equal to ``run_decoder`` with the padding mask at every real position; values at pads are
        meaningless. The body runs with plain causal attention and is only as wide as the longest row.
        """
        order, _, slot_of = packing(mask)
        b, _, h = inputs_embeds.shape
        packed = inputs_embeds.gather(1, order.unsqueeze(-1).expand(-1, -1, h))
        position_ids = torch.arange(order.shape[1], device=order.device).unsqueeze(0).expand(b, -1)
        hidden, _ = self.run_decoder(packed, None, position_ids)
        return hidden.gather(1, slot_of.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))

    def remeasure_embedding_scale(self) -> float:
        """Refresh a measured scale from the current embedding table (e.g. after CoT SFT trained it)."""
        if self.state.embedding_scale_source == "measured":
            self.state.embedding_scale = measured_embedding_scale(input_embedding_table(self.causal_lm))
        return self.state.embedding_scale

    # ----- SFT ----------------------------------------------------------------------------------
    @staticmethod
    def _packed(batch: ColarBatch, prompt: torch.Tensor, groups: torch.Tensor, answer: torch.Tensor) -> torch.Tensor:
        """``[B, W, H]`` packed input embeddings from the three embedded blocks of a batch."""
        blocks = torch.cat([prompt, groups, answer], dim=1)
        b, t, h = blocks.shape
        return blocks.reshape(b * t, h).index_select(0, batch.pack_index).view(b, -1, h)

    def sft_loss(
        self, batch: ColarBatch, objective: ObjectiveConfig, generator: Optional[torch.Generator] = None
    ) -> dict[str, torch.Tensor]:
        """Losses of one SFT batch. Returns ``loss`` (the weighted total) and its parts.

        The backbone runs on the packed layout (pads only at the end of rows, plain causal attention)
        and vocabulary logits are computed only at labelled positions: together that is what makes
        a CoLaR step as cheap per position as a plain causal-LM step. Every index comes from
        ``collate``, so nothing here waits on the device.
        """
        prompt, answer = self.embed(batch.prompt_ids), self.embed(batch.answer_ids)
        groups = self.merger(self.embed(batch.group_ids), batch.group_token_mask)
        inputs = self._packed(batch, prompt, groups, answer)
        b, w, h = inputs.shape
        position_ids = torch.arange(w, device=inputs.device).unsqueeze(0).expand(b, -1)

        hidden, _ = self.run_decoder(inputs, None, position_ids)
        flat = hidden.reshape(b * w, h)
        label_index, label_targets = batch.label_index, batch.label_targets
        if objective.opening_think_label:  # the reference's label on the opening '###' (ObjectiveConfig)
            label_index = torch.cat([label_index, batch.open_label_index])
            label_targets = torch.cat([label_targets, batch.open_label_targets])
        ce = token_cross_entropy(self.token_logits(flat.index_select(0, label_index)), label_targets)
        zero = ce.new_zeros(())
        parts = {"ce": ce, "latent": zero, "entropy": zero, "second_pass": zero}
        total = objective.ce_weight * ce

        wants_latent = objective.mode == "colar" and (objective.latent_weight > 0 or objective.second_pass_weight > 0
                                                      or objective.entropy_weight != 0)
        latent_src, latent_tgt = batch.latent_src, batch.latent_tgt
        if objective.closing_think_latent:  # the last group predicts the closing '###' (ObjectiveConfig)
            latent_src = torch.cat([latent_src, batch.end_latent_src])
            latent_tgt = torch.cat([latent_tgt, batch.end_latent_tgt])
        if wants_latent and latent_src.numel() > 0:
            scale = self.state.embedding_scale
            mean, log_std = self.latent_head(flat.index_select(0, latent_src))
            flat_groups = groups.reshape(-1, h)
            target = (flat_groups.index_select(0, latent_tgt) / scale).detach()
            lat, entropy, sample = latent_loss(
                mean, log_std, target, objective.latent_loss, self.state.deterministic_latents, generator
            )
            parts["latent"], parts["entropy"] = lat, entropy
            # the entropy term is added, as the reference's (see ObjectiveConfig.entropy_weight)
            total = total + objective.latent_weight * lat + objective.entropy_weight * entropy
            if objective.second_pass_weight > 0:
                # each step group is replaced by its prediction; the closing latents' predictions (the
                # rows after batch.latent_src's) are not fed: the answer's real '###' stays
                fed = sample[: batch.latent_src.numel()]
                replaced = flat_groups.index_copy(0, batch.latent_tgt, (fed * scale).to(flat_groups.dtype))
                inputs2 = self._packed(batch, prompt, replaced.view_as(groups), answer)
                hidden2, _ = self.run_decoder(inputs2, None, position_ids)
                logits2 = self.token_logits(hidden2.reshape(b * w, h).index_select(0, label_index))
                ce2 = token_cross_entropy(logits2, label_targets)
                parts["second_pass"] = ce2
                total = total + objective.second_pass_weight * ce2
        parts["loss"] = total
        parts["n_label_tokens"] = label_targets.new_full((), label_index.numel())
        parts["n_positions"] = batch.packed_mask.sum()
        return parts
