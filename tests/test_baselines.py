"""The baselines (iCoT, Coconut, Distill): each loss equals the reference's formula computed directly
(full-sequence forwards, no KV cache, no padding, one row at a time), the curriculum advances as
configured, Coconut's thoughts are the previous last hidden states, and inference runs exactly the
configured number of thoughts."""

import json

import pytest
import torch
import torch.nn.functional as F

from bench.tiny import PROBLEMS, encoder_for, tiny_model, tiny_tokenizer
from colar_core.baselines.batches import (
    CurriculumBatches,
    curriculum_stage,
    distill_batch,
    remaining_steps,
    thought_batch,
)
from colar_core.baselines.config import CoconutConfig, DistillConfig, ICoTConfig
from colar_core.baselines.losses import coconut_loss, distill_loss, icot_loss
from colar_core.baselines.stage import BaselineJob, train_baseline
from colar_core.baselines.thoughts import attach_projection
from colar_core.config import GenerationConfig
from colar_core.data.records import Record
from colar_core.inference import DecodeState, feed_thoughts, generate
from colar_core.model import ColarModel
from colar_core.text import AUTO_SPEED
from colar_core.training.config import TrainConfig

# three-step chains, so that stage 1 keeps two steps, stage 2 one, stage 3 none
CHAINS = [
    Record("c0", "Ed has 2 bags of 3 nuts, adds 1 nut and doubles them. How many nuts?",
           ("2*3=6", "6+1=7", "7*2=14"), "14"),
    Record("c1", "Flo has 4 rows of 2 cups and loses 3.", ("4*2=8", "8-3=5", "5*3=15"), "15"),
    Record("c2", "Gus has 9 eggs.", ("9-4=5", "5*2=10", "10+1=11"), "11"),
]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer(PROBLEMS + CHAINS)


@pytest.fixture()
def model(tok):
    torch.manual_seed(0)
    return tiny_model(tok).eval()  # eval: no dropout, so two computations agree exactly


def _direct(model, embeds: torch.Tensor):
    """One unpadded row ``[T, H]`` through the causal LM, no cache: (logits, hidden states of every layer)."""
    out = model.causal_lm(inputs_embeds=embeds[None], output_hidden_states=True)
    return out.logits[0], [h[0] for h in out.hidden_states]


def _direct_pass(model, enc, ex, n_thoughts: int):
    """The reference's pass for one row, computed without the KV cache: the prompt, then each thought
    the last hidden state of the sequence so far (through the projection if any), then the block.
    Returns (block logits, block hidden states of every layer, the thoughts fed)."""
    proj = getattr(model, "thought_projection", None)
    seq = model.embed(torch.tensor(enc.prompt_ids(ex.question_ids, AUTO_SPEED)))
    thoughts = []
    for _ in range(n_thoughts):
        _, hidden = _direct(model, seq)
        thought = hidden[-1][-1]
        thought = proj(thought) if proj is not None else thought
        thoughts.append(thought)
        seq = torch.cat([seq, thought[None]])
    block = torch.tensor(tuple(ex.step_ids) + tuple(ex.answer_ids))
    logits, hidden = _direct(model, torch.cat([seq, model.embed(block)]))
    return logits[-len(block):], [h[-len(block):] for h in hidden], thoughts


def _block_ce(logits_and_blocks):
    """Mean CE over every row's block tokens after the first (the reference's labels = block)."""
    logits = torch.cat([lg[:-1] for lg, _ in logits_and_blocks])
    labels = torch.cat([b[1:] for _, b in logits_and_blocks])
    return F.cross_entropy(logits, labels)


def _kept(enc, records, stage, max_stage=3):
    import dataclasses

    return [enc.encode(dataclasses.replace(r, steps=remaining_steps(r.steps, stage, max_stage))) for r in records]


# ----- the curriculum ----------------------------------------------------------------------------
def test_stage_k_removes_the_first_k_steps_and_the_last_stage_removes_all():
    steps = ("a", "b", "c", "d")
    assert remaining_steps(steps, 1, 3) == ("b", "c", "d")
    assert remaining_steps(steps, 2, 3) == ("c", "d")
    assert remaining_steps(steps, 3, 3) == ()
    assert remaining_steps(("a",), 2, 3) == ()


