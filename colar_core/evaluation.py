"""Evaluation sweeps: accuracy and chain length per compression factor, across sampling seeds.

Metric names are a contract the pipeline logs verbatim: ``accuracy/c{c}``, ``accuracy_ci95/c{c}``,
``mean_latents/c{c}`` for latent reasoning, and ``accuracy/{mode}``, ``accuracy_ci95/{mode}``,
``mean_tokens/{mode}`` for the text baselines (``cot``, ``nocot``), ``accuracy/{method}`` with
``mean_latents/{method}`` (Coconut, Distill: continuous thoughts) or ``mean_tokens/icot`` for the
baselines of ``colar_core.baselines``; every setting also has ``accuracy_qci95/{setting}`` and
``n_questions/{setting}`` (below); ``sec_per_question/{setting}`` is the wall time of decoding,
per question and seed, for every setting (latents at each c, CoT, No-CoT, each baseline).

Two intervals go with every accuracy. ``accuracy_ci95/{setting}`` is the paper's: mean +/- 1.96 sd /
sqrt(#seeds) of the per-seed accuracies (Table 1 shows it; 0 with one seed, whatever the number of
questions). ``accuracy_qci95/{setting}`` accounts for the questions: 1.96 sd / sqrt(n) over the n
questions' accuracies averaged over seeds (:func:`~colar_core.scoring.question_ci95`; with one seed,
the binomial interval); the promotion gate compares with it. ``n_questions/{setting}`` is the
number of questions scored, and :func:`eval_set_digest` names the set they came from.

On several named test sets, each name goes after the metric (:func:`for_set`:
``accuracy/svamp/c2``) and :func:`average_over_sets` adds ``.../avg/...``, the plain mean over the
sets (the paper's "Average" column; intervals and question counts have no average).

Protocols (``eval.protocol``): the names above are colar's protocol, the method as its papers describe
it. Under the reference's protocol (:data:`colar_core.inference.PROTOCOLS`: the baselines decoded as
the reference's own evaluation decodes them, #L counted as it counts it) the settings it changes get
:func:`reference_setting` names, ``{setting}-reference`` (``accuracy/icot-reference``,
``mean_tokens/gsm8k/cot-reference``): CoT (the same decoding, the reference's #L), iCoT, Coconut and
Distill. CoLaR and No-CoT are the same under both and keep their names. (A ``/reference`` suffix would
read as a set name: ``accuracy/icot/reference``.)
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from typing import Mapping, Sequence

from colar_core.config import GenerationConfig
from colar_core.inference import PROTOCOLS, Generation, generate
from colar_core.scoring import answers_match, mean, mean_ci95, question_ci95
from colar_core.text import PromptEncoder


def check_compression_factors(factors: Sequence[int], trained: Sequence[int], field: str = "eval.compression_factors"):
    """Refuse factors <= 0, or above the largest factor the model was trained with (when known)."""
    bad = [c for c in factors if c < 1]
    if bad:
        raise ValueError(f"{field}: compression factors must be >= 1, got {bad}")
    if trained and max(factors) > max(trained):
        raise ValueError(f"{field}: factor {max(factors)} is above the trained maximum {max(trained)} "
                         f"(trained with {sorted(trained)})")


#: Suffix of a setting evaluated under the reference's protocol (module docstring).
REFERENCE_SUFFIX = "-reference"
#: The settings the reference's protocol changes (the others are the same under both protocols).
REFERENCE_SETTINGS = ("cot", "icot", "coconut", "distill")


def reference_setting(setting: str) -> str:
    """The name of ``setting`` evaluated under the reference's protocol: ``icot`` -> ``icot-reference``."""
    return f"{setting}{REFERENCE_SUFFIX}"


def _decode(model, encoder, records, mode: str, compression, seeds, gen,
            protocol: str = "colar") -> tuple[list[list[Generation]], float]:
    """Each seed's generations for ``records`` and the decoding wall time (s) over all seeds."""
    questions = [r.question for r in records]
    per_seed, decode_s = [], 0.0
    for seed in seeds:
        t0 = time.perf_counter()
        if protocol == "colar":  # generate's default
            per_seed.append(generate(model, encoder, questions, mode, compression, gen, seed=seed))
        else:
            per_seed.append(generate(model, encoder, questions, mode, compression, gen, seed=seed, protocol=protocol))
        decode_s += time.perf_counter() - t0
    return per_seed, decode_s


