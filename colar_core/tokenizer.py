"""Tokenizers for CoLaR: a tiny word-level one built from the data, and preparing any HF one.

Why a custom tokenizer: CoLaR merges ``r`` consecutive step-token embeddings by *summing* them,
so order inside a group is lost. With one token per digit, "12" and "21" merge alike (measured:
docs/BENCHMARKS.md, "Order-aware merge vs digit tokens"). :func:`build_tokenizer` therefore keeps
every integer ``0..max_number`` (with and without a leading space) as ONE token, plus every word
seen in the data and in the fixed training prompt, so ``decode(encode(text)) == text`` for data
text. ``numbers="digits"`` instead splits every number into single digits first (as SmolLM2's,
Qwen's or Mistral's tokenizers do), to measure what that costs.

How: GPT-2 style byte-level pre-tokenization (``use_regex=True``, no prefix space) splits text
into words, numbers, punctuation runs and whitespace; a WordPiece model whose vocabulary holds
those pre-tokens whole maps each to one id. Every byte-level character (and a continuation form
of it) is in the vocabulary too, so an unseen word falls back to shorter pieces and characters
instead of ``<unk>``: it still round-trips exactly. ``###`` (opens/closes thinking) is an added
token, matched before pre-tokenization, so it is one id even in ``)###Answer``.

Its start-token rule is Llama's: ``<bos>`` before a text encoded with special tokens (the saved
``add_bos_token``), which :class:`colar_core.text.PromptEncoder` follows as it follows any
tokenizer's own rule; no EOS is added automatically (the training code appends ``<eos>`` itself).
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Iterable

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from .text import ANSWER_PREFIX, THINK, full_text, question_text, speed_text, steps_text

__all__ = ["THINK_TOKEN", "SPECIAL_TOKENS", "build_tokenizer", "prepare_tokenizer", "load_tokenizer", "is_word_level",
           "training_texts"]

THINK_TOKEN = THINK  # "###", defined once in colar_core.text
PAD, EOS, BOS, UNK = "<pad>", "<eos>", "<bos>", "<unk>"
SPECIAL_TOKENS = (PAD, EOS, BOS, UNK)
#: Prefix marking a WordPiece continuation piece; U+2023 is outside the byte-level alphabet,
#: so it can never collide with real text (``##`` would collide with ``###``).
_CONT = "\u2023"
#: Compression factors written into prompts ("Thinking speed: r"); 1..16 and "auto".
_SPEEDS = [*range(1, 17), "auto"]


def training_texts(record, speeds: Iterable = (1,)) -> list[str]:
    """The texts the model sees for ``record``: the full training string per speed (see
    :mod:`colar_core.text`) plus the pieces :class:`colar_core.text.PromptEncoder` tokenizes on
    their own (question, speed suffix, steps, answer)."""
    full = [full_text(record.question, record.steps, record.answer, r) for r in speeds]
    pieces = [question_text(record.question), *(speed_text(r) for r in speeds),
              steps_text(record.steps), f"{ANSWER_PREFIX}{record.answer}"]
    return full + pieces


NUMBER_MODES = ("whole", "digits")


def _pre_tokenizer(numbers: str = "whole") -> pre_tokenizers.PreTokenizer:
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if numbers == "whole":
        return byte_level
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])


def build_tokenizer(records: Iterable, out_dir: str | Path | None = None, max_number: int = 1000,
                    extra_texts: Iterable[str] = (), numbers: str = "whole"):
    """Word-level tokenizer for ``records`` (see module docstring); saved to ``out_dir`` if given.

    ``numbers``: ``"whole"`` keeps ``0..max_number`` as one token each; ``"digits"`` splits every
    number into digits (``max_number`` is then unused) and a leading space is its own token.

    Returns a ``PreTrainedTokenizerFast`` with pad ``<pad>``, eos ``<eos>``, bos ``<bos>``, unk
    ``<unk>`` and ``###`` as one token; ``AutoTokenizer.from_pretrained(out_dir)`` reloads it.
    Ids are deterministic for the same input: specials, characters, numbers, then words by
    descending frequency (ties alphabetical).
    """
    from transformers import PreTrainedTokenizerFast  # heavy: only when a tokenizer is built

    if numbers not in NUMBER_MODES:
        raise ValueError(f"numbers must be one of {NUMBER_MODES}, got {numbers!r}")
    pre = _pre_tokenizer(numbers)
    counts: Counter[str] = Counter()

    def add(text: str) -> None:
        counts.update(piece for piece, _ in pre.pre_tokenize_str(text))

    # Fixed prompt text, both as one string and in the pieces the trainer tokenizes separately.
    for r in _SPEEDS:
        add(speed_text(r))
        add(full_text("x", (), "1", r))
    for text in (f"{ANSWER_PREFIX}", "\n", " "):
        add(text)
    for record in records:  # the pieces between the ``###`` of the training text
        add(question_text(record.question))
        add(steps_text(record.steps))
        add(f"{ANSWER_PREFIX}{record.answer}")
    for text in extra_texts:
        for part in text.split(THINK_TOKEN):
            add(part)

    vocab: dict[str, int] = {}

    def put(token: str) -> None:
        if token not in vocab:
            vocab[token] = len(vocab)

    for token in (*SPECIAL_TOKENS, THINK_TOKEN):
        put(token)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    for ch in alphabet:
        put(ch)
    for ch in alphabet:
        put(_CONT + ch)
    number_texts = [t for n in range(max_number + 1) for t in (str(n), f" {n}")] if numbers == "whole" \
        else [str(d) for d in range(10)]
    for text in number_texts:
        (piece,) = [p for p, _ in pre.pre_tokenize_str(text)]
        put(piece)
    for token, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        put(token)

    model = models.WordPiece(vocab=vocab, unk_token=UNK, continuing_subword_prefix=_CONT,
                             max_input_chars_per_word=10_000)
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre
    tok.decoder = decoders.Sequence([decoders.Replace(_CONT, ""), decoders.ByteLevel()])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(THINK_TOKEN, special=False, normalized=False)])

    hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS, bos_token=BOS,
                                 unk_token=UNK, clean_up_tokenization_spaces=False, add_bos_token=True)
    hf = prepare_tokenizer(hf)
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        hf.save_pretrained(str(out_dir))
    return hf


def prepare_tokenizer(tokenizer):
    """Make any HF tokenizer CoLaR-ready, in place; returns it.

    * a pad token: the EOS token when there is one (no new embedding needed), else ``<pad>``;
    * ``###`` as exactly one id with ``add_special_tokens=False``: registered as an added
      (non-special, unnormalized) token so it is matched before pre-tokenization, even when the
      vocabulary already has it (then its id is reused and the vocabulary does not grow).

    Callers that add tokens must resize the model's embeddings to ``len(tokenizer)``.
    """
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        else:
            tokenizer.add_special_tokens({"pad_token": PAD})
    if THINK_TOKEN not in tokenizer.get_added_vocab():
        tokenizer.add_tokens([AddedToken(THINK_TOKEN, special=False, normalized=False,
                                         lstrip=False, rstrip=False, single_word=False)])
    ids = tokenizer.encode(THINK_TOKEN, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"could not make '{THINK_TOKEN}' a single token (got ids {ids})")
    return tokenizer


def is_word_level(tokenizer) -> bool:
    """True for a tokenizer made by :func:`build_tokenizer` (a WordPiece model on colar's
    continuation prefix)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return getattr(getattr(backend, "model", None), "continuing_subword_prefix", None) == _CONT


def load_tokenizer(path_or_id: str, trust_remote_code: bool = False):
    """``AutoTokenizer.from_pretrained`` (local dir, cached hub id, or a GGUF file: its converted
    folder, :mod:`colar_core.gguf_import`) followed by :func:`prepare_tokenizer`."""
    from transformers import AutoTokenizer  # heavy: only when a tokenizer is loaded

    from .gguf_import import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(str(path_or_id)), trust_remote_code=trust_remote_code)
    if is_word_level(tokenizer) and not tokenizer.add_bos_token:
        # saved before its rule was written into it: <bos> first, as it trained (type: ignore: transformers
        # defines the setter apart from its getter, which mypy misses)
        tokenizer.add_bos_token = True  # type: ignore[misc]
    return prepare_tokenizer(tokenizer)
