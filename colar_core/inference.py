"""Batched inference with the KV cache: latent reasoning, explicit CoT and answer-only decoding.

Latent reasoning at compression factor ``c`` (paper): the prompt ends ``(Thinking speed: c)###``;
each step samples a latent from the head (times the embedding scale) and feeds it as the next
input embedding; after each latent the LM head picks a token and a row stops when that token is
``###`` (so every row has at least one latent). Then ``###`` is fed and the answer decoded.
Rows that stop early keep their place in the batch with their new positions masked out, so a
row's answer only ever attends to its own latents.

The baselines of ``colar_core.baselines`` decode through the same state: iCoT as explicit text after
the ``auto`` prompt, Coconut and Distill with a fixed number of continuous thoughts (each the last
hidden state fed back, :func:`feed_thoughts`, which their training uses too) before ``###``.

One code path serves evaluation, serving and RL rollouts; ``LatentTrace`` keeps what RL needs to
recompute log-probabilities (the sampled latents and answer tokens).

``protocol='reference'`` (:func:`generate`; ``eval.protocol``) decodes the baselines the way the
reference's own evaluation does (xiaomi-research/colar, ``src/models/model_base.py``): iCoT after the
bare question with 16 new tokens (``text_generate``: no speed suffix for any method but CoT; its
icot.yaml), Coconut and Distill with 6 thoughts each run on its own (``fixed_length_latent_generate``,
:func:`feed_thoughts` with ``isolated``) and 16 answer tokens. Every explicit decoding also counts its
chain as the reference does (``Generation.reference_length``: :func:`reference_chain_length`).

A caller that must bound the work (a server whose request timed out or that is shutting down) passes
``stop``, a :data:`StopCheck` asked before every decoder step (prompt batch, latent, thought, token):
when it returns a reason the generation ends with :class:`GenerationStopped` within one step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Optional, Sequence, Union, overload

import torch

from colar_core.config import GenerationConfig
from colar_core.text import AUTO_SPEED, PromptEncoder, Speed, extract_answer

#: Asked before every decoder step of a generation: None to go on, or the reason to stop (one line).
StopCheck = Callable[[], Optional[str]]


class GenerationStopped(RuntimeError):
    """A generation ended early because its :data:`StopCheck` gave a reason (the message); nothing is
    returned for any of its questions."""


def check_stop(stop: Optional[StopCheck]) -> None:
    """Raise :class:`GenerationStopped` when ``stop`` (if any) gives a reason to stop now."""
    if stop is not None:
        reason = stop()
        if reason is not None:
            raise GenerationStopped(reason)


#: The protocols :func:`generate` decodes by: colar's (the method as its papers describe it) and the
#: reference's own evaluation of the baselines (module docstring).
PROTOCOLS = ("colar", "reference")
#: What the reference's evaluation fixes: the thoughts of Coconut and Distill
#: (``max_n_latent_forward = 6`` in ``fixed_length_latent_generate``, model_base.py:360) and the new
#: tokens of iCoT, Coconut and Distill (``answer_generation_config.max_new_tokens`` of their configs).
REFERENCE_THOUGHTS = 6
REFERENCE_NEW_TOKENS = 16


@dataclass
class Generation:
    """One answered question. ``n_latents`` for latent reasoning, ``n_tokens`` chain tokens for CoT.
    ``reference_length``: the chain as the reference's evaluation counts it (:func:`reference_chain_length`
    for explicit decoding, the thoughts for Coconut / Distill); None for CoLaR's latents, which it
    counts as ``n_latents``."""

    text: str
    answer: Optional[str]  # what is scored: text.extract_answer(text), uncleaned (answers_match cleans it)
    n_latents: int = 0
    n_tokens: int = 0
    reference_length: Optional[int] = None

    @property
    def chain_length(self) -> int:
        return self.n_latents or self.n_tokens


@dataclass
class LatentTrace:
    """Tensors of a latent rollout (for RL). Latents are in scaled space (before x embedding scale)."""

    prompt_ids: torch.Tensor  # [B, Lp] left-padded, ends with '###'
    prompt_mask: torch.Tensor  # [B, Lp]
    latents: torch.Tensor  # [B, K, H]
    latent_mask: torch.Tensor  # [B, K] bool: latent k belongs to the row's chain
    answer_ids: torch.Tensor  # [B, T]: '###' then the decoded answer tokens (EOS included)
    answer_mask: torch.Tensor  # [B, T] bool
    # [B, K + 1, H]: the last hidden state the head read to draw latent k, then the one after the last
    # latent (the LM head's stop check after latent k reads k + 1); colar_core.latent_inspect shows them
    hidden: torch.Tensor


class DecodeState:
    """Incremental decoding state: KV cache, 2-D attention mask and the last hidden state."""

    def __init__(self, model, prompts: Sequence[Sequence[int]], pad_id: int):
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.bool)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.as_tensor(p, dtype=torch.long)
            mask[i, width - len(p):] = True
        self.model = model
        self.prompt_ids, self.prompt_mask = ids.to(model.device), mask.to(model.device)
        self.mask = self.prompt_mask
        pos = (self.mask.long().cumsum(-1) - 1).clamp(min=0)
        hidden, self.cache = model.run_decoder(model.embed(self.prompt_ids), self.mask, pos, use_cache=True)
        self.hidden = hidden[:, -1]

    def feed(self, embeds: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Append one input embedding per row; rows with ``keep`` False are masked out."""
        self.mask = torch.cat([self.mask, keep[:, None]], dim=1)
        pos = (self.mask.long().sum(-1, keepdim=True) - 1).clamp(min=0)
        hidden, self.cache = self.model.run_decoder(
            embeds[:, None].to(self.prompt_dtype), self.mask, pos, past_key_values=self.cache, use_cache=True
        )
        self.hidden = hidden[:, -1]
        return self.hidden

    def extend(self, embeds: torch.Tensor, mask: torch.Tensor, all_layers: bool = False):
        """Append a block of input embeddings ``[B, T, H]`` in one forward (``mask`` ``[B, T]``: real
        positions; trailing pads are fine). Returns the block's last hidden states ``[B, T, H]``, or
        with ``all_layers`` the tuple of every layer's (embeddings first), as HF's ``hidden_states``."""
        self.mask = torch.cat([self.mask, mask.to(self.mask.device, torch.bool)], dim=1)
        pos = (self.mask.long().cumsum(-1) - 1).clamp(min=0)[:, -embeds.shape[1]:]
        out = self.model.decoder(inputs_embeds=embeds.to(self.prompt_dtype), attention_mask=self.mask.long(),
                                 position_ids=pos, past_key_values=self.cache, use_cache=True,
                                 output_hidden_states=all_layers)
        self.cache = out.past_key_values
        self.hidden = out.last_hidden_state[:, -1]
        return out.hidden_states if all_layers else out.last_hidden_state

    @property
    def prompt_dtype(self) -> torch.dtype:
        return self.model.latent_head.mean.weight.dtype