def _score(records, seeds, per_seed: list[list[Generation]], decode_s: float, key: str, length_name: str,
           reference: bool = False) -> tuple[dict[str, float], list[dict]]:
    """The setting ``key``'s metrics and prediction rows from its generations; ``reference``: #L as the
    reference counts it (``Generation.reference_length``)."""
    accs: list[float] = []
    correct_per_seed: list[list[bool]] = []
    lengths: list[float] = []
    rows: list[dict] = []
    for seed, gens in zip(seeds, per_seed):
        correct = [answers_match(g.answer, r.answer) for g, r in zip(gens, records)]
        accs.append(sum(correct) / max(1, len(records)))
        correct_per_seed.append(correct)
        chain = [g.reference_length if reference and g.reference_length is not None else g.chain_length
                 for g in gens]
        lengths.append(mean(chain))
        rows.extend(
            dict(setting=key, seed=seed, id=r.id, question=r.question, gold=r.answer, prediction=g.answer,
                 correct=ok, chain_length=n, text=g.text)
            for g, r, ok, n in zip(gens, records, correct, chain)
        )
    acc, ci = mean_ci95(accs)
    metrics = {f"accuracy/{key}": acc, f"accuracy_ci95/{key}": ci,
               f"accuracy_qci95/{key}": question_ci95(correct_per_seed), f"n_questions/{key}": float(len(records)),
               f"{length_name}/{key}": mean(lengths),
               f"sec_per_question/{key}": decode_s / max(1, len(records) * len(seeds))}
    return metrics, rows


def _sweep(model, encoder, records, mode: str, compression, seeds, gen, key: str, length_name: str):
    per_seed, decode_s = _decode(model, encoder, records, mode, compression, seeds, gen)
    return _score(records, seeds, per_seed, decode_s, key, length_name)


def evaluate_latent(model, encoder: PromptEncoder, records, factors: Sequence[int], seeds: Sequence[int],
                    gen: GenerationConfig = GenerationConfig()) -> tuple[dict[str, float], list[dict]]:
    """CoLaR at each factor ``c``: ``accuracy/c{c}``, ``accuracy_ci95/c{c}``, ``accuracy_qci95/c{c}``,
    ``n_questions/c{c}``, ``mean_latents/c{c}``, ``sec_per_question/c{c}``."""
    check_compression_factors(factors, model.state.trained_compression_factors)
    metrics, rows = {}, []
    for c in factors:
        m, r = _sweep(model, encoder, records, "latent", c, seeds, gen, f"c{c}", "mean_latents")
        metrics.update(m)
        rows.extend(r)
    return metrics, rows


def evaluate_text(model, encoder: PromptEncoder, records, mode: str, seeds: Sequence[int],
                  gen: GenerationConfig = GenerationConfig(),
                  protocols: Sequence[str] = ("colar",)) -> tuple[dict[str, float], list[dict]]:
    """Explicit decoding (``mode`` 'cot' or 'nocot'): ``accuracy/{mode}``, its two intervals and
    ``n_questions/{mode}`` (as :func:`evaluate_latent`), ``mean_tokens/{mode}``. With 'reference' in
    ``protocols``, CoT's metrics also (or only) under ``cot-reference``, from the same decoding with #L
    counted as the reference counts it; No-CoT is the same under both (its ``nocot`` names)."""
    per_seed, decode_s = _decode(model, encoder, records, mode, 1, seeds, gen)
    metrics: dict[str, float] = {}
    rows: list[dict] = []
    for protocol in _protocols_of(mode, protocols):
        reference = protocol == "reference"
        key = reference_setting(mode) if reference else mode
        m, r = _score(records, seeds, per_seed, decode_s, key, "mean_tokens", reference=reference)
        metrics.update(m)
        rows.extend(r)
    return metrics, rows


def _protocols_of(setting: str, protocols: Sequence[str]) -> list[str]:
    """The protocols ``setting`` is evaluated under: ``protocols`` (checked) for a setting the reference's
    protocol changes, else once under colar's names."""
    bad = [p for p in protocols if p not in PROTOCOLS]
    if bad or not protocols:
        raise ValueError(f"protocols must be some of {', '.join(PROTOCOLS)}; got {list(protocols)}")
    return list(dict.fromkeys(protocols)) if setting in REFERENCE_SETTINGS else ["colar"]


