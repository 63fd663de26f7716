"""RL building blocks on hand-made inputs: rewards, group advantages, the latent log-density, the
clipped loss, the config, and the log-prob recomputation against what generation actually saw."""

from __future__ import annotations

import math

import pytest
import torch

from bench.tiny import PROBLEMS, encoder_for, tiny_model, tiny_tokenizer
from colar_core.collate import collate
from colar_core.config import GenerationConfig, ObjectiveConfig
from colar_core.inference import generate_latent
from colar_core.losses import gaussian_log_prob
from colar_core.rl.config import RewardConfig, RLConfig
from colar_core.rl.grpo import (
    Trajectories,
    aggregate,
    clipped_policy_loss,
    concat_traces,
    continue_mask,
    group_advantages,
    grpo_loss,
    kl_k3,
    policy_log_probs,
    previous_real_position,
)
from colar_core.rl.rewards import combine, compute_rewards, correctness, length_bonus

pytestmark = pytest.mark.one_torch_thread  # see tests/conftest.py


# ----------------------------------------------------------------------------------------------
# rewards
# ----------------------------------------------------------------------------------------------
def test_correctness_uses_the_papers_answer_check():
    assert correctness("23", "23") == 1.0
    assert correctness("23.0", "23") == 1.0  # floats when both parse
    assert correctness("1,200", "1200") == 1.0  # thousands commas dropped
    assert correctness(" 7. ", "7") == 1.0
    assert correctness("24", "23") == 0.0
    assert correctness(None, "23") == 0.0  # nothing extracted
    assert correctness("abc", "abd") == 0.0 and correctness("abc", "abc") == 1.0


def test_length_bonus_only_for_correct_answers_and_shorter_is_better():
    assert length_bonus(0.0, 1, 64) == 0.0 and length_bonus(0.0, 1, 64, "inverse") == 0.0
    assert length_bonus(1.0, 16, 64) == pytest.approx(0.75)
    assert length_bonus(1.0, 64, 64) == 0.0 and length_bonus(1.0, 100, 64) == 0.0  # capped, never negative
    assert length_bonus(1.0, 2, 64) > length_bonus(1.0, 3, 64)
    assert length_bonus(1.0, 1, 64, "inverse") == 1.0 and length_bonus(1.0, 4, 64, "inverse") == 0.25
    with pytest.raises(ValueError):
        length_bonus(1.0, 2, 64, "square")


def test_rewards_combine_by_weights_and_never_reward_a_wrong_answer():
    out = compute_rewards(["23", "23", "5", None], ["23", "23", "23", "23"], [2, 8, 1, 1], max_latents=8,
                          correct_weight=1.0, length_weight=0.5)
    assert out["correct"] == [1.0, 1.0, 0.0, 0.0]
    assert out["length"] == [pytest.approx(0.75), 0.0, 0.0, 0.0]
    assert out["total"] == [pytest.approx(1.375), 1.0, 0.0, 0.0]
    # whatever the weights, every correct rollout out-scores every wrong one
    for w in (0.0, 0.1, 1.0, 10.0):
        t = compute_rewards(["1", "2"], ["1", "1"], [8, 1], 8, 1.0, w)["total"]
        assert t[1] == 0.0 and t[0] >= 1.0
    assert combine({"a": [1, 2], "b": [3, 4]}, {"a": 1.0, "b": -1.0}) == [-2.0, -2.0]
    with pytest.raises(KeyError):
        combine({"a": [1]}, {})


# ----------------------------------------------------------------------------------------------
# advantages
# ----------------------------------------------------------------------------------------------
def test_group_advantages_normalise_each_group_and_zero_constant_groups():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0,   0.0, 0.0, 0.0, 0.0,   1.0, 1.0, 1.0, 1.0,   0.1, 0.1, 0.1, 0.1])
    adv, constant = group_advantages(r, 4)
    assert constant.tolist() == [False, True, True, True]
    assert torch.isfinite(adv).all()
    assert adv[4:].eq(0).all()  # constant groups: exactly zero, no 0/0 and no rounding residue
    g = r[:4].double()
    expected = (g - g.mean()) / (g.std() + 1e-8)  # sample std, as torch.std
    assert torch.allclose(adv[:4].double(), expected, atol=1e-6)
    assert adv[:4].sum().abs() < 1e-6