def test_the_stage_advances_once_per_configured_number_of_epochs():
    cfg = ICoTConfig(epochs_per_stage=2, max_stage=3)
    assert [curriculum_stage(e, cfg) for e in (0, 1, 1.99, 2, 3.5, 4, 6, 50)] == [1, 1, 1, 2, 2, 3, 3, 3]
    # the reference's ceil(epoch + 1 / n) would give stage 2 at epoch 1: not what its config says
    assert curriculum_stage(1, cfg) == 1
    quarter = CoconutConfig(epochs_per_stage=0.25, max_stage=2)
    assert [curriculum_stage(e, quarter) for e in (0, 0.2, 0.25, 3)] == [1, 1, 2, 2]


def test_curriculum_batches_follow_the_examples_consumed(tok):
    enc = encoder_for(tok)
    records = CHAINS * 2 + PROBLEMS[:2]  # 8 records; batch 2 -> 4 steps per epoch
    method = CoconutConfig(epochs_per_stage=0.5, max_stage=3, thoughts_per_step=2)
    batches = CurriculumBatches(records, enc, method, TrainConfig(batch_size=2, seed=0))
    seen = [batches(step) for step in range(7)]
    assert [sb.info["stage"] for sb in seen] == [1, 1, 2, 2, 3, 3, 3]
    assert [sb.info["n_thoughts"] for sb in seen] == [2, 2, 4, 4, 6, 6, 6]
    last = seen[-1].micro_batches[0]
    assert last.n_thoughts == 6 and int(last.steps_len.sum()) == 0
    assert bool((last.block_ids[:, 0] == enc.think_id).all())  # no steps left: the block opens with '###'
    # resumed from its state, the batch source gives the same batches
    fresh = CurriculumBatches(records, enc, method, TrainConfig(batch_size=2, seed=0))
    replay = CurriculumBatches(records, enc, method, TrainConfig(batch_size=2, seed=0))
    for step in range(3):
        fresh(step)
    replay.load_state_dict(fresh.state_dict())
    a, b = fresh(3).micro_batches[0], replay(3).micro_batches[0]
    assert torch.equal(a.block_ids, b.block_ids) and a.n_thoughts == b.n_thoughts


def test_icot_blocks_hold_exactly_the_remaining_steps(tok):
    enc = encoder_for(tok)
    batch = thought_batch(_kept(enc, CHAINS[:1], 1), enc, 0)
    row = batch.block_ids[0][batch.block_mask[0]].tolist()
    expected = tok.encode("6+1=7\n7*2=14", add_special_tokens=False)
    assert row[: len(expected)] == expected and row[len(expected)] == enc.think_id


# ----- the losses against a direct computation ---------------------------------------------------
def test_icot_loss_is_the_ce_of_the_remaining_steps_and_answer(tok, model):
    enc = encoder_for(tok)
    kept = _kept(enc, [CHAINS[0], CHAINS[2]], 1)
    got = icot_loss(model, thought_batch(kept, enc, 0))["loss"]
    direct = []
    for ex in kept:
        logits, _, _ = _direct_pass(model, enc, ex, 0)
        direct.append((logits, torch.tensor(tuple(ex.step_ids) + tuple(ex.answer_ids))))
    assert torch.allclose(got, _block_ce(direct), atol=1e-5)


@pytest.mark.parametrize("projection", [False, True])
def test_coconut_loss_feeds_back_last_hidden_states(tok, model, projection):
    enc = encoder_for(tok)
    if projection:
        torch.manual_seed(1)
        attach_projection(model)
    kept = _kept(enc, [CHAINS[0], CHAINS[1]], 2)  # rows of different prompt lengths: padding exercised
    got = coconut_loss(model, thought_batch(kept, enc, 4))["loss"]
    direct = []
    for ex in kept:
        logits, _, _ = _direct_pass(model, enc, ex, 4)
        direct.append((logits, torch.tensor(tuple(ex.step_ids) + tuple(ex.answer_ids))))
    assert torch.allclose(got, _block_ce(direct), atol=1e-5)


def test_each_thought_is_the_previous_positions_last_hidden_state(tok, model):
    enc = encoder_for(tok)
    ex = enc.encode(CHAINS[2])
    state = DecodeState(model, [enc.prompt_ids(ex.question_ids, AUTO_SPEED)], enc.pad_id)
    with torch.no_grad():
        fed = feed_thoughts(state, model, 3)
        _, _, direct = _direct_pass(model, enc, ex, 3)
    assert len(fed) == 3
    for ours, theirs in zip(fed, direct):
        assert torch.allclose(ours[0], theirs, atol=1e-5)