#: The baselines of colar_core.baselines and the length metric of each: continuous thoughts are
#: latents, iCoT's remaining reasoning steps are tokens (as CoT's).
BASELINE_LENGTHS = {"icot": "mean_tokens", "coconut": "mean_latents", "distill": "mean_latents"}


def evaluate_baseline(model, encoder: PromptEncoder, records, seeds: Sequence[int],
                      gen: GenerationConfig = GenerationConfig(),
                      protocols: Sequence[str] = ("colar",)) -> tuple[dict[str, float], list[dict]]:
    """A baseline model, decoded as its method says (``model.state.method``: 'icot', 'coconut' or
    'distill'): ``accuracy/{method}``, its two intervals and ``n_questions/{method}`` (as
    :func:`evaluate_latent`), and ``mean_latents/{method}`` (the
    thoughts of Coconut and Distill) or ``mean_tokens/icot`` (the reasoning tokens iCoT still writes).
    With 'reference' in ``protocols``: also (or only) the same metrics under ``{method}-reference``,
    decoded and counted as the reference's evaluation does (one more decoding per seed)."""
    method = model.state.method
    if method not in BASELINE_LENGTHS:
        raise ValueError(f"not a baseline model: its colar_config.json says method {method!r} "
                         f"(one of {', '.join(BASELINE_LENGTHS)} expected)")
    metrics: dict[str, float] = {}
    rows: list[dict] = []
    for protocol in _protocols_of(method, protocols):
        reference = protocol == "reference"
        per_seed, decode_s = _decode(model, encoder, records, method, 1, seeds, gen, protocol)
        key = reference_setting(method) if reference else method
        m, r = _score(records, seeds, per_seed, decode_s, key, BASELINE_LENGTHS[method], reference=reference)
        metrics.update(m)
        rows.extend(r)
    return metrics, rows


def for_set(metrics: Mapping[str, float], set_name: str) -> dict[str, float]:
    """``metrics`` of one test set, the set's name after the metric: ``accuracy/c2`` ->
    ``accuracy/{set_name}/c2``."""
    out = {}
    for key, value in metrics.items():
        name, _, setting = key.partition("/")
        out[f"{name}/{set_name}/{setting}"] = value
    return out


_PER_SET = re.compile(r"(?P<metric>[^/]+)/(?P<set>[^/]+)/(?P<setting>[^/]+)")
#: Per-set metrics that :func:`average_over_sets` leaves out.
_NOT_AVERAGED = ("accuracy_ci95", "accuracy_qci95", "n_questions")


def eval_set_digest(records: Sequence) -> str:
    """sha256 (hex) of what a test set is scored on: its (question, gold answer) pairs, sorted, so
    two runs with the same digest asked the same questions (as many, the same answers expected)
    whatever their order, ids or reasoning steps. Records need ``question`` and ``answer``."""
    pairs = sorted([str(r.question), str(r.answer)] for r in records)
    text = json.dumps(pairs, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def average_over_sets(metrics: Mapping[str, float], set_names: Sequence[str]) -> dict[str, float]:
    """``{metric}/avg/{setting}``: the mean over ``set_names`` of ``{metric}/{set}/{setting}``, for each
    metric and setting that every set has. Confidence intervals are not averaged (the mean of
    intervals is not an interval of the mean), so ``accuracy_ci95`` and ``accuracy_qci95`` have no
    average, and neither has ``n_questions`` (a count per set)."""
    by_setting: dict[tuple[str, str], dict[str, float]] = {}
    for key, value in metrics.items():
        m = _PER_SET.fullmatch(key)
        if m and m["set"] in set_names and m["metric"] not in _NOT_AVERAGED:
            by_setting.setdefault((m["metric"], m["setting"]), {})[m["set"]] = value
    return {f"{metric}/avg/{setting}": sum(values.values()) / len(values)
            for (metric, setting), values in sorted(by_setting.items()) if len(values) == len(set_names)}


#: Metrics that measure wall time (they differ between two runs of the same model on the same data).
TIMING_PREFIXES = ("sec_per_question/",)


def without_timings(metrics: Mapping[str, float]) -> dict[str, float]:
    """``metrics`` less the wall-time ones (:data:`TIMING_PREFIXES`): what two runs of the same
    model and data must agree on."""
    return {k: v for k, v in metrics.items() if not k.startswith(TIMING_PREFIXES)}