def test_group_advantages_layout_is_contiguous_groups():
    adv, _ = group_advantages(torch.tensor([0.0, 1.0, 5.0, 5.0, 3.0, 1.0]), 2)
    assert adv[0] < 0 < adv[1] and adv[2] == adv[3] == 0 and adv[4] > 0 > adv[5]


# ----------------------------------------------------------------------------------------------
# densities and the loss
# ----------------------------------------------------------------------------------------------
def test_latent_log_density_is_the_normal_log_prob_mean_over_dims():
    g = torch.Generator().manual_seed(0)
    mean, log_std, x = (torch.randn(5, 7, generator=g) for _ in range(3))
    expected = torch.distributions.Normal(mean, log_std.exp()).log_prob(x).mean(-1)
    assert torch.allclose(gaussian_log_prob(mean, log_std, x), expected, atol=1e-6)


def test_clipped_loss_equals_the_written_out_formula():
    eps = 0.2
    ratio = torch.tensor([[0.5, 1.0, 1.5, 1.1], [0.7, 1.3, 0.9, 2.0]])
    adv = torch.tensor([1.0, -2.0])
    mask = torch.tensor([[True, True, True, False], [True, True, True, True]])
    old = torch.log(torch.tensor([[0.3, 0.2, 0.1, 0.4], [0.5, 0.25, 0.6, 0.05]]))
    logp = old + torch.log(ratio)

    # row 0, A = +1: min(r A, clip(r) A) = min(0.5, 0.8)=0.5, min(1,1)=1, min(1.5,1.2)=1.2; mean -> -(2.7/3)
    # row 1, A = -2: min(-1.4,-1.6)=-1.6, min(-2.6,-2.4)=-2.6, min(-1.8,-1.8)=-1.8, min(-4,-2.4)=-4
    row0 = -(0.5 + 1.0 + 1.2) / 3
    row1 = -(-1.6 - 2.6 - 1.8 - 4.0) / 4
    out = clipped_policy_loss(logp, old, adv, mask, eps, "token_mean")
    assert out["loss"].item() == pytest.approx((row0 + row1) / 2, rel=1e-5)
    out_sum = clipped_policy_loss(logp, old, adv, mask, eps, "sum")
    assert out_sum["loss"].item() == pytest.approx((row0 * 3 + row1 * 4) / 2, rel=1e-5)
    # clipped branch active: row 0 ratio 1.5 (A>0, r>1.2); row 1 ratio 0.7 (A<0, r<0.8). 2 of 7 actions
    assert out["clip_frac"].item() == pytest.approx(2 / 7)
    # generic check against the formula on random inputs
    g = torch.Generator().manual_seed(1)
    logp, old = torch.randn(6, 9, generator=g) * 0.3, torch.randn(6, 9, generator=g) * 0.3
    adv, mask = torch.randn(6, generator=g), torch.rand(6, 9, generator=g) > 0.3
    r = torch.exp(logp - old)
    per = -torch.minimum(r * adv[:, None], torch.clamp(r, 1 - eps, 1 + eps) * adv[:, None])
    per_row = (per * mask).sum(1) / mask.sum(1).clamp(min=1)
    assert torch.allclose(clipped_policy_loss(logp, old, adv, mask, eps)["loss"], per_row.mean(), atol=1e-6)


