"""``eval.protocol`` (issue 25, item 2): the reference's own evaluation of the baselines beside colar's.

The reference (xiaomi-research/colar, src/models/model_base.py) counts an explicit chain as
``index('###') - 1``, else ``index(':') - 3``, else the output width (203-213); prompts iCoT with the bare
question and 16 new tokens (188-199, icot.yaml:26); and runs Coconut's and Distill's 6 thoughts without
``past_key_values`` (382-398), so each thought after the first is read from the thought before it
alone. Its metrics go under ``{setting}-reference`` names, and Table 1 shows them as extra rows.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch
from pydantic import ValidationError

from bench.tiny import PROBLEMS, encoder_for, tiny_model, tiny_tokenizer
from colar_core import evaluation, inference
from colar_core.baselines.thoughts import attach_projection
from colar_core.config import EvalConfig, GenerationConfig
from colar_core.data.records import Record
from colar_core.evaluation import evaluate_baseline, evaluate_text
from colar_core.inference import (
    REFERENCE_NEW_TOKENS,
    REFERENCE_THOUGHTS,
    DecodeState,
    Generation,
    feed_thoughts,
    generate,
    reference_chain_length,
)
from colar_core.text import AUTO_SPEED

GREEDY = GenerationConfig(do_sample=False, max_cot_tokens=5, max_answer_tokens=2, batch_size=8)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture()
def model(tok):
    torch.manual_seed(0)
    return tiny_model(tok).eval()


def _ids(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


# ----- #L as the reference counts it -------------------------------------------------------------
def test_the_reference_count_takes_hash_minus_one_else_colon_minus_three_else_the_width(tok):
    enc = encoder_for(tok)
    colon = _ids(tok, ":")[0]
    steps, answer = _ids(tok, "4*5=20\n3+20=23"), [*enc.answer_prefix_ids, *_ids(tok, "23"), enc.eos_id]
    with_hash = [*steps, enc.think_id, *answer, enc.pad_id]
    assert reference_chain_length(with_hash, enc.think_id, colon, 99) == len(steps) - 1
    no_hash = [*steps, *answer]  # 'Answer' ':' ...: the colon sits at len(steps) + 1
    assert reference_chain_length(no_hash, enc.think_id, colon, 99) == len(steps) + 1 - 3
    neither = [*_ids(tok, "23"), enc.eos_id, enc.pad_id]
    assert reference_chain_length(neither, enc.think_id, colon, 7) == 7  # the batch's width, pads and all
    assert reference_chain_length([enc.think_id, *answer], enc.think_id, colon, 9) == -1  # kept as written


def test_every_explicit_generation_carries_both_counts(tok, model, monkeypatch):
    """CoT's count is colar's (tokens before '###'); the reference's is computed on the same tokens,
    the width being the batch's (so a row without '###' or ':' counts the longest row's tokens)."""
    enc = encoder_for(tok)
    chain, tail = _ids(tok, "4*5=20"), [*enc.answer_prefix_ids, *_ids(tok, "23"), enc.eos_id]
    rows = [[*chain, enc.think_id, *tail], [*_ids(tok, "23"), enc.eos_id] + [enc.pad_id] * (len(chain) + len(tail) - 1)]
    monkeypatch.setattr(inference, "_decode_tokens", lambda *a, **k: torch.tensor(rows))
    gens = inference.generate_text(model, enc, ["q", "r"], 1)
    assert [g.n_tokens for g in gens] == [len(chain), 2]
    assert [g.reference_length for g in gens] == [len(chain) - 1, len(rows[0])]


