"""GRPO over latent reasoning: trajectories, group advantages, log-prob recomputation, clipped loss.

A trajectory is what :func:`colar_core.inference.generate_latent` returns with ``return_trace``:
the left-padded prompt (ending with the opening ``###``), the sampled latents (scaled space) with
their mask, and the answer tokens (the closing ``###`` first) with theirs. Its *actions* are

* each latent ``k`` (a draw from the head's diagonal Gaussian): log-density averaged over the
  hidden dims (``losses.gaussian_log_prob``), the head applied to the hidden state of the position
  before it (the last prompt position for ``k = 0``, latent ``k-1``'s otherwise);
* each answer token, the closing ``###`` included: its log-softmax (at the sampling temperature)
  at the previous real position (the last latent's, for ``###``).

:func:`policy_log_probs` recomputes both with one decoder pass over exactly the layout inference
used: ``[prompt embeddings, latents * scale, answer embeddings]`` with the attention mask
``[prompt_mask, latent_mask, answer_mask]`` and position ids ``cumsum(mask) - 1``, run packed
(``ColarModel.run_decoder_packed``: real columns moved to the front, plain causal attention, hidden
states put back in place). Masked columns are invisible to every real position, so the result equals
what the rollout's KV-cache decoding saw (tests check it against the logits and Gaussian parameters
recorded during generation).

The loss (:func:`clipped_policy_loss`) is PPO's clipped surrogate per action, with the group
advantage of the trajectory, plus ``beta * k3`` KL to a reference policy when asked. Per
trajectory it is aggregated by :func:`aggregate` (see ``AGGREGATIONS``), then averaged over the
trajectories of the optimizer step (every group of the step together, as the reference averages
over its experience mini-batch):

* ``part_mean`` (default, the reference's ``average_per_token_loss: True``, ``src/modules/grpo.py``
  ``GRPOLoss``): the mean over the trajectory's latents plus the mean over its answer tokens, so
  the answer weighs the same however long the chain is;
* ``token_mean``: one mean over latents and answer tokens together (colar's earlier default);
* ``sum``: the sum over all actions;
* ``sum_div32``: that sum divided by 32, exactly the reference's ``average_per_token_loss: False``
  (``masked_sum``), the setting its shipped ``colar.yaml`` names.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Optional, Sequence

import torch

from colar_core.losses import gaussian_entropy, gaussian_log_prob

LOG_RATIO_CLAMP = 20.0  # exp(20) ~ 5e8: keeps ratio * 0-advantage finite on wild updates


# ----------------------------------------------------------------------------------------------
# Trajectories
# ----------------------------------------------------------------------------------------------
@dataclass
class Trajectories:
    """A batch of latent rollouts and what the loss needs about them (rows = trajectories)."""

    prompt_ids: torch.Tensor  # [N, Lp] long, left-padded, ends with '###'
    prompt_mask: torch.Tensor  # [N, Lp] bool
    latents: torch.Tensor  # [N, K, H] scaled space
    latent_mask: torch.Tensor  # [N, K] bool
    answer_ids: torch.Tensor  # [N, T] long; '###' first
    answer_mask: torch.Tensor  # [N, T] bool
    advantages: Optional[torch.Tensor] = None  # [N] float32
    old_latent_logp: Optional[torch.Tensor] = None  # [N, K] float32 (0 where masked)
    old_answer_logp: Optional[torch.Tensor] = None  # [N, T]
    old_continue_logp: Optional[torch.Tensor] = None  # [N, K] (continue_actions only)
    ref_latent_logp: Optional[torch.Tensor] = None  # [N, K] (KL only)
    ref_answer_logp: Optional[torch.Tensor] = None  # [N, T]
    ref_continue_logp: Optional[torch.Tensor] = None  # [N, K]

    @classmethod
    def from_trace(cls, trace) -> "Trajectories":
        return cls(trace.prompt_ids, trace.prompt_mask.bool(), trace.latents, trace.latent_mask.bool(),
                   trace.answer_ids, trace.answer_mask.bool())

    def __len__(self) -> int:
        return int(self.prompt_ids.shape[0])

    @property
    def n_latents(self) -> torch.Tensor:
        return self.latent_mask.sum(1)

    def to(self, device) -> "Trajectories":
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)
                                if isinstance(getattr(self, f.name), torch.Tensor)})

    def select(self, rows) -> "Trajectories":
        """The given rows, with columns that are padding in all of them dropped (a shorter forward;
        masked columns never change real positions, so log-probs are unchanged)."""
        idx = torch.as_tensor(rows, dtype=torch.long, device=self.prompt_ids.device)
        pm, lm, am = self.prompt_mask[idx], self.latent_mask[idx], self.answer_mask[idx]
        p0 = int(pm.any(0).long().argmax()) if bool(pm.any()) else pm.shape[1]
        k = _last_true(lm.any(0)) + 1
        t = _last_true(am.any(0)) + 1
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, torch.Tensor):
                out[f.name] = v
                continue
            v = v[idx]
            if f.name.startswith("prompt"):
                v = v[:, p0:]
            elif f.name in ("latents", "latent_mask") or f.name.endswith(("latent_logp", "continue_logp")):
                v = v[:, :k]
            elif f.name.startswith("answer") or f.name.endswith("answer_logp"):
                v = v[:, :t]
            out[f.name] = v
        return Trajectories(**out)

    def split(self, micro_batch_size: Optional[int]) -> list["Trajectories"]:
        """Consecutive chunks of ``micro_batch_size`` rows (one chunk when None)."""
        n = len(self)
        size = micro_batch_size or n
        return [self.select(range(s, min(n, s + size))) for s in range(0, n, size)]


def _last_true(v: torch.Tensor) -> int:
    nz = torch.nonzero(v).flatten()
    return int(nz[-1]) if nz.numel() else -1


def concat_traces(traces: Sequence, pad_id: int) -> Trajectories:
    """One :class:`Trajectories` from several rollout chunks (prompts left-padded to the widest,
    latents and answers right-padded; padding is masked)."""
    trajs = [Trajectories.from_trace(t) if not isinstance(t, Trajectories) else t for t in traces]
    if len(trajs) == 1:
        return trajs[0]
    lp = max(t.prompt_ids.shape[1] for t in trajs)
    k = max(t.latents.shape[1] for t in trajs)
    ta = max(t.answer_ids.shape[1] for t in trajs)

    def pad(x, width, value, left=False):
        extra = width - x.shape[1]
        if extra == 0:
            return x
        shape = list(x.shape)
        shape[1] = extra
        filler = torch.full(shape, value, dtype=x.dtype, device=x.device)
        return torch.cat([filler, x] if left else [x, filler], dim=1)

    return Trajectories(
        torch.cat([pad(t.prompt_ids, lp, pad_id, True) for t in trajs]),
        torch.cat([pad(t.prompt_mask, lp, False, True) for t in trajs]),
        torch.cat([pad(t.latents, k, 0.0) for t in trajs]),
        torch.cat([pad(t.latent_mask, k, False) for t in trajs]),
        torch.cat([pad(t.answer_ids, ta, pad_id) for t in trajs]),
        torch.cat([pad(t.answer_mask, ta, False) for t in trajs]),
    )


# ----------------------------------------------------------------------------------------------
# Advantages
# ----------------------------------------------------------------------------------------------
def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """``(r - group mean) / (group std + eps)`` for rewards laid out group by group.

    ``rewards`` is ``[Q * G]`` with the ``G`` rollouts of a question contiguous. The std is the
    sample std (n - 1). A group whose rewards are all equal gets advantage exactly 0 (no division
    by a zero std, no rounding residue). Returns ``(advantages [Q*G] float32, constant [Q] bool)``.
    """
    r = rewards.detach().to(torch.float64).reshape(-1, group_size)
    mean = r.mean(1, keepdim=True)
    std = r.std(1, keepdim=True) if group_size > 1 else torch.zeros_like(mean)
    constant = (r.max(1).values == r.min(1).values)
    adv = torch.where(constant[:, None], torch.zeros_like(r), (r - mean) / (std + eps))
    return adv.reshape(-1).to(torch.float32), constant


# ----------------------------------------------------------------------------------------------
# Log-probabilities of a trajectory under the current policy
# ----------------------------------------------------------------------------------------------
@dataclass
class PolicyLogProbs:
    latent_logp: torch.Tensor  # [N, K] float32, 0 where masked
    answer_logp: torch.Tensor  # [N, T] float32, 0 where masked
    latent_entropy: torch.Tensor  # [N, K] float32, entropy per dim of the head's Gaussian, 0 where masked
    n_positions: int
    continue_logp: Optional[torch.Tensor] = None  # [N, K] log(1 - p('###')) after latent k, where the chain went on


def previous_real_position(mask: torch.Tensor) -> torch.Tensor:
    """``[N, L]``: for each column, the index of the last column before it whose mask is True (-1 if none)."""
    n, length = mask.shape
    ar = torch.arange(length, device=mask.device).expand(n, length)
    last_real = torch.where(mask.bool(), ar, torch.full_like(ar, -1)).cummax(dim=1).values
    return torch.cat([torch.full((n, 1), -1, dtype=ar.dtype, device=mask.device), last_real[:, :-1]], dim=1)


def continue_mask(latent_mask: torch.Tensor) -> torch.Tensor:
    """``[N, K]``: latents after which the chain went on (the next latent is real too)."""
    out = torch.zeros_like(latent_mask)
    out[:, :-1] = latent_mask[:, :-1] & latent_mask[:, 1:]
    return out


def policy_log_probs(model, traj: Trajectories, temperature: float = 1.0, think_id: Optional[int] = None
                     ) -> PolicyLogProbs:
    """Log-probabilities of every action of ``traj`` under ``model`` (one decoder pass; see the
    module docstring for the layout). Differentiable; call under ``no_grad`` for old / reference
    log-probs."""
    scale = model.state.embedding_scale
    prompt = model.embed(traj.prompt_ids)
    dtype = prompt.dtype
    latents_in = (traj.latents * scale).to(dtype).masked_fill(~traj.latent_mask[..., None], 0.0)
    answer = model.embed(traj.answer_ids)
    inputs = torch.cat([prompt, latents_in, answer], dim=1)
    mask = torch.cat([traj.prompt_mask, traj.latent_mask, traj.answer_mask], dim=1)
    hidden = model.run_decoder_packed(inputs, mask)

    lp, k = traj.prompt_ids.shape[1], traj.latents.shape[1]
    src = previous_real_position(mask).clamp(min=0)
    n, _, h = hidden.shape

    def at(cols: torch.Tensor) -> torch.Tensor:
        return hidden.gather(1, cols[..., None].expand(-1, -1, h))

    latent_logp = torch.zeros(traj.latent_mask.shape, dtype=torch.float32, device=hidden.device)
    latent_entropy = torch.zeros_like(latent_logp)
    if k and bool(traj.latent_mask.any()):
        h_lat = at(src[:, lp: lp + k])[traj.latent_mask]
        mean, log_std = model.latent_head(h_lat)
        target = traj.latents[traj.latent_mask].float()
        latent_logp = latent_logp.masked_scatter(traj.latent_mask, gaussian_log_prob(mean.float(), log_std.float(),
                                                                                     target))
        latent_entropy = latent_entropy.masked_scatter(traj.latent_mask, gaussian_entropy(log_std.float()))

    cont_logp = None
    if think_id is not None:  # the 'go on' decisions: log(1 - p('###')) at each latent that was followed by another
        cont = continue_mask(traj.latent_mask)
        cont_logp = torch.zeros(cont.shape, dtype=torch.float32, device=hidden.device)
        if bool(cont.any()):
            logits = model.token_logits(hidden[:, lp: lp + k][cont]).float() / temperature
            others = logits.clone()
            others[:, think_id] = float("-inf")
            cont_logp = cont_logp.masked_scatter(cont, torch.logsumexp(others, -1) - torch.logsumexp(logits, -1))

    answer_logp = torch.zeros(traj.answer_mask.shape, dtype=torch.float32, device=hidden.device)
    if bool(traj.answer_mask.any()):
        h_ans = at(src[:, lp + k:])[traj.answer_mask]
        logits = model.token_logits(h_ans).float() / temperature
        logp = torch.log_softmax(logits, dim=-1).gather(-1, traj.answer_ids[traj.answer_mask][:, None]).squeeze(-1)
        answer_logp = answer_logp.masked_scatter(traj.answer_mask, logp)
    return PolicyLogProbs(latent_logp, answer_logp, latent_entropy, int(mask.sum()), cont_logp)


# ----------------------------------------------------------------------------------------------
# The objective
# ----------------------------------------------------------------------------------------------
AGGREGATIONS = ("part_mean", "token_mean", "sum", "sum_div32")
#: The reference's ``masked_sum`` divides every trajectory's summed loss by this constant.
REFERENCE_SUM_DIVISOR = 32.0
#: Part ids of the action columns (see :func:`action_log_probs`).
LATENT_PART, ANSWER_PART = 0, 1


def aggregate(per_action: torch.Tensor, mask: torch.Tensor, how: str = "part_mean",
              parts: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Aggregate ``[N, A]`` per-action losses over each trajectory's masked actions, then take the
    mean over the ``N`` trajectories.

    ``parts`` (``[A]`` ints, or None: every column one part) says which part each column belongs
    to. ``part_mean``: the sum over parts of the mean over the part's masked actions (a part
    without actions adds 0); ``token_mean``: one mean over all masked actions; ``sum``: their sum;
    ``sum_div32``: their sum / 32 (the reference's ``masked_sum``). A trajectory without actions
    contributes 0.
    """
    if how not in AGGREGATIONS:
        raise ValueError(f"loss aggregation must be one of {AGGREGATIONS}, got {how!r}")
    m = mask.to(per_action.dtype)
    masked = per_action * m
    if how == "part_mean" and parts is not None:
        per_traj = masked.new_zeros(masked.shape[0])
        for p in torch.unique(parts).tolist():
            cols = parts == p
            per_traj = per_traj + masked[:, cols].sum(1) / m[:, cols].sum(1).clamp(min=1.0)
    else:
        per_traj = masked.sum(1)
        if how in ("token_mean", "part_mean"):  # part_mean with a single part is the token mean
            per_traj = per_traj / m.sum(1).clamp(min=1.0)
        elif how == "sum_div32":
            per_traj = per_traj / REFERENCE_SUM_DIVISOR
    return per_traj.mean() if per_traj.numel() else per_action.sum() * 0.0


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-action k3 estimate of KL(policy || reference): ``exp(d) - d - 1`` with ``d = ref - logp`` (>= 0)."""
    d = (ref_logp - logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return torch.exp(d) - d - 1.0


def clipped_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
    aggregation: str = "part_mean",
    ref_logp: Optional[torch.Tensor] = None,
    kl_beta: float = 0.0,
    parts: Optional[torch.Tensor] = None,
) -> dict[str, torch.Tensor]:
    """PPO's clipped surrogate over actions ``[N, L]`` with one advantage per trajectory ``[N]``.

    Per action: ``-min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A)`` with
    ``ratio = exp(logp - old_logp)``, plus ``kl_beta * k3`` when ``ref_logp`` is given; aggregated
    by :func:`aggregate` (``parts``: the part of each column, for ``part_mean``). Returns ``loss``
    and detached stats: ``pg_loss``, ``kl``, ``clip_frac`` (share of actions whose clipped branch
    is active), ``ratio_mean``, ``ratio_max``.
    """
    mask = mask.bool()
    log_ratio = (logp - old_logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    adv = advantages.to(ratio.dtype)[:, None]
    surr = ratio * adv
    surr_clipped = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * adv
    per_action = -torch.minimum(surr, surr_clipped)
    pg_loss = aggregate(per_action, mask, aggregation, parts)
    loss = pg_loss
    kl = pg_loss.new_zeros(())
    if ref_logp is not None and kl_beta > 0:
        kl_per = kl_k3(logp, ref_logp)
        kl = aggregate(kl_per, mask, aggregation, parts)
        loss = loss + kl_beta * kl
    with torch.no_grad():
        n = mask.sum().clamp(min=1)
        clipped = ((adv > 0) & (ratio > 1.0 + clip_eps)) | ((adv < 0) & (ratio < 1.0 - clip_eps))
        stats = {
            "pg_loss": pg_loss.detach(),
            "kl": kl.detach(),
            "clip_frac": (clipped & mask).sum() / n,
            "ratio_mean": (ratio * mask).sum() / n,
            "ratio_max": ratio.masked_fill(~mask, 0.0).max() if mask.any() else ratio.new_ones(()),
        }
    return {"loss": loss, **stats}


def action_log_probs(lp: PolicyLogProbs, traj: Trajectories, latent_actions: bool = True,
                     prefix: str = "") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(logp, mask, parts)`` over all actions of the objective, ``[N, A]``, ``[N, A]``, ``[A]``:
    latents (unless ``latent_actions`` is False), 'go on' decisions (when computed), answer tokens.

    ``parts`` is ``LATENT_PART`` for the latents and the 'go on' decisions (both are decisions of
    the chain, one per latent step) and ``ANSWER_PART`` for the answer tokens, the closing ``###``
    included (as the reference). With ``prefix`` 'old_' or 'ref_' the log-probs are read from
    ``traj`` instead of ``lp``.
    """
    def get(name):
        return getattr(traj, f"{prefix}{name}") if prefix else getattr(lp, name)

    lat_mask = traj.latent_mask if latent_actions else torch.zeros_like(traj.latent_mask)
    cols, masks, part_ids = [get("latent_logp")], [lat_mask], [LATENT_PART] * traj.latent_mask.shape[1]
    cont = get("continue_logp")
    if cont is not None:
        cols.append(cont)
        masks.append(continue_mask(traj.latent_mask))
        part_ids += [LATENT_PART] * cont.shape[1]
    cols.append(get("answer_logp"))
    masks.append(traj.answer_mask)
    part_ids += [ANSWER_PART] * traj.answer_mask.shape[1]
    parts = torch.tensor(part_ids, dtype=torch.long, device=traj.answer_mask.device)
    return torch.cat(cols, 1), torch.cat(masks, 1), parts