def _reference_grpo_loss(lat_logp, lat_old, lat_mask, ans_logp, ans_old, ans_mask, adv, eps, per_token):
    """The reference's GRPOLoss (src/modules/grpo.py), written out: clipped loss per action, then per
    trajectory masked_mean (average_per_token_loss True) or masked_sum = sum / 32 (False), mean over
    the batch's trajectories, separately for latents and answer tokens; total = latent + answer."""
    def part(logp, old, mask):
        ratio = (logp - old).exp()
        a = adv[:, None]
        loss = -torch.min(ratio * a, ratio.clamp(1 - eps, 1 + eps) * a)
        m = mask.float()
        per_row = (loss * m).sum(-1) / m.sum(-1) if per_token else (loss * m).sum(-1) / 32
        return per_row.mean()
    return part(lat_logp, lat_old, lat_mask) + part(ans_logp, ans_old, ans_mask)


def test_part_mean_and_sum_div32_are_the_references_two_modes():
    g = torch.Generator().manual_seed(4)
    n, k, t, eps = 6, 9, 5, 0.2
    lat_old, ans_old = torch.randn(n, k, generator=g) * 0.3, torch.randn(n, t, generator=g) * 0.3
    lat_logp = lat_old + torch.randn(n, k, generator=g) * 0.4
    ans_logp = ans_old + torch.randn(n, t, generator=g) * 0.4
    lengths = torch.tensor([1, 9, 3, 5, 2, 8])  # ragged chains, right-padded as the reference's
    lat_mask = torch.arange(k)[None] < lengths[:, None]
    ans_mask = torch.arange(t)[None] < torch.tensor([5, 2, 3, 4, 5, 1])[:, None]
    adv = torch.randn(n, generator=g)
    logp, old = torch.cat([lat_logp, ans_logp], 1), torch.cat([lat_old, ans_old], 1)
    mask = torch.cat([lat_mask, ans_mask], 1)
    parts = torch.tensor([0] * k + [1] * t)
    for how, per_token in (("part_mean", True), ("sum_div32", False)):
        want = _reference_grpo_loss(lat_logp, lat_old, lat_mask, ans_logp, ans_old, ans_mask, adv, eps, per_token)
        got = clipped_policy_loss(logp, old, adv, mask, eps, how, parts=parts)["loss"]
        assert got.item() == pytest.approx(want.item(), rel=1e-5), how
    # token_mean (one mean over both) is not the reference's combination on ragged chains
    one_mean = clipped_policy_loss(logp, old, adv, mask, eps, "token_mean", parts=parts)["loss"]
    ref = _reference_grpo_loss(lat_logp, lat_old, lat_mask, ans_logp, ans_old, ans_mask, adv, eps, True)
    assert abs(one_mean.item() - ref.item()) > 1e-3


def test_part_mean_keeps_the_answers_weight_as_the_chain_grows():
    """Gradient reaching an answer token's log-prob, for a 1-latent and a 30-latent chain: with
    part_mean it is the same (1 / answer tokens); token_mean divides it by the chain length too."""
    def answer_grad(n_latents: int, how: str) -> float:
        k, t = 30, 3
        logp = torch.zeros(1, k + t, requires_grad=True)
        mask = torch.cat([torch.arange(k) < n_latents, torch.ones(t, dtype=torch.bool)])[None]
        parts = torch.tensor([0] * k + [1] * t)
        clipped_policy_loss(logp, torch.zeros(1, k + t), torch.ones(1), mask, 0.2, how, parts=parts)["loss"].backward()
        return logp.grad[0, k].item()
    assert answer_grad(1, "part_mean") == pytest.approx(answer_grad(30, "part_mean")) == pytest.approx(-1 / 3)
    assert answer_grad(30, "token_mean") == pytest.approx(answer_grad(1, "token_mean") * 4 / 33)


def test_kl_term_is_k3_and_zero_at_the_reference():
    logp = torch.tensor([[-1.0, -2.0]])
    assert kl_k3(logp, logp).abs().max() == 0
    d = torch.tensor([[0.5, -0.3]])
    assert torch.allclose(kl_k3(logp, logp + d), torch.exp(d) - d - 1)
    mask = torch.ones(1, 2, dtype=torch.bool)
    with_kl = clipped_policy_loss(logp, logp, torch.zeros(1), mask, 0.2, ref_logp=logp + d, kl_beta=0.1)
    assert with_kl["loss"].item() == pytest.approx(0.1 * (torch.exp(d) - d - 1).mean().item(), rel=1e-5)