def test_distill_loss_is_alpha_teacher_plus_beta_student_plus_gamma_smooth_l1(tok, model):
    enc = encoder_for(tok)
    torch.manual_seed(2)
    attach_projection(model)
    cfg = DistillConfig(n_thoughts=3, alpha=1.0, beta=0.5, gamma=20.0)
    examples = [enc.encode(CHAINS[0]), enc.encode(PROBLEMS[1])]
    got = distill_loss(model, distill_batch(examples, enc, cfg), cfg)
    teacher, student, t_states, s_states = [], [], [], []
    colon = 1 + len(enc.answer_prefix_ids) - 1  # answer block: '###' 'Answer' ':' a EOS -> ':' at 2
    for ex in examples:
        t_logits, t_hidden, _ = _direct_pass(model, enc, ex, 0)
        teacher.append((t_logits, torch.tensor(tuple(ex.step_ids) + tuple(ex.answer_ids))))
        t_states.append(torch.stack(t_hidden[1:], -1)[len(ex.step_ids) + colon])
        no_chain = ex.__class__(ex.question_ids, (), ex.answer_ids, ex.answer)
        s_logits, s_hidden, _ = _direct_pass(model, enc, no_chain, 3)
        student.append((s_logits, torch.tensor(ex.answer_ids)))
        s_states.append(torch.stack(s_hidden[1:], -1)[colon])
    assert tok.decode([examples[0].answer_ids[colon]]) == ":"
    t_ce, s_ce = _block_ce(teacher), _block_ce(student)
    dist = F.smooth_l1_loss(torch.stack(s_states), torch.stack(t_states))
    assert torch.allclose(got["teacher_ce"], t_ce, atol=1e-5)
    assert torch.allclose(got["student_ce"], s_ce, atol=1e-5)
    assert torch.allclose(got["distill"], dist, atol=1e-6)
    assert torch.allclose(got["loss"], 1.0 * t_ce + 0.5 * s_ce + 20.0 * dist, atol=1e-4)


def test_distill_teacher_states_get_no_gradient_through_the_matching_term(tok, model):
    enc = encoder_for(tok)
    cfg = DistillConfig(n_thoughts=2, alpha=0.0, beta=0.0, gamma=1.0, projection=False)
    model.train()
    out = distill_loss(model, distill_batch([enc.encode(CHAINS[0])], enc, cfg), cfg)
    out["loss"].backward()
    # only the student pass carries the gradient: the answer block's embeddings differ from the
    # teacher's chain tokens, so a step-only token gets none
    step_only = tok.encode("7*2=14", add_special_tokens=False)[0]
    assert float(model.causal_lm.get_input_embeddings().weight.grad[step_only].abs().sum()) == 0.0


# ----- inference ---------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 4])
def test_inference_runs_exactly_the_configured_number_of_thoughts(tok, model, n):
    enc = encoder_for(tok)
    proj = attach_projection(model)
    calls = []
    proj.register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape[0]))
    model.state.method, model.state.n_thoughts = "coconut", n
    gens = generate(model, enc, [r.question for r in CHAINS], "coconut",
                    gen=GenerationConfig(do_sample=False, max_answer_tokens=3, batch_size=8), seed=0)
    assert calls == [len(CHAINS)] * n  # one projected thought per step, for the whole batch
    assert [g.n_latents for g in gens] == [n] * len(CHAINS)


def test_a_baseline_model_folder_keeps_its_method_thoughts_and_projection(tok, model, tmp_path):
    proj = attach_projection(model)
    model.state.method, model.state.n_thoughts = "distill", 6
    model.save_pretrained(tmp_path / "m", tok)
    loaded, _ = ColarModel.load_dir(tmp_path / "m", is_trainable=False)
    assert loaded.state.method == "distill" and loaded.state.n_thoughts == 6
    for a, b in zip(proj.state_dict().values(), loaded.thought_projection.state_dict().values()):
        assert torch.equal(a, b)
    saved = json.loads((tmp_path / "m" / "colar_config.json").read_text())
    assert saved["method"] == "distill" and saved["thought_projection"] is True


def test_an_unknown_generate_mode_is_refused(tok, model):
    with pytest.raises(ValueError, match="mode must be one of"):
        generate(model, encoder_for(tok), ["q"], "codi")


# ----- configs and the stage ---------------------------------------------------------------------
def test_configs_carry_the_reference_defaults():
    icot, coconut, distill = ICoTConfig(), CoconutConfig(), DistillConfig()
    assert (icot.max_stage, icot.epochs_per_stage) == (3, 2)
    assert (coconut.max_stage, coconut.epochs_per_stage, coconut.thoughts_per_step) == (3, 2, 2)
    assert coconut.projection is False
    assert coconut.n_thoughts == 6
    assert (distill.n_thoughts, distill.alpha, distill.beta, distill.gamma, distill.projection) == (6, 1, 1, 20, True)


