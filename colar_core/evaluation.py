"""Evaluation sweeps: accuracy and chain length per compression factor, across sampling seeds.

Metric names are a contract the pipeline logs verbatim: ``accuracy/c{c}``, ``accuracy_ci95/c{c}``,
``mean_latents/c{c}`` for latent reasoning, and ``accuracy/{mode}``, ``accuracy_ci95/{mode}``,
``mean_tokens/{mode}`` for the text baselines (``cot``, ``nocot``).
"""

from __future__ import annotations

from typing import Sequence

from colar_core.config import GenerationConfig
from colar_core.inference import generate
from colar_core.scoring import answers_match, mean, mean_ci95
from colar_core.text import PromptEncoder


def check_compression_factors(factors: Sequence[int], trained: Sequence[int], field: str = "eval.compression_factors"):
    """Refuse factors <= 0, or above the largest factor the model was trained with (when known)."""
    bad = [c for c in factors if c < 1]
    if bad:
        raise ValueError(f"{field}: compression factors must be >= 1, got {bad}")
    if trained and max(factors) > max(trained):
        raise ValueError(f"{field}: factor {max(factors)} is above the trained maximum {max(trained)} "
                         f"(trained with {sorted(trained)})")


def _sweep(model, encoder, records, mode: str, compression, seeds, gen, key: str, length_name: str):
    questions = [r.question for r in records]
    accs, lengths, rows = [], [], []
    for seed in seeds:
        gens = generate(model, encoder, questions, mode, compression, gen, seed=seed)
        correct = [answers_match(g.answer, r.answer) for g, r in zip(gens, records)]
        accs.append(sum(correct) / max(1, len(records)))
        lengths.append(mean(g.chain_length for g in gens))
        rows.extend(
            dict(setting=key, seed=seed, id=r.id, question=r.question, gold=r.answer, prediction=g.answer,
                 correct=ok, chain_length=g.chain_length, text=g.text)
            for g, r, ok in zip(gens, records, correct)
        )
    acc, ci = mean_ci95(accs)
    metrics = {f"accuracy/{key}": acc, f"accuracy_ci95/{key}": ci, f"{length_name}/{key}": mean(lengths)}
    return metrics, rows


def evaluate_latent(model, encoder: PromptEncoder, records, factors: Sequence[int], seeds: Sequence[int],
                    gen: GenerationConfig = GenerationConfig()) -> tuple[dict[str, float], list[dict]]:
    """CoLaR at each factor ``c``: ``accuracy/c{c}``, ``accuracy_ci95/c{c}``, ``mean_latents/c{c}``."""
    check_compression_factors(factors, model.state.trained_compression_factors)
    metrics, rows = {}, []
    for c in factors:
        m, r = _sweep(model, encoder, records, "latent", c, seeds, gen, f"c{c}", "mean_latents")
        metrics.update(m)
        rows.extend(r)
    return metrics, rows


def evaluate_text(model, encoder: PromptEncoder, records, mode: str, seeds: Sequence[int],
                  gen: GenerationConfig = GenerationConfig()) -> tuple[dict[str, float], list[dict]]:
    """Explicit decoding (``mode`` 'cot' or 'nocot'): ``accuracy/{mode}``, ``mean_tokens/{mode}``."""
    return _sweep(model, encoder, records, mode, 1, seeds, gen, mode, "mean_tokens")