def thought_input(model, hidden: torch.Tensor) -> torch.Tensor:
    """The input embedding a continuous thought feeds back: the last hidden state, through the
    model's ``thought_projection`` when it has one (colar_core.baselines.thoughts)."""
    proj = getattr(model, "thought_projection", None)
    return hidden if proj is None else proj(hidden)


def feed_thoughts(state: DecodeState, model, n: int, stop: Optional[StopCheck] = None,
                  isolated: bool = False) -> list[torch.Tensor]:
    """Coconut / Distill: ``n`` continuous thoughts, one sequential forward each (KV cache): each
    feeds :func:`thought_input` of the previous position's last hidden state. Shared by training
    (gradients flow through the chain) and inference. Returns the fed embeddings, in order.

    ``isolated`` (the reference's evaluation, ``fixed_length_latent_generate``, model_base.py:382-398):
    the hidden state a thought hands on comes from a forward of that thought alone (no
    ``past_key_values``; under the reference's transformers 4.45 a one-token forward without a cache
    attends to itself only, at position 0), so thought 1 is read from the question and every later one
    only from the thought before it. The thoughts still go into ``state`` in order, as the reference's
    answer pass re-reads question, thoughts and ``###`` in one sequence."""
    fed = []
    keep = torch.ones(state.hidden.shape[0], dtype=torch.bool, device=state.hidden.device)
    hidden = state.hidden
    for _ in range(n):
        check_stop(stop)
        embeds = thought_input(model, hidden)
        state.feed(embeds, keep)
        hidden = _alone(model, embeds, state.prompt_dtype) if isolated else state.hidden
        fed.append(embeds)
    return fed