def test_a_job_names_its_method_and_a_bad_field_is_named():
    job = BaselineJob.model_validate({"output_dir": "x", "method": {"method": "coconut", "thoughts_per_step": 1}})
    assert isinstance(job.method, CoconutConfig) and job.train is job.method.train
    with pytest.raises(ValueError, match="thoughts_per_step"):
        BaselineJob.model_validate({"output_dir": "x", "method": {"method": "coconut", "thoughts_per_step": 0}})
    with pytest.raises(ValueError, match="n_thoughts"):
        BaselineJob.model_validate({"output_dir": "x", "method": {"method": "icot", "n_thoughts": 3}})


@pytest.mark.parametrize("method", [ICoTConfig(epochs_per_stage=0.5, max_stage=2),
                                    CoconutConfig(epochs_per_stage=0.5, max_stage=2, thoughts_per_step=1),
                                    DistillConfig(n_thoughts=2)], ids=lambda m: m.method)
def test_a_baseline_stage_trains_on_the_shared_loop_and_saves_its_method(tok, tmp_path, method):
    torch.manual_seed(0)
    model = tiny_model(tok, hidden=32, layers=1)
    method = method.model_copy(update={"train": TrainConfig(backend="torch", max_steps=4, batch_size=2, lr=1e-2,
                                                           checkpoint_every=2, eval_every=0)})
    result = train_baseline(model, tok, CHAINS + PROBLEMS[:1], [], method, tmp_path / "run")
    assert result.final_step == 4 and result.method == method.method
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r.get("event") == "step"]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in steps)
    loaded, _ = ColarModel.load_dir(result.model_dir, is_trainable=False)
    assert loaded.state.method == method.method
    if method.method == "coconut":
        assert [r["stage"] for r in steps] == [1, 2, 2, 2]  # 2 steps an epoch, a stage per half epoch
        assert loaded.state.n_thoughts == 2  # the last stage's count: 2 stages x 1 thought
    if method.method == "distill":
        assert loaded.state.n_thoughts == 2 and loaded.state.thought_projection
    # a finished stage run again returns at once from its checkpoint
    again = train_baseline(tiny_model(tok, hidden=32, layers=1), tok, CHAINS + PROBLEMS[:1], [], method,
                           tmp_path / "run")
    assert again.resumed_from == 4


def test_an_icot_answer_without_its_closing_marker_is_a_chain_of_zero(tok, model, monkeypatch):
    """A last-stage iCoT model answers 'Answer : a <eos>' right after the prompt's '###' (the block's
    first token, '###', is never a label, as in the reference): that is no reasoning token."""
    from colar_core import inference

    enc = encoder_for(tok)
    scripted = [*enc.answer_prefix_ids, tok.convert_tokens_to_ids("23"), enc.eos_id]
    monkeypatch.setattr(inference, "_decode_tokens",
                        lambda state, *a, **k: torch.tensor([[*scripted, enc.pad_id],
                                                             [tok.convert_tokens_to_ids("4"), *scripted]]))
    gens = inference.generate_text(model, enc, ["q", "r"], AUTO_SPEED, chain_ends_at_answer=True)
    assert [g.n_tokens for g in gens] == [0, 1] and gens[0].answer == "23"
    plain = inference.generate_text(model, enc, ["q", "r"], AUTO_SPEED)
    assert [g.n_tokens for g in plain] == [4, 5]  # CoT's count is unchanged


def test_validation_during_a_baseline_stage_decodes_as_the_method(tok, tmp_path):
    torch.manual_seed(0)
    model = tiny_model(tok, hidden=32, layers=1)
    method = CoconutConfig(epochs_per_stage=1, max_stage=2, thoughts_per_step=2, train=TrainConfig(
        backend="torch", max_steps=2, batch_size=2, checkpoint_every=0, eval_every=2,
        generation=GenerationConfig(max_answer_tokens=3, batch_size=4)))
    result = train_baseline(model, tok, CHAINS + PROBLEMS[:1], CHAINS[:2], method, tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r.get("event") == "eval"]
    assert evals and evals[-1]["n_eval"] == 2 and "acc" in evals[-1]
    assert evals[-1]["mean_chain_tokens"] == 2.0  # the thoughts of stage 1, decoded as Coconut
    assert result.best_model_dir is not None