# ----- iCoT: the bare question, 16 new tokens ----------------------------------------------------
def test_icot_under_the_reference_is_prompted_without_the_speed_suffix_and_capped_at_16(tok, model, monkeypatch):
    enc = encoder_for(tok)
    seen = []
    real = inference._decode_tokens

    def spy(state, m, max_new, *a, **k):
        seen.append((state.prompt_ids[0][state.prompt_mask[0]].tolist(), max_new))
        return real(state, m, max_new, *a, **k)

    monkeypatch.setattr(inference, "_decode_tokens", spy)
    model.state.method = "icot"
    question = PROBLEMS[0].question
    generate(model, enc, [question], "icot", gen=GREEDY, seed=0)
    generate(model, enc, [question], "icot", gen=GREEDY, seed=0, protocol="reference")
    (colar_prompt, colar_budget), (ref_prompt, ref_budget) = seen
    assert colar_prompt == list(enc.prompt_ids(enc.encode_question(question), AUTO_SPEED))
    assert colar_budget == GREEDY.max_cot_tokens + GREEDY.max_answer_tokens
    assert ref_prompt == list(enc.encode_question(question))  # no '(Thinking speed: auto)###'
    assert ref_budget == REFERENCE_NEW_TOKENS == 16


# ----- Coconut / Distill: thoughts without the cache ---------------------------------------------
def _second_thought(model, enc, question: str, first: torch.Tensor, isolated: bool) -> torch.Tensor:
    """The input embedding of thought 2 after ``question``'s prompt, thought 1 forced to ``first``."""
    state = DecodeState(model, [enc.prompt_ids(enc.encode_question(question), AUTO_SPEED)], enc.pad_id)
    state.hidden = first  # what the head of thought 1 reads
    with torch.no_grad():
        return feed_thoughts(state, model, 2, isolated=isolated)[1]


@pytest.mark.parametrize("projection", [False, True])
def test_under_the_reference_a_later_thought_is_read_from_the_thought_before_it_alone(tok, model, projection):
    enc = encoder_for(tok)
    if projection:
        torch.manual_seed(1)
        attach_projection(model)
    first = torch.randn(1, model.state.hidden_size)
    q1, q2 = PROBLEMS[0].question, PROBLEMS[3].question
    iso1, iso2 = (_second_thought(model, enc, q, first, True) for q in (q1, q2))
    assert torch.allclose(iso1, iso2, atol=1e-6)  # the question does not reach thought 2
    cached1, cached2 = (_second_thought(model, enc, q, first, False) for q in (q1, q2))
    assert not torch.allclose(cached1, cached2, atol=1e-3)  # through the cache, it does
    # what the reference's call computes: thought 1 fed alone (no past_key_values; an unpadded mask as
    # long as the sequence so far), its last hidden state (through the projection) is thought 2
    embeds = first if not projection else model.thought_projection(first)
    with torch.no_grad():
        out = model.causal_lm(
            inputs_embeds=embeds[:, None], attention_mask=torch.ones(1, 9, dtype=torch.long), output_hidden_states=True
        )
        expected = out.hidden_states[-1][:, -1]
        expected = expected if not projection else model.thought_projection(expected)
    assert torch.allclose(iso1, expected, atol=1e-5)


def test_coconut_under_the_reference_runs_6_thoughts_and_16_answer_tokens(tok, model, monkeypatch):
    enc = encoder_for(tok)
    proj = attach_projection(model)
    calls, budgets = [], []
    proj.register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape[0]))
    real = inference._decode_tokens

    def spy(state, m, max_new, *a, **k):
        budgets.append(max_new)
        return real(state, m, max_new, *a, **k)

    monkeypatch.setattr(inference, "_decode_tokens", spy)
    model.state.method, model.state.n_thoughts = "coconut", 2
    questions = [r.question for r in PROBLEMS[:3]]
    colar = generate(model, enc, questions, "coconut", gen=GREEDY, seed=0)
    assert calls == [3, 3] and budgets == [GREEDY.max_answer_tokens]
    calls.clear()
    ref = generate(model, enc, questions, "coconut", gen=GREEDY, seed=0, protocol="reference")
    assert calls == [3] * REFERENCE_THOUGHTS and REFERENCE_THOUGHTS == 6
    assert budgets[-1] == REFERENCE_NEW_TOKENS
    assert [g.n_latents for g in colar] == [2] * 3 and [g.reference_length for g in ref] == [6] * 3


