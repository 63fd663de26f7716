"""The RL stage: GRPO on a CoLaR-SFT model, on the stage skeleton SFT uses (engine, loop, checkpoints).

One RL step (``RLConfig``):

1. **Rollout** (``RLBatches.__call__``, no grad, model in eval mode, under ``engine.full_model()``
   so ZeRO-3 works): the process's next ``questions_per_step`` questions, each repeated
   ``group_size`` times (contiguous), go through
   :func:`~colar_core.inference.generate_latent` at ``compression_factor`` with
   ``return_trace=True``: latents sampled from the Gaussian head, answers sampled from the LM head.
2. **Rewards** (:mod:`colar_core.rl.rewards`) and **group advantages**
   (:func:`~colar_core.rl.grpo.group_advantages`).
3. **Old log-probs** of every action, once, with no grad, through ``engine.forward`` on the same
   micro-batches the loss will see (so the ratio is exactly 1 at the first update); reference
   log-probs from a frozen copy of the starting model when ``kl_beta > 0``.
4. **Updates**: ``update_epochs`` passes over the rollout, each of ``updates_per_pass`` optimizer
   steps of the shared :func:`train_loop` (one over all trajectories, or one per
   ``trajectories_per_update`` of them after a seeded shuffle, as the reference's ``exp_batch_size``),
   each over its micro-batches with :func:`~colar_core.rl.grpo.grpo_loss` as ``loss_fn``.

Per-step metrics (``metrics.jsonl`` and every callback's ``on_step``):

* rollout statistics, summed over processes (``StepBatch.info``): ``reward_mean``, ``reward_std``
  (over all the step's rollouts), ``accuracy``, ``mean_latents`` (#L), ``mean_latents_correct``,
  ``zero_var_groups`` (share of groups whose rewards are all equal: no signal),
  ``reward_length`` (mean length bonus), ``mean_answer_tokens``, ``rollout_time_s``, ``r``,
  ``rollout``, ``update_pass``, ``minibatch`` (the update's place in its pass), ``epoch``;
* loss parts from ``loss_fn``, averaged over micro-batches and processes: ``loss``, ``pg_loss``,
  ``kl``, ``clip_frac``, ``ratio_mean``, ``ratio_max``, ``latent_entropy`` (entropy per dim of the
  latent head's Gaussian at the sampled latents), ``latent_logp``, ``answer_logp``;
* from the loop: ``lr``, ``grad_norm``, ``step_time_s``, ``tokens_per_s``. Checkpoints hold
the question order and the rollout generator's state besides the engine and the global RNGs, and
are only written on rollout boundaries, so a resumed run samples exactly what an uninterrupted
one would. The output is ``output_dir/model`` (``export_model`` with the tokenizer), loadable by
inference and evaluation unchanged.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch
from pydantic import Field
from torch import nn

from colar_core.config import ModelConfig
from colar_core.inference import Generation, LatentTrace, generate_latent
from colar_core.model import ColarModel
from colar_core.rl.config import RLConfig
from colar_core.rl.grpo import Trajectories, concat_traces, group_advantages, grpo_loss, policy_log_probs
from colar_core.rl.rewards import compute_rewards
from colar_core.text import PromptEncoder
from colar_core.training.callbacks import Callback
from colar_core.training.checkpoint import CheckpointManager
from colar_core.training.engines import Engine, build_engine
from colar_core.training.launch import run_job
from colar_core.training.loop import StepBatch
from colar_core.training.sampler import EpochSampler
from colar_core.training.stage import (
    METRICS_FILE,
    JobResultMixin,
    StageData,
    StageJob,
    finish_stage,
    run_stage_loop,
    start_stage,
)

log = logging.getLogger(__name__)

CONFIG_FILE = "rl_config.json"
ENTRY_MODULE = "colar_core.rl.rl_main"


def disable_dropout(model: nn.Module) -> int:
    """Set every dropout probability in ``model`` to 0 (modules and HF attention-dropout floats).
    Returns how many were non-zero."""
    changed = 0
    for m in model.modules():
        if isinstance(m, nn.Dropout) and m.p:
            m.p, changed = 0.0, changed + 1
        p = getattr(m, "attention_dropout", None)
        if isinstance(p, float) and p:  # a plain float attribute of an HF attention module
            setattr(m, "attention_dropout", 0.0)
            changed += 1
    return changed


# ----------------------------------------------------------------------------------------------
# Rollouts -> micro-batches of trajectories
# ----------------------------------------------------------------------------------------------
class RLBatches:
    """``batches_fn`` of the shared loop: rolls out every ``updates_per_rollout`` optimizer steps and
    hands each update's micro-batches of trajectories (with advantages and old log-probs) to the loss.

    State (checkpointed): position in the seeded question order (an :class:`EpochSampler`, as SFT's),
    the number of rollouts, and the rollout sampling generator (per process).
    """

    def __init__(self, records: Sequence, encoder: PromptEncoder, cfg: RLConfig, engine: Engine[ColarModel],
                 ref_model: Optional[nn.Module] = None):
        self.records, self.encoder, self.cfg, self.engine = list(records), encoder, cfg, engine
        self.ref_model = ref_model
        self.rank, self.world_size = engine.rank, engine.world_size
        self.global_q = cfg.questions_per_step * self.world_size
        if len(self.records) < self.global_q:
            raise ValueError(f"{len(self.records)} training questions cannot fill one RL step of "
                             f"questions_per_step {cfg.questions_per_step} x {self.world_size} process(es)")
        self.order = EpochSampler(len(self.records), cfg.questions_per_step, self.rank, self.world_size, cfg.seed)
        self.rollouts = 0
        self.gen_rng = torch.Generator(device=engine.device).manual_seed(cfg.seed * 7919 + 104729 * (self.rank + 1))
        self._cache: Optional[tuple[list, dict]] = None
        self.latent_actions = cfg.generation.sample_latents and not engine.model.state.deterministic_latents
        self.temperature = cfg.generation.temperature if cfg.generation.do_sample else 1.0
        self.think_id = encoder.think_id if cfg.continue_actions else None

    # ----- one rollout ----------------------------------------------------------------------------
    def rollout(self) -> tuple[list[list[Trajectories]], dict]:
        """Sample one rollout; return its updates (each a list of micro-batches) and its statistics."""
        cfg, gen, g = self.cfg, self.cfg.generation, self.cfg.group_size
        t0 = time.perf_counter()
        records = [self.records[i] for i in self.order.next_indices()]
        questions = [r.question for r in records for _ in range(g)]
        golds = [str(r.answer) for r in records for _ in range(g)]
        gens: list[Generation] = []
        traces: list[LatentTrace] = []
        with torch.no_grad(), self.engine.full_model() as model:
            was_training = model.training
            model.eval()
            try:
                for s in range(0, len(questions), gen.batch_size):
                    out, trace = generate_latent(model, self.encoder, questions[s: s + gen.batch_size],
                                                 cfg.compression_factor, gen, self.gen_rng, return_trace=True)
                    gens += out
                    traces.append(trace)
            finally:
                model.train(was_training)
        self.rollouts += 1
        t_rollout = time.perf_counter() - t0

        traj = concat_traces(traces, self.encoder.pad_id).to(self.engine.device)
        n_latents = [gg.n_latents for gg in gens]
        rewards = compute_rewards([gg.answer for gg in gens], golds, n_latents, gen.max_latents,
                                  cfg.rewards.correct, cfg.rewards.length, cfg.rewards.length_form)
        total = torch.tensor(rewards["total"], dtype=torch.float64)
        adv, constant = group_advantages(total, g)
        traj.advantages = adv.to(self.engine.device)
        updates = [part.split(cfg.micro_batch_size) for part in self._update_parts(traj)]
        with torch.no_grad():
            for mb in (mb for update in updates for mb in update):
                lat, cont, ans = self.engine.forward(self._logp_fn, mb)
                mb.old_latent_logp, mb.old_answer_logp = lat.detach().float(), ans.detach().float()
                mb.old_continue_logp = cont.detach().float() if cont is not None else None
                if self.ref_model is not None:
                    ref = policy_log_probs(self.ref_model, mb, self.temperature, self.think_id)
                    mb.ref_latent_logp, mb.ref_answer_logp = ref.latent_logp, ref.answer_logp
                    mb.ref_continue_logp = ref.continue_logp

        correct = torch.tensor(rewards["correct"], dtype=torch.float64)
        lengths = torch.tensor(n_latents, dtype=torch.float64)
        answer_tokens = (traj.answer_mask.sum(1) - 1).double().cpu()  # without the closing '###'
        sums = torch.stack([
            total.sum(), (total ** 2).sum(), torch.tensor(float(len(total))), correct.sum(), lengths.sum(),
            (lengths * correct).sum(), torch.tensor(float(constant.sum())), torch.tensor(float(constant.numel())),
            answer_tokens.sum(), torch.tensor(rewards["length"], dtype=torch.float64).sum(), torch.tensor(t_rollout),
        ])
        totals = self.engine.all_reduce_sum(sums).tolist()
        r_sum, r2_sum, n, c_sum, l_sum, lc_sum, const, groups, ans_sum, len_sum, t_sum = totals
        mean = r_sum / n
        info = {
            "reward_mean": mean,
            "reward_std": max(0.0, r2_sum / n - mean ** 2) ** 0.5,
            "accuracy": c_sum / n,
            "mean_latents": l_sum / n,
            "mean_latents_correct": lc_sum / c_sum if c_sum else float("nan"),
            "zero_var_groups": const / groups,
            "mean_answer_tokens": ans_sum / n,
            "reward_length": len_sum / n,
            "rollout_time_s": t_sum / self.world_size,
            "r": cfg.compression_factor,
            "rollout": self.rollouts,
            "epoch": self.order.epoch,
        }
        return updates, info

    def _update_parts(self, traj: Trajectories) -> list[Trajectories]:
        """The rollout's trajectories cut into the mini-batches of its optimizer updates: all of them in
        one when ``trajectories_per_update`` is None, else a seeded shuffle (this process's seed, rank and
        rollout number, so a resumed run cuts alike) cut into chunks of that size, as the reference
        shuffles its replay buffer into mini-batches of ``exp_batch_size``."""
        size = self.cfg.trajectories_per_optimizer_step
        if size >= len(traj):
            return [traj]
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + 7919 * self.rollouts + 104729 * (self.rank + 1))
        perm = torch.randperm(len(traj), generator=g).tolist()
        return [traj.select(perm[s: s + size]) for s in range(0, len(traj), size)]

    def _logp_fn(self, model, traj: Trajectories):
        cur = policy_log_probs(model, traj, self.temperature, self.think_id)
        return cur.latent_logp, cur.continue_logp, cur.answer_logp

    def __call__(self, step: int) -> StepBatch:
        u = self.cfg.updates_per_rollout
        if step % u == 0 or self._cache is None:
            if step % u:
                log.warning("step %d is inside a rollout's updates but no rollout is cached: rolling out anew",
                            step)
            self._cache = self.rollout()
        updates, info = self._cache
        update_pass, minibatch = divmod(step % u, self.cfg.updates_per_pass)
        return StepBatch(updates[minibatch], {**info, "update_pass": update_pass, "minibatch": minibatch})

    def loss_fn(self, model, traj: Trajectories) -> dict:
        c = self.cfg
        return grpo_loss(model, traj, c.clip_eps, c.loss_aggregation, c.kl_beta, self.temperature,
                         self.latent_actions, self.think_id)

    def state_dict(self) -> dict:
        return {**self.order.state_dict(), "rollouts": self.rollouts,
                "global_q": self.global_q, "gen_rng": self.gen_rng.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.order.load_state_dict(state)
        self.rollouts = int(state["rollouts"])
        if int(state.get("global_q", self.global_q)) != self.global_q:
            log.warning("questions per step changed (%s -> %s): question order continues from the same index",
                        state.get("global_q"), self.global_q)
        self.gen_rng.set_state(state["gen_rng"])
        self._cache = None


# ----------------------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------------------
@dataclass
class RLResult(JobResultMixin):
    """What a finished RL stage hands on (also written to ``output_dir/result.json``)."""

    model_dir: Path
    final_step: int  # optimizer updates done (= rl_steps * updates_per_rollout)
    rl_steps: int  # rollouts done
    metrics_path: Path
    resumed_from: Optional[int] = None
    best_val_accuracy: Optional[float] = None
    best_model_dir: Optional[Path] = None
    best_step: Optional[int] = None
    stopped_early: bool = False
    output_dir: Optional[Path] = None


def train_rl(
    model: ColarModel,
    tokenizer,
    train_records: Sequence,
    val_records: Sequence = (),
    cfg: Optional[RLConfig] = None,
    output_dir: Union[str, Path] = "runs/rl",
    callbacks: Sequence[Callback] = (),
    device: Optional[torch.device] = None,
) -> RLResult:
    """GRPO on ``model`` (a CoLaR-SFT :class:`~colar_core.model.ColarModel`) over ``train_records``'
    questions and answers (their steps are not used).

    Resumes from the newest complete checkpoint in ``output_dir`` (a finished stage returns at
    once). Writes ``rl_config.json``, ``metrics.jsonl``, ``checkpoints/``, ``best/`` (with
    validation) and ``model/``. Every process of a multi-process job calls this with the same
    arguments; only rank 0 writes files and calls ``callbacks``.
    """
    cfg = cfg or RLConfig()
    tcfg = cfg.train_config()
    out = Path(output_dir)
    start_stage(out, CONFIG_FILE, cfg, cfg.backend)
    manager = CheckpointManager(out, keep=cfg.keep_checkpoints)
    encoder = PromptEncoder(tokenizer)
    if cfg.disable_dropout:
        disable_dropout(model)
    model.zero_grad(set_to_none=True)  # stale gradients of whoever trained it would join the first update

    ref_model = None
    if cfg.kl_beta > 0:  # the starting policy, frozen, before the engine (or a resume) changes it
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    engine = build_engine(model, tcfg, device)
    if ref_model is not None:
        ref_model.to(engine.device)
        if cfg.precision == "bf16":
            ref_model.to(torch.bfloat16)
    batches = RLBatches(train_records, encoder, cfg, engine, ref_model)

    state, model_dir, best_dir = run_stage_loop(engine, batches, batches.loss_fn, tcfg, model=model, encoder=encoder,
                                                tokenizer=tokenizer, val_records=val_records, manager=manager,
                                                out=out, callbacks=callbacks)
    result = RLResult(model_dir=model_dir, final_step=state.step, rl_steps=-(-state.step // cfg.updates_per_rollout),
                      metrics_path=out / METRICS_FILE, resumed_from=state.resumed_from,
                      best_val_accuracy=state.best_score, best_model_dir=best_dir, best_step=state.best_step,
                      stopped_early=state.stopped_early, output_dir=out)
    return finish_stage(engine, result, out)


# ----------------------------------------------------------------------------------------------
# A whole job from one config file (what the launchers run)
# ----------------------------------------------------------------------------------------------
class RLJob(StageJob):
    """One RL stage as a file: what ``python -m colar_core.rl.rl_main --config job.json`` runs."""

    init_from: str = Field(..., description="The CoLaR-SFT model directory to start from (e.g. the CoLaR SFT "
                           "stage's output_dir/model); its tokenizer/ is used.")
    rl: RLConfig = Field(default_factory=RLConfig)
    data: StageData = Field(default_factory=StageData, description="train.jsonl (+ val.jsonl) from prepare_data; "
                            "None = the built-in problems (as SFT).")
    model: Optional[ModelConfig] = Field(
        None, description="The model config init_from was trained from: the only thing that may allow remote "
        "code or name a LoRA base when it is loaded (ColarModel.load_options). None allows neither.")


def run_rl_job(job: RLJob, callbacks: Sequence[Callback] = ()) -> RLResult:
    """Load data and the starting model for ``job`` and train in this process (one of a launched
    job's processes, or the only one)."""
    train_records, val_records = job.data.load()
    options = ColarModel.load_options(job.model) if job.model is not None else {}  # the job's own config
    model, tokenizer = ColarModel.load_dir(job.init_from, is_trainable=True, **options)
    return train_rl(model, tokenizer, train_records, val_records, job.rl, job.output_dir, callbacks)


def run_rl_stage(job: RLJob, config_path: Optional[Union[str, Path]] = None, callbacks: Sequence[Callback] = (),
                 on_line: Optional[Callable[[str], None]] = None) -> RLResult:
    """Run an :class:`RLJob` in this process when its launcher asks for one process, else through
    the launcher (see :func:`colar_core.training.launch.run_job`)."""
    return run_job(job, job.rl.launcher, run_rl_job, RLResult, module=ENTRY_MODULE, config_path=config_path,
                   callbacks=callbacks, on_line=on_line)