def test_aggregate_and_masks():
    per = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    m = torch.tensor([[True, True, False], [False, False, False]])
    assert aggregate(per, m, "token_mean").item() == pytest.approx((1.5 + 0.0) / 2)
    assert aggregate(per, m, "sum").item() == pytest.approx(1.5)
    assert aggregate(per, m, "sum_div32").item() == pytest.approx(1.5 / 32)
    per2 = torch.tensor([[1.0, 3.0, 10.0, 20.0, 0.0], [2.0, 0.0, 6.0, 0.0, 0.0]])
    m2 = torch.tensor([[True, True, True, True, False], [True, False, False, False, False]])
    parts = torch.tensor([0, 0, 1, 1, 1])
    # row 0: mean(1, 3) + mean(10, 20) = 2 + 15; row 1: mean(2) + (no answer actions: 0)
    assert aggregate(per2, m2, "part_mean", parts).item() == pytest.approx((17.0 + 2.0) / 2)
    assert aggregate(per2, m2, "part_mean").item() == aggregate(per2, m2, "token_mean").item()  # one part
    with pytest.raises(ValueError, match="aggregation"):
        aggregate(per, m, "mean")
    mask = torch.tensor([[False, False, True, False, True, False]])
    assert previous_real_position(mask).tolist() == [[-1, -1, -1, 2, 2, 4]]
    assert continue_mask(torch.tensor([[True, True, True, False]])).tolist() == [[True, True, False, False]]


# ----------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------
def test_config_defaults_follow_the_reference_and_validate():
    c = RLConfig()
    assert (c.group_size, c.clip_eps, c.lr, c.grad_clip, c.kl_beta, c.update_epochs) == (8, 0.2, 1e-6, 1.0, 0.0, 1)
    assert c.loss_aggregation == "part_mean" and c.compression_factor == 2  # the reference's combination
    assert c.rewards.correct == 1.0 and c.rewards.length == 0.0
    assert c.generation.sample_latents and c.generation.do_sample
    with pytest.raises(ValueError, match="compression_factor"):
        RLConfig(compression_factor=0)
    with pytest.raises(ValueError, match="group_siz"):
        RLConfig(group_siz=4)  # typo: refused, not ignored
    with pytest.raises(ValueError, match="micro_batch_size"):
        RLConfig(questions_per_step=3, group_size=4, micro_batch_size=5)
    with pytest.raises(ValueError, match="identical"):
        RLConfig(generation=GenerationConfig(do_sample=False, sample_latents=False))
    with pytest.raises(ValueError, match="all zero"):
        RewardConfig(correct=0.0, length=0.0)
    t = RLConfig(max_steps=10, update_epochs=3, checkpoint_every=4, questions_per_step=4, group_size=8,
                 micro_batch_size=16, backend="torch").train_config()
    assert (t.max_steps, t.checkpoint_every, t.batch_size, t.grad_accum, t.lr) == (30, 12, 16, 2, 1e-6)
    assert t.eval_factors() == [2]