def test_an_unknown_protocol_is_refused(tok, model):
    with pytest.raises(ValueError, match="protocol must be one of"):
        generate(model, encoder_for(tok), ["q"], "coconut", protocol="paper")


# ----- the evaluation's metric names -------------------------------------------------------------
NO_ENCODER: Any = None  # the scripted decoding below needs none
RECORDS = [
    Record(id=f"q{i}", question=f"What is {i} + 1?", steps=(f"{i}+1={i + 1}",), answer=str(i + 1)) for i in range(4)
]


def _scripted(monkeypatch, calls: list) -> None:
    """The sweep's decoding, scripted: right on the first two questions; colar's count 5, the
    reference's 4; under the reference's protocol right on all and 6 (thoughts) / 3 (tokens)."""

    def fake(model, encoder, questions, mode, compression, gen, seed=0, **kw):
        calls.append((mode, kw.get("protocol", "colar")))
        ref = kw.get("protocol") == "reference"
        return [
            Generation(
                text="", answer=(r.answer if ref or i < 2 else "-1"), n_tokens=5, reference_length=(3 if ref else 4)
            )
            for i, r in enumerate(RECORDS[: len(questions)])
        ]

    monkeypatch.setattr(evaluation, "generate", fake)


def test_both_protocols_keep_their_metrics_apart_and_cot_is_decoded_once(monkeypatch):
    calls: list = []
    _scripted(monkeypatch, calls)
    icot = SimpleNamespace(state=SimpleNamespace(method="icot"))
    metrics, rows = evaluate_baseline(icot, NO_ENCODER, RECORDS, [0, 1], protocols=("colar", "reference"))
    assert calls == [("icot", "colar")] * 2 + [("icot", "reference")] * 2
    assert (metrics["accuracy/icot"], metrics["mean_tokens/icot"]) == (0.5, 5.0)
    assert (metrics["accuracy/icot-reference"], metrics["mean_tokens/icot-reference"]) == (1.0, 3.0)
    assert {r["setting"] for r in rows} == {"icot", "icot-reference"}

    calls.clear()
    metrics, rows = evaluate_text(None, NO_ENCODER, RECORDS, "cot", [0, 1], protocols=("colar", "reference"))
    assert calls == [("cot", "colar")] * 2  # one decoding, counted both ways
    assert (metrics["accuracy/cot"], metrics["mean_tokens/cot"]) == (0.5, 5.0)
    assert (metrics["accuracy/cot-reference"], metrics["mean_tokens/cot-reference"]) == (0.5, 4.0)
    assert [r["chain_length"] for r in rows if r["setting"] == "cot-reference"] == [4] * 8

    calls.clear()
    only_ref, _ = evaluate_text(None, NO_ENCODER, RECORDS, "cot", [0], protocols=("reference",))
    assert "accuracy/cot" not in only_ref and only_ref["mean_tokens/cot-reference"] == 4.0
    nocot, _ = evaluate_text(None, NO_ENCODER, RECORDS, "nocot", [0], protocols=("reference",))
    assert "accuracy/nocot" in nocot and not any("reference" in k for k in nocot)  # the same under both
    with pytest.raises(ValueError, match="protocols must be"):
        evaluate_text(None, NO_ENCODER, RECORDS, "cot", [0], protocols=("paper",))


def test_the_eval_config_names_its_protocols_and_a_bad_one_by_field():
    assert EvalConfig().protocol == "colar" and EvalConfig().protocols() == ("colar",)
    assert EvalConfig(protocol="both").protocols() == ("colar", "reference")
    with pytest.raises(ValidationError, match="protocol"):
        EvalConfig(protocol="paper")
    with pytest.raises(ValidationError, match="datasets"):
        EvalConfig(datasets=["icot-reference"])  # a set name that would read as a setting


