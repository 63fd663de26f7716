"""What a latent chain holds, step by step, beside the chain-of-thought text the same model writes.

A CoLaR latent is fed to the model as an input embedding (the head's sample times the embedding
scale), so it can be read against the vocabulary: at compression factor 1 a latent is trained to be
the embedding of one reasoning token, at ``c`` the sum of ``c`` token embeddings over ``sqrt(c)``
(colar_core.merging). For each latent step of one generation this module reports

- ``nearest``: the vocabulary tokens whose input embeddings are nearest to the latent times the
  embedding scale (cosine similarity; cosine ignores the scale, the norm ratio below does not);
- ``predicted``: the tokens the LM head predicts at that latent's position (softmax at temperature 1,
  the distribution the ``###`` stop check samples from; a trained chain predicts a token of the next
  group there, and ``###`` where it ends);
- ``sigma``: the mean standard deviation of the latent head's Gaussian the latent was drawn from
  (read from the hidden state before it; ~5e-5 for a deterministic head);
- ``norm``: the latent's norm times the scale over the mean norm of an input-embedding row (about 1
  for a trained latent: a group of ``c`` near-orthogonal rows summed and divided by ``sqrt(c)`` keeps
  one row's size).

The steps come from one ordinary generation (:func:`~colar_core.inference.generate_latent` with
``return_trace``: its ``hidden`` states), so what is shown is what evaluation decodes; nothing is
re-run. :func:`cot_chains` is the explicit CoT decoding of :func:`~colar_core.inference.generate_text`.

Alignment (:func:`chain_place`): latent ``k`` (0-based) stands for tokens ``[k*c, (k+1)*c)`` of the
chain (training merges the chain's tokens in groups of ``c``, the first latent predicted from the
opening ``###``). :func:`number_hit` asks whether a latent's nearest tokens hold a number of the
chain at that place; the renderers mark such tokens and ``bench/thoughts.py`` counts them.

Renderers: :func:`render_text` (a terminal), :func:`render_markdown` (a Prefect artifact) and
:func:`render_html` (one self-contained page: inline CSS, no script, no external asset; every text
escaped). Nothing here knows Prefect or MLflow.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from colar_core.config import GenerationConfig
from colar_core.inference import generate_latent, generate_text
from colar_core.number_tokens import input_embedding_table
from colar_core.text import THINK, PromptEncoder, Speed, steps_text

__all__ = ["LatentChain", "LatentStep", "QuestionThoughts", "Scored", "TextChain", "as_number", "chain_place",
           "cot_chains", "inspect_questions", "latent_chains", "number_hit", "place_hits", "render_html", "render_markdown",
           "reference_chain", "render_text", "token_text"]

#: How many tokens each list shows by default.
TOP_K = 5
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


@dataclass(frozen=True)
class Scored:
    """One vocabulary token (its text as the tokenizer decodes it alone) and a score."""

    token: str
    score: float


@dataclass(frozen=True)
class LatentStep:
    """One latent of a chain (module docstring): ``index`` 0-based."""

    index: int
    nearest: tuple[Scored, ...]  # cosine similarity to input-embedding rows, best first
    predicted: tuple[Scored, ...]  # LM-head probability at this latent's position, best first
    sigma: float
    norm: float


@dataclass(frozen=True)
class LatentChain:
    """One latent generation of one question at compression factor ``compression``."""

    compression: Speed
    steps: tuple[LatentStep, ...]
    text: str  # what was decoded after the closing '###' (e.g. 'Answer:23')
    answer: Optional[str]

    @property
    def n_steps(self) -> int:
        return len(self.steps)


@dataclass(frozen=True)
class TextChain:
    """An explicit chain of thought: ``chain`` is the text before the closing ``###`` and ``tokens``
    its tokens (each decoded alone), ``text`` the whole output."""

    label: str
    chain: str
    tokens: tuple[str, ...]
    text: str
    answer: Optional[str]


@dataclass(frozen=True)
class QuestionThoughts:
    """Everything the page shows about one question: its latent chains (one per compression factor),
    its explicit chains (the same model's CoT first), and the data's chain and answer when known."""

    question: str
    latent: tuple[LatentChain, ...]
    cot: tuple[TextChain, ...] = ()
    reference: Optional[TextChain] = None
    gold: Optional[str] = None


# ---- tokens and alignment -----------------------------------------------------------------------

def token_text(tokenizer, token_id: int) -> str:
    """The text of one token id decoded alone (special tokens included); ``<id N>`` for an id the
    tokenizer cannot decode (rows of an embedding table padded beyond the vocabulary)."""
    try:
        text = tokenizer.decode([int(token_id)], skip_special_tokens=False)
    except (IndexError, KeyError, ValueError, TypeError, OverflowError):
        text = ""
    return text if text else f"<id {int(token_id)}>"


def as_number(token: str) -> Optional[str]:
    """The number a token spells (spaces around it ignored; ``'007'`` reads as ``'7'``), else None."""
    text = token.strip()
    if not _NUMBER.fullmatch(text):
        return None
    value = float(text)
    return str(int(value)) if value == int(value) else repr(value)


def chain_place(tokens: Sequence[str], compression: Speed, index: int) -> tuple[str, ...]:
    """The chain tokens latent ``index`` (0-based) stands for at ``compression``: ``tokens[index*c:
    (index+1)*c]`` (empty past the chain's end, and for a speed that is not a number such as 'auto')."""
    if not isinstance(compression, int) and not str(compression).isdigit():
        return ()
    c = int(compression)
    return tuple(tokens[index * c: (index + 1) * c])


def number_hit(step: LatentStep, place: Sequence[str], top_k: Optional[int] = None) -> Optional[bool]:
    """Whether the ``top_k`` nearest tokens of ``step`` (all it holds when None) spell a number that
    ``place`` (:func:`chain_place`) holds; None when ``place`` holds no number."""
    wanted = {n for t in place if (n := as_number(t)) is not None}
    if not wanted:
        return None
    return any(as_number(s.token) in wanted for s in step.nearest[:top_k])


# ---- tracing ------------------------------------------------------------------------------------

def _generator(model, seed: Optional[int]) -> Optional[torch.Generator]:
    return None if seed is None else torch.Generator(device=model.device).manual_seed(seed)


class _Names:
    """Token texts, each decoded once, on demand (a 128k vocabulary is not decoded whole)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.cache = tokenizer, {}

    def __call__(self, token_id: int) -> str:
        if token_id not in self.cache:
            self.cache[token_id] = token_text(self.tokenizer, token_id)
        return self.cache[token_id]


def _top(scores: torch.Tensor, top_k: int, name: _Names) -> tuple[Scored, ...]:
    values, ids = scores.topk(min(top_k, scores.shape[-1]))
    return tuple(Scored(name(i), float(v)) for v, i in zip(values.tolist(), ids.tolist()))


@torch.no_grad()
def latent_chains(model, encoder: PromptEncoder, questions: Sequence[str], compression: Speed,
                  gen: GenerationConfig = GenerationConfig(), seed: Optional[int] = 0,
                  top_k: int = TOP_K) -> list[LatentChain]:
    """One latent generation per question at ``compression`` (in batches of ``gen.batch_size``, one
    generator seeded with ``seed`` across them, as :func:`~colar_core.inference.generate`), read step
    by step (module docstring)."""
    was_training = model.training
    model.eval()
    try:
        generator = _generator(model, seed)
        table = input_embedding_table(model.causal_lm).detach()  # in its own dtype: no float copy of a big table
        vocab = min(table.shape[0], len(encoder.tokenizer))
        names = _Names(encoder.tokenizer)
        table_norms = torch.linalg.vector_norm(table, dim=-1, dtype=torch.float32).clamp(min=1e-12)
        row_norm = float(table_norms[:vocab].mean())
        scale = model.state.embedding_scale
        out: list[LatentChain] = []
        for start in range(0, len(questions), gen.batch_size):
            chunk = list(questions[start: start + gen.batch_size])
            gens, trace = generate_latent(model, encoder, chunk, compression, gen, generator, return_trace=True)
            for i, g in enumerate(gens):
                n = int(trace.latent_mask[i].sum())
                latents = trace.latents[i, :n].float() * scale  # [n, H]: what was fed as input embeddings
                unit = F.normalize(latents, dim=-1)
                cosine = (unit.to(table.dtype) @ table.T).float() / table_norms
                cosine[:, vocab:] = float("-inf")
                probs = torch.softmax(model.token_logits(trace.hidden[i, 1: n + 1]).float(), dim=-1)
                probs[:, vocab:] = 0.0
                _, log_std = model.latent_head(trace.hidden[i, :n])
                sigma = log_std.float().exp().mean(-1)
                norms = latents.norm(dim=-1) / row_norm
                steps = tuple(LatentStep(k, _top(cosine[k], top_k, names), _top(probs[k], top_k, names),
                                         float(sigma[k]), float(norms[k])) for k in range(n))
                out.append(LatentChain(compression, steps, g.text, g.answer))
        return out
    finally:
        model.train(was_training)


def _text_chain(encoder: PromptEncoder, label: str, chain: str, chain_ids: Sequence[int], text: str,
                answer: Optional[str]) -> TextChain:
    names = _Names(encoder.tokenizer)
    return TextChain(label, chain, tuple(names(int(t)) for t in chain_ids), text, answer)


@torch.no_grad()
def cot_chains(model, encoder: PromptEncoder, questions: Sequence[str], label: str = "CoT",
               gen: GenerationConfig = GenerationConfig(), seed: Optional[int] = 0) -> list[TextChain]:
    """The explicit chain each question gets from ``model`` after ``(Thinking speed: 1)###`` (the CoT
    decoding of evaluation), with its tokens."""
    was_training = model.training
    model.eval()
    try:
        generator = _generator(model, seed)
        out: list[TextChain] = []
        for start in range(0, len(questions), gen.batch_size):
            chunk = list(questions[start: start + gen.batch_size])
            for g in generate_text(model, encoder, chunk, 1, gen, generator):
                chain_text = g.text.split(THINK)[0]
                ids = encoder.tokenizer.encode(chain_text, add_special_tokens=False) if chain_text else []
                out.append(_text_chain(encoder, label, chain_text, ids, g.text, g.answer))
        return out
    finally:
        model.train(was_training)


def reference_chain(encoder: PromptEncoder, record) -> TextChain:
    """The data's chain of ``record`` as training tokenizes it (its steps joined by newlines)."""
    enc = encoder.encode(record)
    return _text_chain(encoder, "data", steps_text(record.steps), enc.step_ids, "", str(record.answer))


def inspect_questions(model, encoder: PromptEncoder, questions: Sequence[str], factors: Sequence[Speed],
                      gen: GenerationConfig = GenerationConfig(), seed: Optional[int] = 0, top_k: int = TOP_K,
                      cot_label: Optional[str] = "CoT (same model)", records: Optional[Sequence] = None,
                      extra_cot: Sequence[Sequence[TextChain]] = ()) -> list[QuestionThoughts]:
    """Each question's latent chains at every factor of ``factors`` and, unless ``cot_label`` is None,
    the CoT text ``model`` writes for it; ``extra_cot``: more explicit chains per question (e.g. the CoT
    model's, from :func:`cot_chains`), shown after it; ``records``: the data's record of each question
    (its chain and answer are shown too)."""
    by_factor = [latent_chains(model, encoder, questions, c, gen, seed, top_k) for c in factors]
    cots: list[Sequence[TextChain]] = [cot_chains(model, encoder, questions, cot_label, gen, seed)] \
        if cot_label is not None else []
    cots.extend(extra_cot)
    out = []
    for i, q in enumerate(questions):
        record = records[i] if records is not None else None
        out.append(QuestionThoughts(
            question=q, latent=tuple(chains[i] for chains in by_factor), cot=tuple(chains[i] for chains in cots),
            reference=reference_chain(encoder, record) if record is not None and record.steps else None,
            gold=str(record.answer) if record is not None else None))
    return out


# ---- renderers ----------------------------------------------------------------------------------

def _visible(token: str) -> str:
    """A token with its whitespace made visible (a space is ``␣``, a newline ``↵``, a tab ``⇥``)."""
    return token.replace(" ", "\u2423").replace("\n", "\u21b5").replace("\t", "\u21e5")


def _place_tokens(q: QuestionThoughts, chain: LatentChain, index: int) -> tuple[str, ...]:
    """What the page compares latent ``index`` with: the data's chain when known, else the first CoT."""
    source = q.reference or (q.cot[0] if q.cot else None)
    return chain_place(source.tokens, chain.compression, index) if source is not None else ()


def _place_numbers(place: Sequence[str]) -> set[str]:
    return {n for t in place if (n := as_number(t)) is not None}


def place_hits(q: QuestionThoughts, chain: LatentChain, top_k: Optional[int] = None) -> tuple[int, int]:
    """``(hits, places)``: of the latent steps whose place in the compared chain (the data's, else the
    first CoT) holds a number, how many have it among their ``top_k`` nearest tokens."""
    marks = [number_hit(step, _place_tokens(q, chain, step.index), top_k) for step in chain.steps]
    return sum(m is True for m in marks), sum(m is not None for m in marks)


def _compared_with(q: QuestionThoughts) -> str:
    if q.reference is not None:
        return "the data's chain"
    return f"{q.cot[0].label}" if q.cot else ""


def render_text(thoughts: Sequence[QuestionThoughts], top_k: int = TOP_K) -> str:
    """The questions as plain text for a terminal. A nearest token marked ``*`` spells a number the
    compared chain (the data's, else the first CoT) holds at that latent's place."""
    lines: list[str] = []
    for n, q in enumerate(thoughts, 1):
        lines.append(f"Question {n}: {q.question}")
        if q.reference is not None:
            lines.append(f"  data chain: {q.reference.chain!r}   answer: {q.gold}")
        for cot in q.cot:
            lines.append(f"  {cot.label}: {cot.chain!r} -> {cot.answer!r} ({len(cot.tokens)} chain tokens)")
        for chain in q.latent:
            hits, places = place_hits(q, chain, top_k)
            lines.append(f"  c={chain.compression}: {chain.n_steps} latent steps -> answer {chain.answer!r} "
                         f"(decoded {chain.text!r}); numbers at their place: {hits}/{places}")
            lines.append(f"    {'step':>4}  {'sigma':>8}  {'norm':>5}  {'place':<14}  nearest tokens (cosine) "
                         f"| LM head next (p)")
            for step in chain.steps:
                place = _place_tokens(q, chain, step.index)
                wanted = _place_numbers(place)
                near = ", ".join(("*" if as_number(s.token) in wanted else "") + f"{_visible(s.token)} {s.score:.2f}"
                                 for s in step.nearest[:top_k])
                pred = ", ".join(f"{_visible(s.token)} {s.score:.2f}" for s in step.predicted[:top_k])
                lines.append(f"    {step.index + 1:>4}  {step.sigma:>8.2g}  {step.norm:>5.2f}  "
                             f"{_visible(''.join(place))[:14]:<14}  {near} | {pred}")
        if any(c.steps for c in q.latent) and _compared_with(q):
            lines.append(f"  (place: the tokens of {_compared_with(q)} a latent stands for; * marks a nearest "
                         "token that spells a number there)")
        lines.append("")
    return "\n".join(lines)


def _md(text: str, visible: bool = False) -> str:
    """Text safe on one markdown line or table cell: HTML and markdown specials escaped, newlines as
    spaces (``visible``: a token or chain, its whitespace shown as :func:`_visible` does)."""
    text = _visible(text) if visible else " ".join(text.split())
    return re.sub(r"([\\`*_{}\[\]()#+!|~>-])", r"\\\1", html.escape(text, quote=False))


def render_markdown(thoughts: Sequence[QuestionThoughts], top_k: int = 3) -> str:
    """A compact markdown summary (a Prefect artifact): per question a table with one row per chain:
    its length, its answer and, for a latent chain, each step's nearest tokens."""
    out: list[str] = []
    for n, q in enumerate(thoughts, 1):
        out.append(f"**Question {n}.** {_md(q.question)}" + (f" (answer {_md(q.gold)})" if q.gold is not None else ""))
        out.append("")
        out.append("| chain | length | answer | thoughts |")
        out.append("| --- | --- | --- | --- |")
        if q.reference is not None:
            out.append(f"| data | {len(q.reference.tokens)} tokens | {_md(q.gold or '')} "
                       f"| {_md(q.reference.chain, True)} |")
        for cot in q.cot:
            out.append(f"| {_md(cot.label)} | {len(cot.tokens)} tokens | {_md(str(cot.answer))} | {_md(cot.chain, True)} |")
        for chain in q.latent:
            steps = " · ".join("/".join(_md(s.token, True) for s in step.nearest[:top_k]) for step in chain.steps)
            out.append(f"| c={_md(str(chain.compression))} | {chain.n_steps} latents | {_md(str(chain.answer))} "
                       f"| {steps} |")
        out.append("")
    out.append(f"Latent steps: the {top_k} nearest vocabulary tokens of each latent (cosine to the input embeddings), "
               "separated by ·.")
    return "\n".join(out)


_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:1.5em;color:#1d2329;background:#fff}
h1{font-size:1.3em;margin:0 0 .3em}h2{font-size:1.05em;margin:1.6em 0 .4em}
.note{color:#59636e;font-size:.85em;max-width:70em}
.q{border-top:2px solid #d0d7de;padding-top:.4em}
.cols{display:flex;gap:1.5em;align-items:flex-start;flex-wrap:wrap}
.lat{flex:3 1 40em}.cot{flex:2 1 22em}
table{border-collapse:collapse;font-size:.82em;margin:.3em 0 1em}
th,td{border:1px solid #d0d7de;padding:2px 6px;text-align:left;vertical-align:top}
th{background:#f3f5f7}td.n{text-align:right;font-variant-numeric:tabular-nums}
.tok{display:inline-block;font-family:ui-monospace,Menlo,Consolas,monospace;border-radius:3px;padding:0 3px;
margin:1px 2px 1px 0;white-space:pre;border:1px solid transparent}
.hit{outline:2px solid #1a7f37;outline-offset:-1px;font-weight:bold}.end{color:#8250df}
pre{background:#f6f8fa;border:1px solid #d0d7de;border-radius:4px;padding:.5em;white-space:pre-wrap;
font-size:.85em;margin:.2em 0 .8em}
.meta{font-size:.85em;color:#59636e}
"""


def _chip(scored: Scored, rgb: str, strength: float, hit: bool = False) -> str:
    alpha = max(0.08, min(1.0, strength)) * 0.55
    cls = "tok hit" if hit else "tok"
    if scored.token.strip() == THINK:
        cls += " end"
    return (f'<span class="{cls}" style="background:rgba({rgb},{alpha:.2f})" '
            f'title="{html.escape(f"{scored.score:.3f}")}">{html.escape(_visible(scored.token))}</span>')


def _latent_table(q: QuestionThoughts, chain: LatentChain, top_k: int) -> str:
    rows = []
    for step in chain.steps:
        place = _place_tokens(q, chain, step.index)
        wanted = _place_numbers(place)
        near = "".join(_chip(s, "9,105,218", s.score, as_number(s.token) in wanted) for s in step.nearest[:top_k])
        pred = "".join(_chip(s, "130,80,223", s.score) for s in step.predicted[:top_k])
        place_html = "".join(f'<span class="tok">{html.escape(_visible(t))}</span>' for t in place)
        rows.append(f'<tr><td class="n">{step.index + 1}</td><td>{place_html}</td><td>{near}</td><td>{pred}</td>'
                    f'<td class="n">{step.sigma:.3g}</td><td class="n">{step.norm:.2f}</td></tr>')
    head = ('<tr><th>step</th><th>place</th><th>nearest tokens (cosine)</th><th>LM head next (p)</th>'
            '<th>&sigma;</th><th>norm</th></tr>')
    hits, places = place_hits(q, chain, top_k)
    title = (f'<div><b>c = {html.escape(str(chain.compression))}</b>: {chain.n_steps} latent steps, answer '
             f'<code>{html.escape(str(chain.answer))}</code> <span class="meta">(decoded '
             f'<code>{html.escape(chain.text)}</code>; numbers at their place: {hits}/{places})</span></div>')
    return title + f"<table>{head}{''.join(rows)}</table>"


def render_html(thoughts: Sequence[QuestionThoughts], title: str = "colar: latent thoughts", top_k: int = TOP_K,
                subtitle: str = "") -> str:
    """One self-contained HTML page (inline CSS; no script, font or image to fetch): per question its
    latent chains as tables (each step's place in the compared chain, nearest tokens, LM-head tokens,
    sigma, norm ratio), beside the explicit chains. Every text is escaped."""
    parts = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
             f"<style>{_CSS}</style></head><body>", f"<h1>{html.escape(title)}</h1>"]
    if subtitle:
        parts.append(f'<p class="meta">{html.escape(subtitle)}</p>')
    parts.append(
        '<p class="note">Each latent step: the vocabulary tokens whose input embeddings are nearest to the latent '
        "(cosine; the latent times the embedding scale is what the model reads as its next input), the tokens the "
        "LM head predicts at that position (<span class=\"tok end\">###</span> ends the chain), the latent head's "
        "&sigma; (mean over dimensions) and the latent's norm over a token embedding's. <i>place</i>: the tokens of "
        "the compared chain (the data's when known, else the first CoT) this latent stands for at its compression "
        "factor c (latent k, from 0: chain tokens k&middot;c to (k+1)&middot;c &minus; 1); a nearest token framed in green spells a "
        "number found there.</p>")
    for n, q in enumerate(thoughts, 1):
        parts.append(f'<section class="q"><h2>Question {n}</h2><p>{html.escape(q.question)}</p>')
        if q.gold is not None:
            parts.append(f'<p class="meta">answer in the data: <code>{html.escape(q.gold)}</code></p>')
        parts.append('<div class="cols"><div class="lat">')
        parts.extend(_latent_table(q, chain, top_k) for chain in q.latent)
        parts.append('</div><div class="cot">')
        texts = ([q.reference] if q.reference is not None else []) + list(q.cot)
        for chain in texts:
            label = "the data's chain" if chain is q.reference else chain.label
            parts.append(f"<div><b>{html.escape(label)}</b> <span class=\"meta\">({len(chain.tokens)} tokens"
                         + (f", answer <code>{html.escape(str(chain.answer))}</code>" if chain.answer is not None else "")
                         + f")</span></div><pre>{html.escape(chain.chain)}</pre>")
        parts.append("</div></div></section>")
    parts.append("</body></html>\n")
    return "".join(parts)
