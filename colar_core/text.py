"""The exact training text, and its encoding into token-id pieces.

A record becomes (paper, no chat template)::

    Question: {q} Let's think step by step:(Thinking speed: {r})###{step1}\\n{step2}###Answer:{a}<eos>

The pieces are tokenized separately (question, speed suffix, steps, answer) so that the speed
suffix can be swapped per batch without re-tokenizing, and so that training and inference build
byte-identical prompts. ``###`` must be a single token (see ``colar_core.tokenizer``).

The start token follows each tokenizer's own rule (:func:`start_token_ids`): what the tokenizer puts
before a text when asked for its special tokens. Llama-3 adds ``<|begin_of_text|>``, colar's
word-level tokenizer ``<bos>``; SmolLM2 (whose BOS ``<|im_start|>`` opens chat turns and never began
plain text in training), GPT-2 and Qwen2 add nothing. Every other piece is encoded without special
tokens, as the reference encodes everything (``add_special_tokens=False``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

THINK = "###"
ANSWER_PREFIX = "Answer:"
AUTO_SPEED = "auto"

Speed = Union[int, str]


def extract_answer(text: str) -> str:
    """The part of a model's output that is scored, exactly as the reference extracts it
    (``LitCoTModelBase.extract_answer_from_output``: ``text.split("Answer:")[1]``): the text after the
    first ``Answer:`` up to the next one if there are several, or the whole output when there is no
    ``Answer:``. Returned as is; :func:`answers_match` cleans it."""
    pieces = text.split(ANSWER_PREFIX)
    return pieces[1] if len(pieces) > 1 else text


def question_text(question: str) -> str:
    return f"Question: {question} Let's think step by step:"


def speed_text(r: Speed) -> str:
    return f"(Thinking speed: {r})"


def steps_text(steps: Sequence[str]) -> str:
    return "\n".join(steps)


def full_text(question: str, steps: Sequence[str], answer: str, r: Speed = 1) -> str:
    """The whole training string (without BOS/EOS), for display and tokenizer tests."""
    return f"{question_text(question)}{speed_text(r)}{THINK}{steps_text(steps)}{THINK}{ANSWER_PREFIX}{answer}"


def start_token_ids(tokenizer) -> tuple[int, ...]:
    """The ids ``tokenizer`` itself puts before a text: the difference between encoding a probe
    with and without special tokens, up to where the plain encoding starts (empty when the
    tokenizer adds nothing in front, or when the two do not line up)."""
    probe = question_text("1 + 2")
    plain = tokenizer.encode(probe, add_special_tokens=False)
    full = tokenizer.encode(probe, add_special_tokens=True)
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return tuple(full[:start])
    return ()


@dataclass(frozen=True)
class EncodedExample:
    """Token ids of one record. ``answer_ids`` starts with the closing ``###`` and ends with EOS."""

    question_ids: tuple[int, ...]
    step_ids: tuple[int, ...]
    answer_ids: tuple[int, ...]
    answer: str


class PromptEncoder:
    """Turns records and questions into the token-id pieces of the training text.

    Holds the ids every batch needs (``###``, pad, EOS, the speed suffixes) so they are
    computed once per tokenizer. A question starts with the tokenizer's own start tokens
    (:func:`start_token_ids`; ``add_bos=False``: none), unless one of them is its EOS (which would
    read as the end of a text).
    """

    def __init__(self, tokenizer, add_bos: bool = True):
        self.tokenizer = tokenizer
        think = tokenizer.encode(THINK, add_special_tokens=False)
        if len(think) != 1:
            raise ValueError(
                f"tokenizer splits '{THINK}' into {len(think)} tokens; run colar_core.tokenizer.prepare_tokenizer first"
            )
        self.think_id: int = think[0]
        if tokenizer.pad_token_id is None:
            raise ValueError("tokenizer has no pad token; run colar_core.tokenizer.prepare_tokenizer first")
        if tokenizer.eos_token_id is None:
            raise ValueError("tokenizer has no EOS token")
        self.pad_id: int = tokenizer.pad_token_id
        self.eos_id: int = tokenizer.eos_token_id
        start = start_token_ids(tokenizer) if add_bos else ()
        self.bos_ids: tuple[int, ...] = () if self.eos_id in start else start
        self._speed_cache: dict[str, tuple[int, ...]] = {}
        self.answer_prefix_ids = tuple(self._encode(ANSWER_PREFIX))

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False) if text else []

    def speed_ids(self, r: Speed) -> tuple[int, ...]:
        key = str(r)
        if key not in self._speed_cache:
            self._speed_cache[key] = tuple(self._encode(speed_text(r)))
        return self._speed_cache[key]

    def encode_question(self, question: str) -> tuple[int, ...]:
        return self.bos_ids + tuple(self._encode(question_text(question)))

    def encode(self, record, with_steps: bool = True) -> EncodedExample:
        """Encode a record (anything with question/steps/answer). ``with_steps=False`` drops the chain (no-CoT)."""
        steps = tuple(self._encode(steps_text(record.steps))) if with_steps else ()
        answer = (self.think_id,) + tuple(self._encode(f"{ANSWER_PREFIX}{record.answer}")) + (self.eos_id,)
        return EncodedExample(self.encode_question(record.question), steps, answer, str(record.answer))

    def prompt_ids(self, question_ids: Sequence[int], r: Speed) -> tuple[int, ...]:
        """Question + speed suffix + opening ``###``: what inference feeds before the first latent."""
        return tuple(question_ids) + self.speed_ids(r) + (self.think_id,)

    def decode(self, ids: Sequence[int]) -> str:
        """Decode generated ids, stopping at EOS and keeping ``###`` (it may be a special token)."""
        out: list[int] = []
        for i in ids:
            if i == self.eos_id or i == self.pad_id:
                break
            out.append(int(i))
        pieces, start = [], 0
        for k, i in enumerate(out + [self.think_id]):
            if i == self.think_id:
                pieces.append(self.tokenizer.decode(out[start:k], skip_special_tokens=False) if k > start else "")
                start = k + 1
        return THINK.join(pieces)