def test_a_pipeline_config_names_a_bad_protocol_field():
    from flows.config import ConfigError, load_config

    assert load_config(None, ["eval.protocol=both"]).eval.protocols() == ("colar", "reference")
    with pytest.raises(ConfigError, match=r"eval\.protocol"):
        load_config(None, ["eval.protocol=paper"])


# ----- the suite and Table 1 ---------------------------------------------------------------------
def test_the_suite_under_both_adds_reference_settings_for_cot_and_the_baselines_only(tmp_path, tok):
    from colar_core.evaluation_suite import SuiteModels, evaluate_suite

    for seed, name in enumerate(("colar", "cot", "coconut")):
        torch.manual_seed(seed)
        m = tiny_model(tok, hidden=32, layers=1, heads=2).eval()
        m.state.trained_compression_factors = [1]
        if name == "coconut":
            m.state.method, m.state.n_thoughts = "coconut", 2
        m.save_pretrained(tmp_path / name, tok)
    models = SuiteModels(
        colar=str(tmp_path / "colar"), cot=str(tmp_path / "cot"), baselines={"coconut": str(tmp_path / "coconut")}
    )
    cfg = EvalConfig(
        compression_factors=[1],
        seeds=[0],
        protocol="both",
        thoughts_questions=0,
        generation={"max_latents": 2, "max_cot_tokens": 3, "max_answer_tokens": 2},
    )
    metrics = evaluate_suite(models, {"test": PROBLEMS[:2]}, cfg).metrics
    settings = {k.split("/")[-1] for k in metrics}
    assert settings == {"c1", "cot", "cot-reference", "coconut", "coconut-reference"}
    assert metrics["mean_latents/coconut"] == 2.0 and metrics["mean_latents/test/coconut-reference"] == 6.0


def test_table1_shows_a_reference_row_below_each_setting_evaluated_both_ways():
    from tasks.table1 import table1, table1_markdown

    metrics = {
        "accuracy/cot": 0.6,
        "mean_tokens/cot": 20.0,
        "accuracy/cot-reference": 0.6,
        "mean_tokens/cot-reference": 19.0,
        "accuracy/icot": 0.3,
        "mean_tokens/icot": 2.0,
        "accuracy/icot-reference": 0.2,
        "mean_tokens/icot-reference": 1.0,
        "accuracy/coconut-reference": 0.25,
        "mean_latents/coconut-reference": 6.0,
        "accuracy/c1": 0.5,
        "mean_latents/c1": 10.0,
    }
    table = table1(metrics)
    assert list(table.index) == [
        "CoT",
        "CoT (reference eval)",
        "iCoT",
        "iCoT (reference eval)",
        "Coconut (reference eval)",
        "CoLaR-1",
    ]
    assert table.loc["CoT (reference eval)", "test #L"] == "19.0" and table.loc["CoT", "test #L"] == "20.0"
    assert table.loc["iCoT (reference eval)", "test Acc (%)"] == "20.0"
    assert "| Coconut (reference eval) | 25.0 | 6.0 |" in table1_markdown(table)


def test_the_table1_bench_keeps_a_reference_row_per_setting_over_training_seeds():
    from bench.table1 import aggregate, markdown

    per_seed = {
        seed: {
            "accuracy/icot": 0.3 + seed / 10,
            "mean_tokens/icot": 2.0,
            "accuracy/icot-reference": 0.1 * seed,
            "mean_tokens/icot-reference": 1.0 + seed,
        }
        for seed in (0, 1)
    }
    table = aggregate(per_seed)
    assert list(table) == ["icot", "icot-reference"]
    assert table["icot-reference"]["method"] == "iCoT (reference eval)"
    assert table["icot-reference"]["length_mean"] == 1.5 and table["icot"]["length_mean"] == 2.0
    assert "| iCoT (reference eval) | 5.0 ± " in markdown(table)
