"""The evaluation suite of a run: every model it trained, on every test set, in every setting -> one
metrics dict and the prediction rows. The policy lives here (the pipeline's ``evaluate`` stage only
loads the inputs, calls :func:`evaluate_suite` and logs what it returns):

- models, in this order: CoLaR at each of ``eval.compression_factors``, the CoT and No-CoT models
  decoded explicitly (when given), each latent-reasoning baseline decoded as its folder says
  (iCoT, Coconut, Distill; a folder trained as another method is refused);
- protocols: ``eval.protocol`` 'reference' or 'both' adds (or puts in place of colar's) the CoT and
  baseline metrics as the reference's evaluation decodes and counts them, under ``{setting}-reference``
  names (:mod:`colar_core.evaluation`); CoLaR and No-CoT are decoded once, under their own names;
- sets: ``eval.datasets`` (:meth:`~colar_core.config.EvalConfig.sets`, default the prepared test
  split named 'test'), each cut to its first ``n_examples`` (:func:`load_eval_sets`);
- names: each set's metrics carry its name (``accuracy/svamp/c2``: :func:`~colar_core.evaluation.for_set`);
  the primary (first) set's also go without it (``accuracy/c2``: the names of runs before named sets,
  which the promotion gate and older comparisons read), right after that set's named ones; with several
  sets, the plain mean over them follows (``accuracy/avg/c2``: :func:`~colar_core.evaluation.average_over_sets`);
- thoughts: the first ``eval.thoughts_questions`` questions of the primary set read step by step
  (:mod:`colar_core.latent_inspect`): the CoLaR model's latent chains at each factor and its own CoT text,
  then the CoT model's CoT text when there is one; generated while each model is loaded for its sweep.

Nothing here knows Prefect or MLflow.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional, Union

from colar_core.config import TEST_SPLIT, EvalConfig, EvalSet, ModelConfig
from colar_core.data.prepare import load_split
from colar_core.data.readers import read_records
from colar_core.data.records import Record
from colar_core.devices import default_device
from colar_core.evaluation import average_over_sets, evaluate_baseline, evaluate_latent, evaluate_text, for_set
from colar_core.latent_inspect import QuestionThoughts, TextChain, cot_chains, inspect_questions
from colar_core.model import ColarModel
from colar_core.text import PromptEncoder

__all__ = ["SuiteModels", "SuiteResult", "evaluate_suite", "load_eval_set", "load_eval_sets"]

#: How one model is evaluated on one set's records: ``(metrics without the set name, prediction rows)``.
_Evaluate = Callable[[ColarModel, PromptEncoder, Sequence[Record]], tuple[dict[str, float], list[dict]]]


@dataclass(frozen=True)
class SuiteModels:
    """The model folders of a run: ``colar`` (the final CoLaR model, after RL when it ran), the CoT and
    No-CoT models when trained, and ``baselines`` (method -> folder of sft-icot / sft-coconut / sft-distill)."""

    colar: str
    cot: Optional[str] = None
    nocot: Optional[str] = None
    baselines: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class SuiteResult:
    """What :func:`evaluate_suite` returns: the metrics (in the order the module docstring gives),
    one prediction row per setting, seed and question, its set's name in ``set``, and the thoughts of
    the first questions (module docstring; empty with ``eval.thoughts_questions: 0``)."""

    metrics: dict[str, float]
    rows: list[dict]
    thoughts: list[QuestionThoughts] = field(default_factory=list)


def load_eval_set(spec: EvalSet, data_dir: Union[str, Path], n_examples: Optional[int]) -> list[Record]:
    """The first ``spec.n_examples`` (else ``n_examples``; None = all) problems of one test set: the
    prepared test split (``data_dir/test.jsonl``) for source 'test', else the set read with the data
    readers (policy fail: a test set with a bad record is an error naming it, not a smaller test set)."""
    if spec.source == TEST_SPLIT:
        records = load_split(Path(data_dir) / "test.jsonl")
    else:
        records = read_records(spec.source, spec.format, policy="fail", split=spec.split).records
    return records[: spec.n_examples or n_examples]


def load_eval_sets(cfg: EvalConfig, data_dir: Union[str, Path]) -> dict[str, list[Record]]:
    """``{set name: records}`` of every set of ``cfg``, the primary set first (:func:`load_eval_set`)."""
    return {s.name: load_eval_set(s, data_dir, cfg.n_examples) for s in cfg.sets()}


def _plan(models: SuiteModels, cfg: EvalConfig) -> list[tuple[str, Optional[str], _Evaluate]]:
    """``(model folder, method it must have been trained as or None, how to evaluate it)`` in suite order."""
    seeds, gen, protocols = cfg.seeds, cfg.generation, cfg.protocols()
    plan: list[tuple[str, Optional[str], _Evaluate]] = [
        (models.colar, None, functools.partial(evaluate_latent, factors=cfg.compression_factors, seeds=seeds, gen=gen))]
    for mode, folder in (("cot", models.cot), ("nocot", models.nocot)):
        if folder:
            plan.append((folder, None, functools.partial(evaluate_text, mode=mode, seeds=seeds, gen=gen,
                                                         protocols=protocols)))
    for method, folder in models.baselines.items():
        plan.append((folder, method, functools.partial(evaluate_baseline, seeds=seeds, gen=gen,
                                                       protocols=protocols)))
    return plan


def evaluate_suite(models: SuiteModels, sets: Mapping[str, Sequence[Record]], cfg: EvalConfig,
                   model_cfg: Optional[ModelConfig] = None) -> SuiteResult:
    """Evaluate every model of ``models`` on every set of ``sets`` (``{name: records}``, the primary
    set first: :func:`load_eval_sets`) with ``cfg``'s factors, seeds and generation settings. The models
    are loaded one at a time, for evaluation. ``model_cfg``: the pipeline's model config, the only thing
    that may allow remote code or name a LoRA base when a folder is loaded
    (:meth:`~colar_core.model.ColarModel.load_options`); None allows neither."""
    if not sets:
        raise ValueError("evaluate_suite needs at least one test set")
    options = ColarModel.load_options(model_cfg) if model_cfg is not None else {}
    primary = next(iter(sets))
    metrics: dict[str, float] = {}
    rows: list[dict] = []
    shown = list(sets[primary])[: cfg.thoughts_questions]
    questions = [r.question for r in shown]
    thoughts: list[QuestionThoughts] = []
    cot_text: list[TextChain] = []
    for folder, method, evaluate in _plan(models, cfg):
        model, tokenizer = ColarModel.load_dir(folder, is_trainable=False, **options)
        model.to(default_device())  # this process's GPU where there is one: a folder loads onto the CPU
        if method is not None and model.state.method != method:
            raise ValueError(f"{folder}: trained as {model.state.method!r}, evaluated as {method!r}")
        encoder = PromptEncoder(tokenizer)
        if questions and folder == models.colar:
            thoughts = inspect_questions(model, encoder, questions, cfg.compression_factors, cfg.generation,
                                         cfg.seeds[0], records=shown)
        elif questions and folder == models.cot:
            cot_text = cot_chains(model, encoder, questions, "CoT model", cfg.generation, cfg.seeds[0])
        for name, records in sets.items():
            m, r = evaluate(model, encoder, records)
            metrics.update(for_set(m, name))
            if name == primary:  # the primary set also under the names runs had before named sets
                metrics.update(m)
            rows.extend({"set": name, **row} for row in r)
        del model
    if len(sets) > 1:
        metrics.update(average_over_sets(metrics, list(sets)))
    if cot_text:
        thoughts = [replace(q, cot=q.cot + (c,)) for q, c in zip(thoughts, cot_text)]
    return SuiteResult(metrics, rows, thoughts)