def _alone(model, embeds: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The last hidden state ``[B, H]`` of a forward of one input embedding per row, without context
    (position 0, no cache)."""
    position = torch.zeros((embeds.shape[0], 1), dtype=torch.long, device=embeds.device)
    hidden, _ = model.run_decoder(embeds[:, None].to(dtype), None, position)
    return hidden[:, -1]


def reference_chain_length(row: Sequence[int], think_id: int, colon_id: Optional[int], width: int) -> int:
    """#L of one explicit output as the reference's ``text_generate`` counts it (model_base.py:203-213):
    the index of the first ``###`` minus 1, else the index of the first ``:`` minus 3, else ``width``, the
    batch's output width (pads included). ``row``: the generated ids, pads after EOS included. Kept as
    written: the ``- 1`` skips the newline the reference's iCoT / Coconut texts put before ``###``, which
    colar's texts (and the reference's own CoT text) do not have, so there it drops a chain token, and an
    output that opens with ``###`` counts -1."""
    if think_id in row:
        return list(row).index(think_id) - 1
    if colon_id is not None and colon_id in row:
        return list(row).index(colon_id) - 3
    return width


def _colon_id(encoder: PromptEncoder) -> Optional[int]:
    """The id the reference's count looks for: the first token of ``:`` encoded alone."""
    ids = encoder.tokenizer.encode(":", add_special_tokens=False)
    return ids[0] if ids else None


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filtering of ``[..., V]`` logits: tokens outside the smallest most-likely set whose
    probability reaches ``top_p`` get ``-inf``.

    A token is kept when the probability of the tokens ranked strictly above it is below ``top_p``,
    so the most likely token always stays; this is HF's ``TopPLogitsWarper`` (which removes a token
    when the tokens ranked at or below it hold at most ``1 - top_p``), the warper the reference's
    ``generate(top_p=0.9)`` applies. ``top_p >= 1`` returns ``logits`` unchanged.
    """
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits.float(), dim=-1)
    mass_above = probs.cumsum(-1) - probs
    remove_sorted = mass_above >= top_p
    remove = remove_sorted.scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def pick_tokens(logits: torch.Tensor, gen: GenerationConfig, generator: Optional[torch.Generator],
                top_p: Optional[float] = None) -> torch.Tensor:
    """One token per row: the argmax, or sampled at ``gen.temperature`` when ``gen.do_sample``, from
    the nucleus of ``top_p`` (default ``gen.top_p``; 1.0 samples from the full softmax)."""
    if not gen.do_sample:
        return logits.argmax(-1)
    scaled = top_p_filter(logits.float() / gen.temperature, gen.top_p if top_p is None else top_p)
    probs = torch.softmax(scaled, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _decode_tokens(state: DecodeState, model, max_new: int, eos_id: int, pad_id: int, gen, generator,
                   stop: Optional[StopCheck] = None) -> torch.Tensor:
    """Decode up to ``max_new`` tokens per row from ``state``; rows stop at EOS. Returns [B, T]."""
    b = state.hidden.shape[0]
    done = torch.zeros(b, dtype=torch.bool, device=state.hidden.device)
    out = []
    for i in range(max_new):
        check_stop(stop)
        tok = pick_tokens(model.token_logits(state.hidden), gen, generator)
        tok = torch.where(done, torch.full_like(tok, pad_id), tok)
        out.append(tok)
        done = done | (tok == eos_id)
        if i == max_new - 1 or bool(done.all()):  # the last pick is never fed back
            break
        state.feed(model.embed(tok), ~done)
    return torch.stack(out, dim=1) if out else torch.empty((b, 0), dtype=torch.long, device=state.hidden.device)


@overload
def generate_latent(model, encoder: PromptEncoder, questions: Sequence[str], compression: Speed,
                    gen: GenerationConfig = ..., generator: Optional[torch.Generator] = ...,
                    return_trace: Literal[False] = ..., stop: Optional[StopCheck] = ...) -> list[Generation]: ...


@overload
def generate_latent(model, encoder: PromptEncoder, questions: Sequence[str], compression: Speed,
                    gen: GenerationConfig = ..., generator: Optional[torch.Generator] = ..., *,
                    return_trace: Literal[True],
                    stop: Optional[StopCheck] = ...) -> tuple[list[Generation], LatentTrace]: ...


@torch.no_grad()
def generate_latent(
    model,
    encoder: PromptEncoder,
    questions: Sequence[str],
    compression: Speed,
    gen: GenerationConfig = GenerationConfig(),
    generator: Optional[torch.Generator] = None,
    return_trace: bool = False,
    stop: Optional[StopCheck] = None,
) -> Union[list[Generation], tuple[list[Generation], LatentTrace]]:
    """Latent reasoning for one batch of questions at compression factor ``compression``; with
    ``return_trace`` also the :class:`LatentTrace` of what was sampled (RL's trajectories). ``stop``:
    module docstring."""
    check_stop(stop)
    prompts = [encoder.prompt_ids(encoder.encode_question(q), compression) for q in questions]
    state = DecodeState(model, prompts, encoder.pad_id)
    b, device = len(questions), model.device
    active = torch.ones(b, dtype=torch.bool, device=device)
    n_latents = torch.zeros(b, dtype=torch.long, device=device)
    latents, latent_mask = [], []
    hidden = [state.hidden] if return_trace else None
    scale = model.state.embedding_scale
    for _ in range(gen.max_latents):
        check_stop(stop)
        z, _, _ = model.latent_head.sample(state.hidden, sample=gen.sample_latents, generator=generator)
        latents.append(z)
        latent_mask.append(active.clone())
        state.feed(z * scale, active)
        if hidden is not None:
            hidden.append(state.hidden)
        n_latents += active.long()
        # the stop check samples from the full softmax (top_p=1), as the reference's (no nucleus there)
        ends = active & (pick_tokens(model.token_logits(state.hidden), gen, generator, top_p=1.0) == encoder.think_id)
        active = active & ~ends
        if not bool(active.any()):
            break
    think = torch.full((b,), encoder.think_id, dtype=torch.long, device=device)
    state.feed(model.embed(think), torch.ones(b, dtype=torch.bool, device=device))
    answer_tokens = _decode_tokens(state, model, gen.max_answer_tokens, encoder.eos_id, encoder.pad_id, gen, generator,
                                   stop)

    results = []
    for i in range(b):
        text = encoder.decode(answer_tokens[i].tolist())
        results.append(Generation(text=text, answer=extract_answer(text), n_latents=int(n_latents[i])))
    if hidden is None:
        return results
    answer_ids = torch.cat([think[:, None], answer_tokens], dim=1)
    answer_mask = torch.ones_like(answer_ids, dtype=torch.bool)
    if answer_tokens.shape[1] > 1:  # positions after a row's EOS are padding
        after_eos = (answer_tokens == encoder.eos_id).long().cumsum(1) - (answer_tokens == encoder.eos_id).long()
        answer_mask[:, 1:] = after_eos == 0
    trace = LatentTrace(state.prompt_ids, state.prompt_mask, torch.stack(latents, 1), torch.stack(latent_mask, 1),
                        answer_ids, answer_mask, torch.stack(hidden, 1))
    return results, trace


@torch.no_grad()
def generate_text(
    model,
    encoder: PromptEncoder,
    questions: Sequence[str],
    speed: Optional[Speed] = 1,
    gen: GenerationConfig = GenerationConfig(),
    generator: Optional[torch.Generator] = None,
    chain_ends_at_answer: bool = False,
    stop: Optional[StopCheck] = None,
    max_new_tokens: Optional[int] = None,
) -> list[Generation]:
    """Explicit decoding after ``(Thinking speed: speed)###``: the CoT baseline, or no-CoT for a model
    trained to answer directly; ``speed`` None: after the bare question (the reference's iCoT
    evaluation). Up to ``max_new_tokens`` tokens (default ``gen.max_cot_tokens + gen.max_answer_tokens``).
    ``n_tokens`` counts chain tokens before the closing ``###`` (an output without it: its tokens before
    EOS); with ``chain_ends_at_answer`` (iCoT) an output that skips the ``###`` counts the tokens before
    its ``Answer:`` (colar's rule, not the reference's), so a direct answer is a chain of 0, not of its
    answer tokens. ``reference_length``: the reference's count (:func:`reference_chain_length`)."""
    check_stop(stop)
    questions_ids = [encoder.encode_question(q) for q in questions]
    prompts = [ids if speed is None else encoder.prompt_ids(ids, speed) for ids in questions_ids]
    state = DecodeState(model, prompts, encoder.pad_id)
    budget = gen.max_cot_tokens + gen.max_answer_tokens if max_new_tokens is None else max_new_tokens
    tokens = _decode_tokens(state, model, budget, encoder.eos_id, encoder.pad_id, gen, generator, stop)
    colon = _colon_id(encoder)
    results = []
    for row in tokens.tolist():
        text = encoder.decode(row)
        chain = row.index(encoder.think_id) if encoder.think_id in row else len([t for t in row if t != encoder.pad_id])
        if chain_ends_at_answer and encoder.think_id not in row:
            chain = min(chain, _find(row, encoder.answer_prefix_ids))
        # scored like the reference's CoT outputs: the whole decoded text goes through extract_answer
        results.append(Generation(text=text, answer=extract_answer(text), n_tokens=chain,
                                  reference_length=reference_chain_length(row, encoder.think_id, colon, len(row))))
    return results


