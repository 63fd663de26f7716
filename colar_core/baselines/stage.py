"""A baseline's training stage on the shared skeleton (:mod:`colar_core.training.stage`).

:func:`train_baseline` records the method in the model's state (and gives Coconut / Distill their
thought projection when configured), builds the engine, :class:`~.batches.CurriculumBatches` and the
method's loss, and hands them to :func:`~colar_core.training.stage.run_stage_loop`: the same loop,
DeepSpeed or torch engine, checkpoints and resume, best-k validation and callbacks as SFT and RL.
The model's ``n_thoughts`` follows the curriculum (checkpointed with the model state), so the
exported folder decodes with the count it was last trained with.

A whole stage from a job file: :class:`BaselineJob`, in this process (:func:`run_baseline_job`) or
through the launcher (:func:`run_baseline_stage`, entry ``colar_core.baselines.baseline_main``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch
from pydantic import Field

from colar_core.baselines.batches import CurriculumBatches, first_stage, last_stage_epochs, thoughts_at
from colar_core.baselines.config import BaselineConfig, CurriculumFields, DistillConfig
from colar_core.baselines.losses import distill_loss, pass_loss
from colar_core.baselines.thoughts import attach_projection
from colar_core.config import ModelConfig
from colar_core.model import ColarModel
from colar_core.text import PromptEncoder
from colar_core.training.callbacks import Callback
from colar_core.training.checkpoint import CheckpointManager
from colar_core.training.config import TrainConfig
from colar_core.training.engines import build_engine
from colar_core.training.launch import run_job
from colar_core.training.sft import SFTResult, load_model_and_tokenizer
from colar_core.training.stage import METRICS_FILE, StageData, StageJob, finish_stage, run_stage_loop, start_stage

log = logging.getLogger(__name__)

CONFIG_FILE = "baseline_config.json"
ENTRY_MODULE = "colar_core.baselines.baseline_main"


@dataclass
class BaselineResult(SFTResult):
    """What a finished baseline stage hands on (``output_dir/result.json``): SFT's fields, plus the
    method, its final curriculum stage (0 without one) and the thoughts its model decodes with."""

    method: str = ""
    final_stage: int = 0
    n_thoughts: int = 0


def _steps_to_last_stage(method: BaselineConfig, n_train: int, examples_per_step: int) -> Optional[int]:
    """The optimizer step at which ``method``'s curriculum reaches its last stage (None: no curriculum)."""
    if not isinstance(method, CurriculumFields):
        return None
    return math.ceil(last_stage_epochs(method) * n_train / examples_per_step)


def train_baseline(model: ColarModel, tokenizer, train_records: Sequence, val_records: Sequence,
                   method: BaselineConfig, output_dir: Union[str, Path] = "runs/baseline",
                   callbacks: Sequence[Callback] = (), device: Optional[torch.device] = None) -> BaselineResult:
    """Train ``model`` (the CoT model, or a fresh backbone) as the baseline ``method``; resumes from
    ``output_dir``'s newest checkpoint as SFT does. Writes ``metrics.jsonl``, ``checkpoints/``,
    ``best/`` and ``model/``."""
    cfg = method.train
    out = Path(output_dir)
    start_stage(out, CONFIG_FILE, method, cfg.backend)
    manager = CheckpointManager(out, keep=cfg.keep_checkpoints)
    encoder = PromptEncoder(tokenizer)

    model.state.method = method.method
    model.state.trained_compression_factors = []
    if getattr(method, "projection", False) and getattr(model, "thought_projection", None) is None:
        torch.manual_seed(cfg.seed)
        attach_projection(model)
    model.state.n_thoughts = thoughts_at(first_stage(method) if isinstance(method, CurriculumFields) else 1, method)
    model.zero_grad(set_to_none=True)
    engine = build_engine(model, cfg, device)
    batches = CurriculumBatches(train_records, encoder, method, cfg, engine.rank, engine.world_size, engine.device)
    needed = _steps_to_last_stage(method, len(train_records), cfg.batch_size * cfg.grad_accum * engine.world_size)
    curriculum = method.curriculum if isinstance(method, CurriculumFields) else None
    if needed is not None and needed >= cfg.max_steps:
        log.warning("%s: the last stage of curriculum %r starts at step ~%d, after max_steps %d; the model is "
                    "saved mid-curriculum", method.method, curriculum, needed, cfg.max_steps)
    elif needed is not None:
        log.info("%s: curriculum %r reaches its last stage at step ~%d of %d", method.method, curriculum, needed,
                 cfg.max_steps)

    def loss_fn(m, batch):
        batch = batch.to(engine.device)
        if isinstance(method, DistillConfig):
            return distill_loss(m, batch, method)
        m.state.n_thoughts = batch.n_thoughts  # the count the exported model decodes with
        return pass_loss(m, batch)

    state, model_dir, best_dir = run_stage_loop(engine, batches, loss_fn, cfg, model=model, encoder=encoder,
                                                tokenizer=tokenizer, val_records=val_records, manager=manager,
                                                out=out, callbacks=callbacks, eval_mode=method.method)
    final_stage = batches.stage_of(batches.order.epoch + batches.order.index / len(batches.examples))
    result = BaselineResult(model_dir=model_dir, final_step=state.step, best_val_accuracy=state.best_score,
                            metrics_path=out / METRICS_FILE, best_model_dir=best_dir, best_step=state.best_step,
                            stopped_early=state.stopped_early, resumed_from=state.resumed_from, output_dir=out,
                            method=method.method, final_stage=final_stage, n_thoughts=model.state.n_thoughts)
    return finish_stage(engine, result, out)


class BaselineJob(StageJob):
    """One baseline stage as a file: what ``python -m colar_core.baselines.baseline_main --config job.json`` runs."""

    method: BaselineConfig = Field(..., discriminator="method", description="The method and its training run.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Backbone to build when init_from is None.")
    init_from: Optional[str] = Field(None, description="A saved ColarModel directory to start from (the CoT model).")
    data: StageData = Field(default_factory=StageData)

    @property
    def train(self) -> TrainConfig:
        """The stage's TrainConfig (what the launcher and the SFT loader read)."""
        return self.method.train


def run_baseline_job(job: BaselineJob, callbacks: Sequence[Callback] = ()) -> BaselineResult:
    """Load data, tokenizer and model for ``job`` and train in this process."""
    train_records, val_records = job.data.load()
    model, tokenizer = load_model_and_tokenizer(job, train_records, val_records)
    return train_baseline(model, tokenizer, train_records, val_records, job.method, job.output_dir, callbacks)


def run_baseline_stage(job: BaselineJob, config_path: Optional[Union[str, Path]] = None,
                       callbacks: Sequence[Callback] = (),
                       on_line: Optional[Callable[[str], None]] = None) -> BaselineResult:
    """Run a :class:`BaselineJob` in this process, or through the launcher when it asks for several."""
    return run_job(job, job.method.train.launcher, run_baseline_job, BaselineResult, module=ENTRY_MODULE,
                   config_path=config_path, callbacks=callbacks, on_line=on_line)