def grpo_loss(model, traj: Trajectories, clip_eps: float = 0.2, aggregation: str = "part_mean",
              kl_beta: float = 0.0, temperature: float = 1.0, latent_actions: bool = True,
              think_id: Optional[int] = None) -> dict[str, torch.Tensor]:
    """The RL loss of one micro-batch of trajectories (needs ``advantages`` and old log-probs).

    ``latent_actions`` False leaves the latents out of the objective (a deterministic head or
    mean latents: they are not samples of a density). ``think_id`` adds the 'go on' decisions
    (``log(1 - p('###'))`` after every latent the chain continued from; the trajectories then need
    ``old_continue_logp``). Also returns the latent head's entropy (mean per dim over the
    micro-batch's latents), mean log-probs and ``n_positions``.
    """
    if traj.advantages is None or traj.old_answer_logp is None:
        raise ValueError("trajectories need advantages and old log-probs (see RLBatches)")
    if think_id is not None and traj.old_continue_logp is None:
        raise ValueError("continue actions need old_continue_logp on the trajectories")
    cur = policy_log_probs(model, traj, temperature, think_id)
    logp, mask, parts = action_log_probs(cur, traj, latent_actions)
    old, _, _ = action_log_probs(cur, traj, latent_actions, "old_")
    ref = None
    if kl_beta > 0:
        if traj.ref_answer_logp is None:
            raise ValueError("kl_beta > 0 needs reference log-probs on the trajectories")
        ref, _, _ = action_log_probs(cur, traj, latent_actions, "ref_")
    out = clipped_policy_loss(logp, old, traj.advantages, mask, clip_eps, aggregation, ref, kl_beta, parts)
    with torch.no_grad():
        n_lat = traj.latent_mask.sum().clamp(min=1)
        n_ans = traj.answer_mask.sum().clamp(min=1)
        out["latent_entropy"] = (cur.latent_entropy * traj.latent_mask).sum() / n_lat
        out["latent_logp"] = (cur.latent_logp * traj.latent_mask).sum() / n_lat
        out["answer_logp"] = (cur.answer_logp * traj.answer_mask).sum() / n_ans
        out["n_positions"] = torch.tensor(cur.n_positions)
    return out
