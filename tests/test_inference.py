"""Inference: batched latent reasoning with the KV cache, CoT and no-CoT decoding, and the
overfit test showing that training and inference agree at r=1 and r=2."""

import pytest
import torch

from bench.tiny import PROBLEMS, encoder_for, tiny_model, tiny_tokenizer
from colar_core import inference
from colar_core.collate import collate
from colar_core.config import GenerationConfig, ObjectiveConfig
from colar_core.inference import generate, generate_latent, generate_text, pick_tokens, top_p_filter
from colar_core.scoring import accuracy

GREEDY = GenerationConfig(do_sample=False, sample_latents=False, max_latents=12, max_answer_tokens=6)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_a_question_answers_the_same_alone_or_padded_in_a_batch(tok):
    torch.manual_seed(0)
    model = tiny_model(tok).eval()
    enc = encoder_for(tok)
    long_q = PROBLEMS[0].question + " Think about it carefully and then count again please."
    batch = generate_latent(model, enc, [long_q, PROBLEMS[1].question], 3, GREEDY)
    alone = generate_latent(model, enc, [PROBLEMS[1].question], 3, GREEDY)
    assert batch[1].text == alone[0].text and batch[1].n_latents == alone[0].n_latents
    text_batch = generate_text(model, enc, [long_q, PROBLEMS[1].question], 1, GREEDY)
    text_alone = generate_text(model, enc, [PROBLEMS[1].question], 1, GREEDY)
    assert text_batch[1].text == text_alone[0].text


def test_every_row_gets_at_least_one_latent_and_at_most_the_cap(tok):
    model = tiny_model(tok).eval()
    enc = encoder_for(tok)
    gens = generate(model, enc, [p.question for p in PROBLEMS], "latent", 2,
                    GenerationConfig(max_latents=5, max_answer_tokens=3), seed=0)
    assert all(1 <= g.n_latents <= 5 for g in gens)


def test_sampling_is_reproducible_for_a_seed(tok):
    model = tiny_model(tok).eval()
    enc = encoder_for(tok)
    qs = [p.question for p in PROBLEMS]
    gen = GenerationConfig(max_latents=6, max_answer_tokens=4)
    a = generate(model, enc, qs, "latent", 2, gen, seed=3)
    b = generate(model, enc, qs, "latent", 2, gen, seed=3)
    assert [(g.text, g.n_latents) for g in a] == [(g.text, g.n_latents) for g in b]


def test_trace_holds_latents_and_answer_tokens_of_each_row(tok):
    model = tiny_model(tok).eval()
    enc = encoder_for(tok)
    gens, trace = generate_latent(model, enc, [p.question for p in PROBLEMS], 2,
                                  GenerationConfig(max_latents=4, max_answer_tokens=3),
                                  generator=torch.Generator().manual_seed(0), return_trace=True)
    assert trace.latents.shape[:2] == trace.latent_mask.shape
    assert trace.latent_mask.sum(1).tolist() == [g.n_latents for g in gens]
    assert (trace.answer_ids[:, 0] == enc.think_id).all()


def test_top_p_cuts_the_unlikely_tail():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]])
    logits = probs.log()
    kept = torch.isfinite(top_p_filter(logits, 0.9))
    # 0.5 + 0.3 < 0.9, so the third token is still needed; the fourth is not
    assert kept.tolist() == [[True, True, True, False], [False, True, True, True]]
    assert torch.isfinite(top_p_filter(logits, 0.8)).sum(1).tolist() == [2, 2]  # 0.5 + 0.3 reaches 0.8
    assert torch.isfinite(top_p_filter(logits, 0.3)).sum(1).tolist() == [1, 1]  # the top token always stays
    assert torch.equal(top_p_filter(logits, 1.0), logits)
    # sampling never draws a cut token; without top-p it does
    gen = GenerationConfig()  # reference default: top_p 0.9, temperature 1
    assert gen.top_p == 0.9
    g = torch.Generator().manual_seed(0)
    many = logits[:1].expand(4000, -1)
    assert not (pick_tokens(many, gen, g) == 3).any()
    assert (pick_tokens(many, GenerationConfig(top_p=1.0), g) == 3).any()
    with pytest.raises(ValueError):
        GenerationConfig(top_p=0.0)


def test_top_p_is_hfs_top_p_warper():
    """The reference samples answers with HF generate(top_p=0.9): same kept set as its warper."""
    from transformers.generation.logits_process import TopPLogitsWarper

    g = torch.Generator().manual_seed(1)
    logits = torch.randn(64, 50, generator=g) * 3
    for p in (0.5, 0.9, 0.99):
        want = torch.isfinite(TopPLogitsWarper(p)(None, logits.clone()))
        assert torch.equal(torch.isfinite(top_p_filter(logits, p)), want)


