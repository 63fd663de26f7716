"""Validation during training: accuracy on the validation split every ``eval_every`` steps, and the
best-k exports it ranks.

Kept apart from :mod:`colar_core.training.stage` because it is the only part of a training stage that
generates and scores answers: a stage that does not validate (``eval_every: 0``) never runs this
module, so its cache key does not hold it, nor the inference and scoring code it calls
(:mod:`tasks.keys`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch

from colar_core.inference import generate
from colar_core.scoring import accuracy
from colar_core.text import PromptEncoder
from colar_core.training.checkpoint import CheckpointManager, export_model
from colar_core.training.config import TrainConfig
from colar_core.training.engines import Engine
from colar_core.training.loop import Validation

__all__ = ["make_evaluator", "stage_validation"]


def make_evaluator(engine: Engine, encoder: PromptEncoder, val_records: Sequence, cfg: TrainConfig,
                   mode: Optional[str] = None):
    """``evaluate(step) -> metrics`` run by every process on its share of the validation set.

    colar mode: latent generation at each of ``cfg.eval_factors()``, giving ``acc_c{c}`` and
    ``mean_latents_c{c}``; cot / nocot: text generation, ``acc`` and ``mean_chain_tokens``; ``mode``
    (default ``cfg.objective.mode``) may name another ``generate`` mode (a baseline of
    ``colar_core.baselines``), evaluated like cot. ``score`` is the mean accuracy (what best-k and
    early stopping use).
    """
    records = list(val_records)[: cfg.eval_size] if cfg.eval_size else list(val_records)
    shard = records[engine.rank::engine.world_size]
    questions, golds = [r.question for r in shard], [r.answer for r in shard]
    mode = mode or cfg.objective.mode
    factors: list[Optional[int]] = list(cfg.eval_factors()) if mode == "colar" else [None]

    def evaluate(step: int) -> dict:
        vals = []
        with engine.full_model() as model:
            for c in factors:
                if questions:
                    gens = generate(model, encoder, questions, "latent" if c is not None else mode,
                                    c or 1, cfg.generation, seed=cfg.eval_seed + 1009 * engine.rank)
                    correct = accuracy([g.answer for g in gens], golds) * len(golds)
                    length = float(sum(g.chain_length for g in gens))
                else:
                    correct = length = 0.0
                vals += [correct, length, float(len(questions))]
        tot = engine.all_reduce_sum(torch.tensor(vals, dtype=torch.float64)).tolist()
        metrics: dict = {"n_eval": int(tot[2]) if tot else 0}
        accs = []
        for i, c in enumerate(factors):
            correct, length, n = tot[3 * i: 3 * i + 3]
            acc, mean_len = (correct / n, length / n) if n else (0.0, 0.0)
            accs.append(acc)
            if c is None:
                metrics.update({"acc": acc, "mean_chain_tokens": mean_len})
            else:
                metrics.update({f"acc_c{c}": acc, f"mean_latents_c{c}": mean_len})
        metrics["score"] = sum(accs) / len(accs) if accs else 0.0
        return metrics

    return evaluate


def stage_validation(engine: Engine, encoder: PromptEncoder, val_records: Sequence, cfg: TrainConfig,
                     manager: CheckpointManager, tokenizer, mode: Optional[str] = None) -> Validation:
    """:func:`make_evaluator`, whose best-k exports (``best/step_N``) carry the metrics that ranked
    them (``val_metrics.json``)."""
    evaluate = make_evaluator(engine, encoder, val_records, cfg, mode)
    last_eval: dict = {}

    def evaluate_and_keep(step: int) -> dict:
        last_eval.clear()
        last_eval.update(evaluate(step))
        return last_eval

    def save_best(step: int) -> Path:
        return export_model(engine, manager.best_path(step), tokenizer,
                            {"val_metrics.json": {"step": step, **last_eval}})

    return Validation(evaluate_and_keep, save_best)
