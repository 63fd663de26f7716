"""Supervised fine-tuning: explicit CoT, no-CoT and CoLaR, on the shared stage skeleton.

Modes (``TrainConfig.objective.mode``):

* ``cot``   - the explicit chain, compression factor 1 (the paper's CoT baseline and CoLaR's start point);
* ``nocot`` - question -> answer, steps dropped (baseline);
* ``colar`` - compressed latents: one factor ``r`` drawn per optimizer step from
  ``compression_factors`` and shared by the whole global batch (every micro-batch and process),
  the prompt saying ``auto`` instead of ``r`` with probability ``auto_prob``.

A fresh CoLaR run whose embedding scale was *measured* re-measures it first (the CoT warm-up has
trained the embeddings); the scale is then part of the run's checkpoints, so a resumed run keeps it.

Data order (:class:`~colar_core.training.sampler.EpochSampler`): each epoch is a seeded permutation
of the training set; one micro-step consumes ``batch_size * world_size`` consecutive entries and
process ``k`` takes the ``k``-th slice. The data position (epoch, index) and every random stream
are checkpointed, so a resumed run sees the same batches, factors and labels as an uninterrupted one.

A whole stage from a job file: :class:`SFTJob`, run in this process by :func:`run_sft_job` or, when
its launcher asks for several processes, through the launcher by :func:`run_sft_stage`.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Protocol, Sequence, Union

import torch
from pydantic import Field

from colar_core.collate import collate
from colar_core.config import ModelConfig
from colar_core.model import ColarModel
from colar_core.text import AUTO_SPEED, PromptEncoder
from colar_core.tokenizer import build_tokenizer, load_tokenizer
from colar_core.training.callbacks import Callback
from colar_core.training.checkpoint import CheckpointManager, as_tuple
from colar_core.training.config import TrainConfig
from colar_core.training.engines import build_engine
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

CONFIG_FILE = "train_config.json"


# ----------------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------------
def example_length(ex, r: float = 1) -> float:
    """Sort key for length grouping: packed positions of the example at compression factor ``r``.

    The step's r is drawn later, so the grouping uses the median trained factor: an example long at
    one r is long at every r. On the benchmark's data shape that leaves 2.2 % padding on average over
    r = 1..5, against 12.9 % without grouping (``python -m bench.padding``).
    """
    return len(ex.question_ids) + 1 + len(ex.step_ids) / r + len(ex.answer_ids)


def group_by_length(order: list[int], lengths: Sequence[float], micro: int, pool_batches: int,
                    generator: torch.Generator) -> list[int]:
    """Reorder ``order`` so that each run of ``micro`` indices holds examples of similar length.

    Pools of ``pool_batches * micro`` consecutive indices are sorted by length (longest first) and cut
    into micro-batches whose order inside the pool is then shuffled with ``generator``. The ragged
    tail (fewer than one micro-batch) stays at the end, where the loop drops it.
    """
    pool = micro * pool_batches
    out: list[int] = []
    usable = len(order) - len(order) % micro
    for lo in range(0, usable, pool):
        chunk = sorted(order[lo: min(lo + pool, usable)], key=lambda i: -lengths[i])
        batches = [chunk[i: i + micro] for i in range(0, len(chunk), micro)]
        for j in torch.randperm(len(batches), generator=generator).tolist():
            out.extend(batches[j])
    return out + order[usable:]


class SFTBatches:
    """Micro-batches of each optimizer step, with the step's compression factor (stateful).

    State: the data position (:class:`EpochSampler`: epoch and index into the epoch's seeded
    permutation), the r-sampling generator (same on every process), the label-sampling generator and
    the latent-noise generator (per process).
    """

    def __init__(self, examples: Sequence, encoder: PromptEncoder, cfg: TrainConfig, rank: int = 0,
                 world_size: int = 1, device: Optional[torch.device] = None):
        self.examples, self.encoder, self.cfg = list(examples), encoder, cfg
        self.global_micro = cfg.batch_size * world_size
        if len(self.examples) < self.global_micro:
            raise ValueError(f"{len(self.examples)} training examples cannot fill one micro-step of "
                             f"batch_size {cfg.batch_size} x {world_size} process(es)")
        self.order = EpochSampler(len(self.examples), cfg.batch_size, rank, world_size, cfg.seed,
                                  reorder=self._group_by_length if cfg.length_grouping else None)
        self.r_rng = random.Random(cfg.seed)
        self.label_gen = torch.Generator().manual_seed(cfg.seed * 7919 + 104729 * (rank + 1))
        device = device or torch.device("cpu")
        self.loss_gen = torch.Generator(device=device).manual_seed(cfg.seed * 6151 + 15485863 * (rank + 1))

    def _group_by_length(self, perm: list[int], generator: torch.Generator) -> list[int]:
        """An epoch's permutation with ``length_grouping`` applied (the sampler's ``reorder``)."""
        factors = sorted(self.cfg.objective.compression_factors) if self.cfg.objective.mode == "colar" else [1]
        r_mid = factors[len(factors) // 2]
        return group_by_length(perm, [example_length(ex, r_mid) for ex in self.examples], self.global_micro,
                               self.cfg.length_grouping, generator)

    def draw_factor(self) -> tuple[int, Union[int, str]]:
        """The step's compression factor and what the prompt says (the factor, or 'auto')."""
        obj = self.cfg.objective
        if obj.mode != "colar":
            return 1, 1
        r = self.r_rng.choice(obj.compression_factors)
        speed: Union[int, str] = r
        if obj.auto_prob > 0 and self.r_rng.random() < obj.auto_prob:
            speed = AUTO_SPEED
        return r, speed

    def __call__(self, step: int) -> StepBatch:
        r, speed = self.draw_factor()
        micro = []
        for _ in range(self.cfg.grad_accum):
            rows = [self.examples[i] for i in self.order.next_indices()]
            micro.append(collate(rows, self.encoder, r, speed, generator=self.label_gen))
        return StepBatch(micro, {"r": r, "auto_prompt": int(speed == AUTO_SPEED), "epoch": self.order.epoch})

    def state_dict(self) -> dict:
        return {**self.order.state_dict(), "global_micro": self.global_micro,
                "r_rng": self.r_rng.getstate(), "label_gen": self.label_gen.get_state(),
                "loss_gen": self.loss_gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.order.load_state_dict(state)
        if int(state.get("global_micro", self.global_micro)) != self.global_micro:
            log.warning("global micro-batch changed (%s -> %s): data order continues from the same index",
                        state.get("global_micro"), self.global_micro)
        self.r_rng.setstate(as_tuple(state["r_rng"]))
        self.label_gen.set_state(state["label_gen"])
        self.loss_gen.set_state(state["loss_gen"])


# ----------------------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------------------
@dataclass
class SFTResult(JobResultMixin):
    """What a finished SFT stage hands on (also written to ``output_dir/result.json``)."""

    model_dir: Path
    final_step: int
    best_val_accuracy: Optional[float]
    metrics_path: Path
    best_model_dir: Optional[Path] = None
    best_step: Optional[int] = None
    stopped_early: bool = False
    resumed_from: Optional[int] = None
    output_dir: Optional[Path] = None


def train_sft(
    model: ColarModel,
    tokenizer,
    train_records: Sequence,
    val_records: Sequence = (),
    cfg: Optional[TrainConfig] = None,
    output_dir: Union[str, Path] = "runs/sft",
    callbacks: Sequence[Callback] = (),
    device: Optional[torch.device] = None,
) -> SFTResult:
    """Train ``model`` (a :class:`~colar_core.model.ColarModel`) on ``train_records``.

    Resumes from the newest complete checkpoint in ``output_dir`` if there is one (a finished
    stage returns at once). Writes ``metrics.jsonl``, ``checkpoints/``, ``best/`` and the final
    ``model/`` (loadable with ``ColarModel.from_pretrained``). Every process of a multi-process job
    calls this with the same arguments; only rank 0 writes files and calls ``callbacks``.

    Under ZeRO-3 the ``model`` object passed in is left partitioned by DeepSpeed afterwards: load
    ``result.model_dir`` to use the trained model.
    """
    cfg = cfg or TrainConfig()
    out = Path(output_dir)
    start_stage(out, CONFIG_FILE, cfg, cfg.backend)
    obj = cfg.objective
    manager = CheckpointManager(out, keep=cfg.keep_checkpoints)
    fresh = manager.latest() is None

    encoder = PromptEncoder(tokenizer)
    with_steps = obj.mode != "nocot"
    examples = [encoder.encode(r, with_steps=with_steps) for r in train_records]
    if obj.mode == "colar":
        if fresh and model.state.embedding_scale_source == "measured":
            before = model.state.embedding_scale
            model.remeasure_embedding_scale()
            log.info("re-measured embedding scale %.5f -> %.5f", before, model.state.embedding_scale)
        model.state.trained_compression_factors = sorted(set(obj.compression_factors))

    model.zero_grad(set_to_none=True)  # leftover .grad on a model passed in memory would join the first update
    engine = build_engine(model, cfg, device)
    batches = SFTBatches(examples, encoder, cfg, engine.rank, engine.world_size, engine.device)

    def loss_fn(m, batch):
        return m.sft_loss(batch.to(engine.device), obj, generator=batches.loss_gen)

    state, model_dir, best_dir = run_stage_loop(engine, batches, loss_fn, cfg, model=model, encoder=encoder,
                                                tokenizer=tokenizer, val_records=val_records, manager=manager,
                                                out=out, callbacks=callbacks)
    result = SFTResult(model_dir=model_dir, final_step=state.step, best_val_accuracy=state.best_score,
                       metrics_path=out / METRICS_FILE, best_model_dir=best_dir, best_step=state.best_step,
                       stopped_early=state.stopped_early, resumed_from=state.resumed_from, output_dir=out)
    return finish_stage(engine, result, out)


# ----------------------------------------------------------------------------------------------
# A whole job from one config file (what the launchers run)
# ----------------------------------------------------------------------------------------------
class SFTJob(StageJob):
    """One SFT stage as a file: what ``python -m colar_core.training.sft_main --config job.json`` runs."""

    train: TrainConfig = Field(default_factory=TrainConfig)
    model: ModelConfig = Field(default_factory=ModelConfig, description="Backbone to build when init_from is None.")
    init_from: Optional[str] = Field(None, description="A saved ColarModel directory to start from "
                                     "(e.g. the CoT stage's output_dir/model); its tokenizer is used.")
    data: StageData = Field(default_factory=StageData)


class ModelSource(Protocol):
    """What :func:`load_model_and_tokenizer` reads of a job: an :class:`SFTJob` or a
    :class:`~colar_core.baselines.stage.BaselineJob`."""

    @property
    def init_from(self) -> Optional[str]: ...
    @property
    def model(self) -> ModelConfig: ...
    @property
    def train(self) -> TrainConfig: ...


def load_model_and_tokenizer(job: ModelSource, train_records: Sequence, val_records: Sequence):
    """The model and tokenizer a job starts from (identical on every process: seeded build)."""
    if job.init_from:
        return ColarModel.load_dir(job.init_from, **ColarModel.load_options(job.model))  # the job's own config
    if job.model.tokenizer:
        tokenizer = load_tokenizer(job.model.tokenizer, trust_remote_code=job.model.trust_remote_code)
    elif job.model.name_or_path == "tiny":
        tokenizer = build_tokenizer(list(train_records) + list(val_records), numbers=job.model.number_tokens)
    else:
        tokenizer = load_tokenizer(job.model.name_or_path, trust_remote_code=job.model.trust_remote_code)
    torch.manual_seed(job.train.seed)
    model = ColarModel.build(job.model, tokenizer)
    return model, tokenizer


def run_sft_job(job: SFTJob, callbacks: Sequence[Callback] = ()) -> SFTResult:
    """Load data, tokenizer and model for ``job`` and train in this process (one of a launched job's
    processes, or the only one)."""
    train_records, val_records = job.data.load()
    model, tokenizer = load_model_and_tokenizer(job, train_records, val_records)
    return train_sft(model, tokenizer, train_records, val_records, job.train, job.output_dir, callbacks)


def run_sft_stage(job: SFTJob, config_path: Optional[Union[str, Path]] = None, callbacks: Sequence[Callback] = (),
                  on_line: Optional[Callable[[str], None]] = None) -> SFTResult:
    """Run an :class:`SFTJob` in this process when its launcher asks for one process, else through
    the launcher (see :func:`colar_core.training.launch.run_job`)."""
    return run_job(job, job.train.launcher, run_sft_job, SFTResult, config_path=config_path, callbacks=callbacks,
                   on_line=on_line)