def test_top_p_applies_to_answers_and_cot_text_but_not_the_stop_check(tok, monkeypatch):
    model = tiny_model(tok).eval()
    enc = encoder_for(tok)
    seen = []
    original = inference.top_p_filter

    def recording(logits, top_p):
        seen.append(top_p)
        return original(logits, top_p)

    monkeypatch.setattr(inference, "top_p_filter", recording)
    gen = GenerationConfig(max_latents=3, max_answer_tokens=2, top_p=0.7)
    gens, trace = generate_latent(model, enc, [PROBLEMS[0].question], 2, gen, torch.Generator().manual_seed(0),
                                  return_trace=True)
    n_answer = int(trace.answer_mask.sum()) - 1  # decoded answer tokens (without the fed '###')
    assert seen == [1.0] * gens[0].n_latents + [0.7] * n_answer  # stop checks: full softmax
    seen.clear()
    generate_text(model, enc, [PROBLEMS[0].question], 1, gen, torch.Generator().manual_seed(0))
    assert seen and set(seen) == {0.7}  # the CoT chain and its answer


def _overfit(model, enc, steps, factors, objective, lr=3e-3):
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    examples = [enc.encode(r, with_steps=objective.mode != "nocot") for r in PROBLEMS]
    rng = torch.Generator().manual_seed(0)
    for step in range(steps):
        r = factors[step % len(factors)]
        loss = model.sft_loss(collate(examples, enc, r, generator=rng), objective, rng)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_overfit_latent_reasoning_answers_at_r1_and_r2(tok):
    """A tiny model learns four two-step problems; latent inference then answers all of them at
    r=1 and r=2 with chains as long as the merged training chains (training and inference agree)."""
    torch.manual_seed(0)
    model = tiny_model(tok)
    enc = encoder_for(tok)
    _overfit(model, enc, 300, [1, 2], ObjectiveConfig(compression_factors=[1, 2]))
    qs, golds = [p.question for p in PROBLEMS], [p.answer for p in PROBLEMS]
    for r in (1, 2):
        gens = generate(model, enc, qs, "latent", r, GREEDY)
        assert accuracy([g.answer for g in gens], golds) == 1.0, [g.text for g in gens]
        expected = [-(-len(enc.encode(p).step_ids) // r) for p in PROBLEMS]  # ceil(len / r)
        assert [g.n_latents for g in gens] == expected


def test_overfit_cot_text_decoding(tok):
    torch.manual_seed(0)
    enc = encoder_for(tok)
    cot = tiny_model(tok)
    _overfit(cot, enc, 150, [1], ObjectiveConfig(mode="cot"))
    gens = generate(cot, enc, [p.question for p in PROBLEMS], "cot", 1, GREEDY)
    assert accuracy([g.answer for g in gens], [p.answer for p in PROBLEMS]) == 1.0
    assert gens[0].text.startswith("4*5=20\n3+20=23###Answer:23")
    assert gens[0].n_tokens == len(enc.encode(PROBLEMS[0]).step_ids)


def test_overfit_nocot_answers_directly_with_an_empty_chain(tok):
    torch.manual_seed(0)
    enc = encoder_for(tok)
    model = tiny_model(tok)
    _overfit(model, enc, 150, [1], ObjectiveConfig(mode="nocot"))
    gens = generate(model, enc, [p.question for p in PROBLEMS], "nocot", 1, GREEDY)
    assert accuracy([g.answer for g in gens], [p.answer for p in PROBLEMS]) == 1.0
    assert all(g.n_tokens == 0 and g.text.startswith("###Answer:") for g in gens)


@pytest.mark.parametrize("mode", ["latent", "cot"])
def test_a_stop_check_ends_a_generation_before_its_next_decoder_step(tok, mode):
    """Issue 22, item 15: a caller (the served model, whose request timed out) can end a generation that
    would otherwise run a million steps; the check is asked before every decoder forward."""
    model = tiny_model(tok).eval()
    enc = encoder_for(tok)
    forwards, checks = [0], [0]
    run_decoder = model.run_decoder

    def counted(*args, **kwargs):
        forwards[0] += 1
        return run_decoder(*args, **kwargs)

    def stop():
        checks[0] += 1
        return "enough" if checks[0] == 40 else None

    model.run_decoder = counted
    huge = GenerationConfig(max_latents=1_000_000, max_cot_tokens=1_000_000, do_sample=False, sample_latents=False)
    with pytest.raises(inference.GenerationStopped, match="^enough$"):
        generate(model, enc, [p.question for p in PROBLEMS], mode, 2, huge, stop=stop)
    assert checks[0] == 40 and forwards[0] == 39  # the prompt, then one forward per step the check allowed
    assert not model.training


def test_a_deadline_stops_a_runaway_generation(tok):
    import time

    model = tiny_model(tok).eval()
    enc = encoder_for(tok)
    deadline = time.monotonic() + 0.3
    with pytest.raises(inference.GenerationStopped, match="past the deadline"):
        generate(model, enc, [PROBLEMS[0].question], "latent", 2, GenerationConfig(max_latents=10_000_000), seed=0,
                 stop=lambda: "past the deadline" if time.monotonic() >= deadline else None)
    assert time.monotonic() - deadline < 1.0