def test_trajectories_per_update_sets_the_updates_of_a_rollout_and_is_checked():
    """The reference's exp_batch_size: one optimizer update per mini-batch of a rollout's trajectories."""
    assert RLConfig().trajectories_per_update is None and RLConfig().updates_per_rollout == 1  # one per rollout
    c = RLConfig(max_steps=10, questions_per_step=4, group_size=8, trajectories_per_update=8, micro_batch_size=4,
                 update_epochs=2, checkpoint_every=3, eval_every=5, backend="torch")
    assert (c.updates_per_pass, c.updates_per_rollout, c.total_updates) == (4, 8, 80)
    t = c.train_config()  # steps there are optimizer updates: checkpoints and evaluations on rollout boundaries
    assert (t.max_steps, t.batch_size, t.grad_accum, t.checkpoint_every, t.eval_every) == (80, 4, 2, 24, 40)
    with pytest.raises(ValueError, match="trajectories_per_update"):
        RLConfig(questions_per_step=3, group_size=4, trajectories_per_update=5)  # 12 trajectories
    with pytest.raises(ValueError, match="micro_batch_size"):
        RLConfig(questions_per_step=4, group_size=4, trajectories_per_update=8, micro_batch_size=16)
    with pytest.raises(ValueError, match="trajectories_per_update"):
        RLConfig(trajectories_per_update=0)
    with pytest.raises(ValueError, match="warmup_steps"):  # counted in updates, with the mini-batches
        RLConfig(max_steps=2, questions_per_step=2, group_size=4, trajectories_per_update=4, warmup_steps=5)
    assert RLConfig(max_steps=2, questions_per_step=2, group_size=4, trajectories_per_update=4,
                    warmup_steps=4).total_updates == 4


# ----------------------------------------------------------------------------------------------
# log-probs recomputed = log-probs the rollout sampled from
# ----------------------------------------------------------------------------------------------
def briefly_trained(tok, enc, steps=60):
    """A tiny model after a few CoLaR SFT steps: it emits '###' sometimes, so chains are ragged."""
    torch.manual_seed(0)
    model = tiny_model(tok)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    examples, g = [enc.encode(r) for r in PROBLEMS], torch.Generator().manual_seed(0)
    for step in range(steps):
        loss = model.sft_loss(collate(examples, enc, 1 + step % 2, generator=g), ObjectiveConfig(), g)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def rollout():
    """Sampled rollouts of a tiny model, with the token logits and Gaussian parameters that
    generation computed recorded as it went."""
    tok = tiny_tokenizer()
    enc = encoder_for(tok)
    model = briefly_trained(tok, enc)
    calls, heads = [], []
    original = model.token_logits

    def recording(h):
        out = original(h)
        calls.append(out.detach())
        return out

    model.token_logits = recording
    hook = model.latent_head.register_forward_hook(lambda mod, inp, out: heads.append([o.detach() for o in out]))
    questions = [p.question for p in PROBLEMS for _ in range(3)]
    gens, trace = generate_latent(model, enc, questions, 2, GenerationConfig(max_latents=10, max_answer_tokens=6),
                                  torch.Generator().manual_seed(3), return_trace=True)
    hook.remove()
    del model.token_logits
    return model, enc, gens, trace, calls, heads


def test_recomputed_log_probs_equal_those_seen_during_generation(rollout):
    model, enc, gens, trace, calls, heads = rollout
    n = trace.latent_mask.sum(1)
    k, t = trace.latents.shape[1], trace.answer_ids.shape[1]
    assert len(set(n.tolist())) > 1 and len(calls) == k + t - 1  # ragged chains; K stop checks + T-1 tokens
    with torch.no_grad():
        lp = policy_log_probs(model, Trajectories.from_trace(trace), think_id=enc.think_id)
    for i in range(len(gens)):
        # the closing '###' is predicted at the last latent's position (the stop check there)
        want = torch.log_softmax(calls[n[i] - 1][i].float(), -1)[enc.think_id]
        assert lp.answer_logp[i, 0].item() == pytest.approx(want.item(), abs=1e-5)
        for j in range(1, t):
            if trace.answer_mask[i, j]:
                want = torch.log_softmax(calls[k + j - 1][i].float(), -1)[trace.answer_ids[i, j]]
                assert lp.answer_logp[i, j].item() == pytest.approx(want.item(), abs=1e-5)
            else:
                assert lp.answer_logp[i, j] == 0
        for kk in range(k):
            if trace.latent_mask[i, kk]:
                mean, log_std = heads[kk][0][i], heads[kk][1][i]
                want = torch.distributions.Normal(mean, log_std.exp()).log_prob(trace.latents[i, kk]).mean()
                assert lp.latent_logp[i, kk].item() == pytest.approx(want.item(), abs=1e-5)
            if kk < n[i] - 1:  # the chain went on after latent kk: log(1 - p('###')) at that stop check
                p_stop = torch.softmax(calls[kk][i].float(), -1)[enc.think_id]
                assert lp.continue_logp[i, kk].item() == pytest.approx(math.log1p(-p_stop.item()), abs=1e-5)
            else:
                assert lp.continue_logp[i, kk] == 0