def _find(row: Sequence[int], piece: Sequence[int]) -> int:
    """Start of the first occurrence of ``piece`` in ``row``; ``len(row)`` when absent."""
    n = len(piece)
    return next((i for i in range(len(row) - n + 1) if n and list(row[i:i + n]) == list(piece)), len(row))


@torch.no_grad()
def generate_thoughts(
    model,
    encoder: PromptEncoder,
    questions: Sequence[str],
    n_thoughts: int,
    gen: GenerationConfig = GenerationConfig(),
    generator: Optional[torch.Generator] = None,
    stop: Optional[StopCheck] = None,
    isolated: bool = False,
    max_new_tokens: Optional[int] = None,
) -> list[Generation]:
    """Coconut / Distill: the prompt (speed 'auto', as they train), exactly ``n_thoughts`` continuous
    thoughts (:func:`feed_thoughts`; ``isolated``: each run on its own, as the reference's evaluation),
    the closing ``###``, then up to ``max_new_tokens`` (default ``gen.max_answer_tokens``) answer tokens.
    ``n_latents`` = ``reference_length`` = ``n_thoughts``."""
    check_stop(stop)
    prompts = [encoder.prompt_ids(encoder.encode_question(q), AUTO_SPEED) for q in questions]
    state = DecodeState(model, prompts, encoder.pad_id)
    b, device = len(questions), model.device
    feed_thoughts(state, model, n_thoughts, stop, isolated=isolated)
    think = torch.full((b,), encoder.think_id, dtype=torch.long, device=device)
    state.feed(model.embed(think), torch.ones(b, dtype=torch.bool, device=device))
    budget = gen.max_answer_tokens if max_new_tokens is None else max_new_tokens
    answer_tokens = _decode_tokens(state, model, budget, encoder.eos_id, encoder.pad_id, gen, generator, stop)
    results = []
    for row in answer_tokens.tolist():
        text = encoder.decode(row)
        results.append(Generation(text=text, answer=extract_answer(text), n_latents=n_thoughts,
                                  reference_length=n_thoughts))
    return results


