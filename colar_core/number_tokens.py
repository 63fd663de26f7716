"""Whole-number tokens for a pretrained tokenizer that splits numbers into digits.

CoLaR sums the embeddings of a group, so with digit tokens "12" and "21" merge alike. A tokenizer
like Llama-3's keeps numbers up to 999 whole; SmolLM2, Qwen and Mistral split them into digits.
:func:`add_number_tokens` gives such a tokenizer every integer ``0..N`` as one token, with and
without a leading space (``"12"``, ``" 12"``), and :func:`init_number_embeddings` starts each new
embedding as the mean of the embeddings of the pieces the tokenizer used for it before (and the
same for an untied LM-head row), so a new token starts where its digits pointed, then trains.

How the tokens are picked: they are *added tokens* (non-special, unnormalized), which a Hugging
Face fast tokenizer matches in the raw text, longest first, before its own pre-tokenization; so
``"12"`` encodes as one id and ``" 12"`` as one id (the space included). A longer number is cut
into whole-number pieces from the left (with N = 999, ``"1234"`` is ``"123"`` + ``"4"``), and a
number inside a word is matched too (``"x12"`` is ``"x"`` + ``"12"``).

With LoRA, the embedding table must be trained for the new rows to learn: list ``embed_tokens``
(and an untied ``lm_head``) in ``model.lora.modules_to_save``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # heavy: the caller has loaded transformers already
    from transformers import PreTrainedModel

__all__ = ["number_token_texts", "add_number_tokens", "init_number_embeddings", "input_embedding_table"]


def number_token_texts(max_number: int) -> list[str]:
    """``"0", " 0", "1", " 1", ..., str(N), " N"``."""
    if max_number < 0:
        raise ValueError(f"max_number must be >= 0, got {max_number}")
    return [text for n in range(max_number + 1) for text in (str(n), f" {n}")]


def add_number_tokens(tokenizer, max_number: int) -> dict[int, list[int]]:
    """Add the whole numbers ``0..max_number`` (see the module docstring) to ``tokenizer`` in place.

    Returns ``{new id: ids of the pieces the tokenizer used for that text before}`` for every token
    that is new (a tokenizer that has them already gets nothing added and returns ``{}``). Callers
    resize the model's embeddings to ``len(tokenizer)`` and call :func:`init_number_embeddings`.
    """
    from tokenizers import AddedToken

    texts = [t for t in number_token_texts(max_number) if t not in tokenizer.get_added_vocab()]
    pieces = {t: tokenizer.encode(t, add_special_tokens=False) for t in texts}
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False, lstrip=False, rstrip=False,
                                     single_word=False) for t in texts])
    out: dict[int, list[int]] = {}
    for text in texts:
        (new_id,) = tokenizer.convert_tokens_to_ids([text])
        got = tokenizer.encode(text, add_special_tokens=False)
        if got != [new_id]:
            raise ValueError(f"number token {text!r} did not become one id after adding it (got {got})")
        if pieces[text] != [new_id]:  # a token the vocabulary had whole already needs no new embedding
            out[new_id] = pieces[text]
    return out


def input_embedding_table(model: PreTrainedModel) -> torch.Tensor:
    """The ``[vocab, hidden]`` input-embedding weights of a causal LM."""
    table = model.get_input_embeddings().weight
    assert isinstance(table, torch.Tensor), f"{type(model).__name__}: its input embeddings hold no weight tensor"
    return table


@torch.no_grad()
def init_number_embeddings(model: PreTrainedModel, pieces: dict[int, list[int]]) -> None:
    """Set each new row of ``model``'s input embeddings (and of an untied output embedding) to the
    mean of the rows of its pieces. ``model`` is a causal LM already resized to the tokenizer."""
    emb = input_embedding_table(model)
    out = model.get_output_embeddings()
    tables = [emb] if out is None or out.weight is emb or out.weight.data_ptr() == emb.data_ptr() else [emb, out.weight]
    for table in tables:
        if max(pieces) >= table.shape[0]:
            raise ValueError(f"the model has {table.shape[0]} embedding rows; resize it to the tokenizer first")
        for new_id, ids in pieces.items():
            table[new_id] = table[torch.tensor(ids, device=table.device)].mean(dim=0)