def test_ratio_is_one_at_the_first_update_and_micro_batching_changes_nothing(rollout):
    model, enc, gens, trace, _, _ = rollout
    traj = Trajectories.from_trace(trace)
    traj.advantages = torch.linspace(-1, 1, len(traj))
    whole = policy_log_probs(model, traj, think_id=enc.think_id)
    parts = traj.split(5)  # ragged chunks, padding columns dropped per chunk
    assert [len(p) for p in parts] == [5, 5, 2]
    got = torch.cat([policy_log_probs(model, p, think_id=enc.think_id).answer_logp.sum(1) for p in parts])
    assert torch.allclose(got, whole.answer_logp.sum(1), atol=1e-5)
    for p in parts:
        with torch.no_grad():
            old = policy_log_probs(model, p, think_id=enc.think_id)
        p.old_latent_logp, p.old_answer_logp, p.old_continue_logp = old.latent_logp, old.answer_logp, old.continue_logp
        out = grpo_loss(model, p, think_id=enc.think_id)
        assert out["ratio_mean"].item() == pytest.approx(1.0, abs=1e-6) and out["clip_frac"] == 0
        out["loss"].backward()  # differentiable
    assert model.latent_head.mean.weight.grad is not None
    model.zero_grad(set_to_none=True)


def test_grpo_loss_aggregations_at_the_first_update(rollout):
    """Ratio 1 at the first update, so every action's clipped loss is -A: part_mean gives -2A per
    trajectory (latents' mean + answer's mean), token_mean -A, sum -A * actions, sum_div32 that / 32."""
    model, enc, gens, trace, _, _ = rollout
    traj = Trajectories.from_trace(trace)
    traj.advantages = torch.linspace(-1, 1.5, len(traj))
    with torch.no_grad():
        old = policy_log_probs(model, traj)
        traj.old_latent_logp, traj.old_answer_logp = old.latent_logp, old.answer_logp
        a = traj.advantages
        n_actions = (traj.latent_mask.sum(1) + traj.answer_mask.sum(1)).float()
        want = {"part_mean": (-2 * a).mean(), "token_mean": (-a).mean(), "sum": (-a * n_actions).mean(),
                "sum_div32": (-a * n_actions / 32).mean()}
        for how, value in want.items():
            assert grpo_loss(model, traj, aggregation=how)["loss"].item() == pytest.approx(value.item(), abs=1e-5)
        assert grpo_loss(model, traj)["loss"].item() == pytest.approx(want["part_mean"].item(), abs=1e-5)
        # a deterministic head (no latent actions): the latent part is empty, only the answer's mean is left
        no_lat = grpo_loss(model, traj, latent_actions=False)["loss"]
        assert no_lat.item() == pytest.approx((-a).mean().item(), abs=1e-5)


def test_concatenated_rollout_chunks_keep_every_rows_log_probs(rollout):
    model, enc, gens, trace, _, _ = rollout
    traj = Trajectories.from_trace(trace)
    a, b = traj.select(range(0, 4)), traj.select(range(4, len(traj)))
    joined = concat_traces([a, b], enc.pad_id)
    assert len(joined) == len(traj)
    with torch.no_grad():
        x = policy_log_probs(model, joined)
        y = policy_log_probs(model, traj)
    m = traj.answer_mask
    assert torch.allclose(x.answer_logp[:, : m.shape[1]][m], y.answer_logp[m], atol=1e-5)
    lm = traj.latent_mask
    assert torch.allclose(x.latent_logp[:, : lm.shape[1]][lm], y.latent_logp[lm], atol=1e-5)