#: ``generate`` modes: CoLaR's latents, the text baselines, and the methods of colar_core.baselines.
MODES = ("latent", "cot", "nocot", "icot", "coconut", "distill")


def generate(
    model,
    encoder: PromptEncoder,
    questions: Sequence[str],
    mode: str = "latent",
    compression: Speed = 1,
    gen: GenerationConfig = GenerationConfig(),
    seed: Optional[int] = None,
    stop: Optional[StopCheck] = None,
    protocol: str = "colar",
) -> list[Generation]:
    """All questions, in batches of ``gen.batch_size``. ``mode``: 'latent' (CoLaR at ``compression``),
    'cot' / 'nocot' (explicit decoding), 'icot' (explicit decoding after the 'auto' prompt it trains
    with: the remaining steps, if any, then the answer), 'coconut' / 'distill' (``model.state.n_thoughts``
    continuous thoughts, then the answer). ``stop``: asked before every decoder step; when it gives a
    reason, :class:`GenerationStopped` is raised within one step and nothing is returned (module docstring).

    ``protocol`` 'reference' decodes the baselines as the reference's evaluation does: 'icot' after the
    bare question with :data:`REFERENCE_NEW_TOKENS` new tokens; 'coconut' / 'distill' with
    :data:`REFERENCE_THOUGHTS` thoughts, each run on its own, and :data:`REFERENCE_NEW_TOKENS` answer
    tokens. It changes nothing for 'latent', 'cot' and 'nocot' (the reference's CoT count is in every
    explicit generation's ``reference_length``)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}; got {protocol!r}")
    reference = protocol == "reference"
    generator = None
    if seed is not None:
        generator = torch.Generator(device=model.device).manual_seed(seed)
    was_training = model.training
    model.eval()
    out: list[Generation] = []
    try:
        for start in range(0, len(questions), gen.batch_size):
            chunk = list(questions[start: start + gen.batch_size])
            if mode == "latent":
                out.extend(generate_latent(model, encoder, chunk, compression, gen, generator, stop=stop))
            elif mode in ("cot", "nocot"):
                out.extend(generate_text(model, encoder, chunk, 1, gen, generator, stop=stop))
            elif mode == "icot" and reference:
                out.extend(generate_text(model, encoder, chunk, None, gen, generator, chain_ends_at_answer=True,
                                         stop=stop, max_new_tokens=REFERENCE_NEW_TOKENS))
            elif mode == "icot":
                out.extend(generate_text(model, encoder, chunk, AUTO_SPEED, gen, generator,
                                         chain_ends_at_answer=True, stop=stop))
            elif reference:
                out.extend(generate_thoughts(model, encoder, chunk, REFERENCE_THOUGHTS, gen, generator, stop,
                                             isolated=True, max_new_tokens=REFERENCE_NEW_TOKENS))
            else:
                out.extend(generate_thoughts(model, encoder, chunk, model.state.n_thoughts, gen, generator, stop))
    finally:
        model.train(was_training)
    return out
