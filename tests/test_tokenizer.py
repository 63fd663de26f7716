"""Tokenizers: whole-number tokens, exact round trips, one-token ``###``, save/reload, and
preparing a foreign (GPT-2-style, no pad, no ###) tokenizer. Everything is built locally."""
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from colar_core.data import builtin_splits, read_records
from colar_core.tokenizer import THINK_TOKEN, build_tokenizer, load_tokenizer, prepare_tokenizer, training_texts

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k_aug"


@pytest.fixture(scope="module")
def records():
    recs = [r for split in builtin_splits(300, 30, 30, seed=0, difficulty="hard").values() for r in split]
    if (REAL / "valid.txt").exists():
        recs += read_records(str(REAL / "valid.txt")).records[:200]
    return recs


@pytest.fixture(scope="module")
def built(records, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    return build_tokenizer(records, out_dir=out), out


def test_training_texts_round_trip_exactly(built, records):
    tok, _ = built
    for r in records:
        for text in training_texts(r, speeds=("1", "3", "auto")):
            ids = tok.encode(text, add_special_tokens=False)
            assert tok.decode(ids) == text
            assert tok.unk_token_id not in ids


def test_numbers_are_single_tokens(built):
    tok, _ = built
    for n in range(1001):
        assert len(tok.encode(str(n), add_special_tokens=False)) == 1, n
        assert len(tok.encode(f" {n}", add_special_tokens=False)) == 1, n
    assert tok.encode("12", add_special_tokens=False) != tok.encode("21", add_special_tokens=False)


def test_think_token_is_one_id_even_inside_punctuation(built):
    tok, _ = built
    (think,) = tok.encode(THINK_TOKEN, add_special_tokens=False)
    ids = tok.encode("(Thinking speed: 3)###16-3=13###Answer:13", add_special_tokens=False)
    assert ids.count(think) == 2
    assert tok.pad_token == "<pad>" and tok.eos_token == "<eos>" and tok.bos_token == "<bos>"
    assert len({tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, think}) == 4


def test_unseen_text_falls_back_to_pieces_not_unk(built):
    tok, _ = built
    text = "Zyxq bought 123456 ümlaut ✓ items"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.unk_token_id not in ids and tok.decode(ids) == text


def test_saved_directory_reloads_with_same_ids(built, records):
    tok, out = built
    again = AutoTokenizer.from_pretrained(str(out))
    loaded = load_tokenizer(str(out))
    text = training_texts(records[0], speeds=("2",))[0]
    expected = tok.encode(text, add_special_tokens=False)
    assert again.encode(text, add_special_tokens=False) == expected
    assert loaded.encode(text, add_special_tokens=False) == expected
    assert len(loaded) == len(tok) and loaded.pad_token_id == tok.pad_token_id


def test_build_is_deterministic(records):
    a = build_tokenizer(records[:50])
    b = build_tokenizer(records[:50])
    assert a.get_vocab() == b.get_vocab()


def _gpt2_style_tokenizer(with_eos: bool) -> PreTrainedTokenizerFast:
    """A tiny byte-level BPE trained in-process: no pad token and no ``###`` token."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>"] if with_eos else []
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["Question: Tom has 3 apples. Answer: 5", "hello world # ## numbers 12 34"] * 20, trainer)
    kwargs = {"eos_token": "<|endoftext|>"} if with_eos else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)


@pytest.mark.parametrize("with_eos", [True, False])
def test_prepare_tokenizer_adds_pad_and_single_think_token(with_eos):
    tok = _gpt2_style_tokenizer(with_eos)
    assert tok.pad_token is None
    assert len(tok.encode(THINK_TOKEN, add_special_tokens=False)) > 1
    before = len(tok)
    prepare_tokenizer(tok)
    assert tok.pad_token == ("<|endoftext|>" if with_eos else "<pad>")
    assert len(tok.encode(THINK_TOKEN, add_special_tokens=False)) == 1
    assert len(tok) == before + (1 if with_eos else 2)
    ids = tok.encode("speed: 3)###Answer: 5", add_special_tokens=False)
    assert tok.convert_tokens_to_ids(THINK_TOKEN) in ids
    assert tok.decode(ids) == "speed: 3)###Answer: 5"
    assert len(prepare_tokenizer(tok)) == len(tok)  # idempotent


def test_prepare_tokenizer_reuses_an_existing_think_token_and_splits_it_out():
    """Like Llama-3, whose vocabulary already has ``###``: no new id, but ``)###`` no longer
    swallows it into one punctuation token."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|eot|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["### Answer ### x ###"] * 50 + ["hello )### world"] * 5, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|eot|>")
    (existing,) = hf.encode(THINK_TOKEN, add_special_tokens=False)
    assert hf.convert_ids_to_tokens(hf.encode("a)###b", add_special_tokens=False)) == ["a", ")###", "b"]
    size = len(hf)
    prepare_tokenizer(hf)
    assert len(hf) == size and hf.encode(THINK_TOKEN, add_special_tokens=False) == [existing]
    assert hf.convert_ids_to_tokens(hf.encode("a)###b", add_special_tokens=False)) == ["a", ")", "###", "b"]


def test_equation_steps_tokenize_one_token_per_number_and_operator(built):
    tok, _ = built
    assert len(tok.encode("391*2=782", add_special_tokens=False)) == 5
    assert len(tok.encode("16-3-4=9\n9*2=18", add_special_tokens=False)) == 13


def test_prompt_encoder_pieces_are_whole_tokens(built, records):
    """colar_core.text tokenizes question, speed suffix, steps and answer separately; every piece
    must round-trip and every number in the steps must stay one token."""
    from colar_core.text import PromptEncoder, question_text, speed_text

    tok, _ = built
    enc = PromptEncoder(tok)
    for r in records[:100]:
        ex = enc.encode(r)
        assert tok.decode(ex.question_ids, skip_special_tokens=True) == question_text(r.question)
        assert tok.decode(ex.step_ids) == "\n".join(r.steps)
        if r.id.startswith(("train-", "val-", "test-")):  # synthetic "a*b=c" steps: 5 tokens + "\n"
            assert len(ex.step_ids) == 6 * len(r.steps) - 1
    for speed in (1, 5, 16, "auto"):
        assert tok.decode(enc.speed_ids(speed)) == speed_text(speed)
        assert tok.unk_token_id not in enc.speed_ids(speed)
