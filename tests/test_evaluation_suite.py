"""colar_core.evaluation_suite: every model of a run on every test set in every setting, on tiny
saved models (nothing downloaded, no Prefect, no MLflow)."""

from __future__ import annotations

import json
import re

import pytest
import torch

from bench.tiny import PROBLEMS, tiny_model, tiny_tokenizer
from colar_core.config import EvalConfig, ModelConfig
from colar_core.evaluation import evaluate_baseline, evaluate_latent, evaluate_text, without_timings
from colar_core.evaluation_suite import SuiteModels, evaluate_suite, load_eval_set, load_eval_sets
from colar_core.model import ColarModel
from colar_core.text import PromptEncoder

GEN = {"max_latents": 3, "max_cot_tokens": 5, "max_answer_tokens": 3}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> SuiteModels:
    """Saved tiny models: CoLaR (trained factors 1, 2), CoT, and a Coconut baseline."""
    root = tmp_path_factory.mktemp("suite-models")
    tok = tiny_tokenizer()
    for seed, name in enumerate(("colar", "cot", "coconut")):
        torch.manual_seed(seed)
        model = tiny_model(tok, hidden=32, layers=1, heads=2).eval()
        model.state.trained_compression_factors = [1, 2]
        if name == "coconut":
            model.state.method, model.state.n_thoughts = "coconut", 2
        model.save_pretrained(root / name, tok)
    return SuiteModels(colar=str(root / "colar"), cot=str(root / "cot"), baselines={"coconut": str(root / "coconut")})


def _sets(tmp_path) -> tuple[EvalConfig, str]:
    """Two sets: the prepared test split ('test', primary: two problems) and a file ('more', one)."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "test.jsonl").write_text("".join(json.dumps(r.to_dict()) + "\n" for r in PROBLEMS))
    (tmp_path / "more.jsonl").write_text("".join(json.dumps(r.to_dict()) + "\n" for r in PROBLEMS[2:]))
    cfg = EvalConfig(compression_factors=[2], seeds=[0], n_examples=2, generation=GEN,
                     datasets=[{"name": "test", "source": "test"},
                               {"name": "more", "source": str(tmp_path / "more.jsonl"), "n_examples": 1}])
    return cfg, str(data)


def _block(setting: str, length: str, set_name: str = "") -> list[str]:
    prefix = f"{set_name}/" if set_name else ""
    return [f"accuracy/{prefix}{setting}", f"accuracy_ci95/{prefix}{setting}", f"accuracy_qci95/{prefix}{setting}",
            f"n_questions/{prefix}{setting}", f"{length}/{prefix}{setting}", f"sec_per_question/{prefix}{setting}"]


def test_the_suite_names_and_orders_the_metrics_as_runs_always_have(tmp_path, models):
    cfg, data_dir = _sets(tmp_path)
    sets = load_eval_sets(cfg, data_dir)
    assert {name: [r.id for r in recs] for name, recs in sets.items()} == {"test": ["p0", "p1"], "more": ["p2"]}
    suite = evaluate_suite(models, sets, cfg)

    # Per model (CoLaR, CoT, then the baselines), per set: the named metrics; the primary set's also
    # without its name (the legacy keys), right after them; then the averages over the sets.
    expected = []
    for setting, length in (("c2", "mean_latents"), ("cot", "mean_tokens"), ("coconut", "mean_latents")):
        expected += _block(setting, length, "test") + _block(setting, length) + _block(setting, length, "more")
    expected += [f"{metric}/avg/{setting}" for metric, settings in (
        ("accuracy", ("c2", "coconut", "cot")), ("mean_latents", ("c2", "coconut")), ("mean_tokens", ("cot",)),
        ("sec_per_question", ("c2", "coconut", "cot"))) for setting in settings]
    assert list(suite.metrics) == expected

    # The values are those of the sweeps themselves, on the models as saved.
    colar, tok = ColarModel.load_dir(models.colar, is_trainable=False)
    direct, _ = evaluate_latent(colar, PromptEncoder(tok), sets["test"], [2], [0], cfg.generation)
    cot, cot_tok = ColarModel.load_dir(models.cot, is_trainable=False)
    direct_cot, _ = evaluate_text(cot, PromptEncoder(cot_tok), sets["more"], "cot", [0], cfg.generation)
    coconut, co_tok = ColarModel.load_dir(models.baselines["coconut"], is_trainable=False)
    direct_co, _ = evaluate_baseline(coconut, PromptEncoder(co_tok), sets["test"], [0], cfg.generation)
    got = without_timings(suite.metrics)
    assert {k: got[k] for k in without_timings(direct)} == without_timings(direct)
    assert {k: got[f"{k.split('/')[0]}/test/c2"] for k in without_timings(direct)} == without_timings(direct)
    assert {k: got[k.replace("/cot", "/more/cot")] for k in without_timings(direct_cot)} == without_timings(direct_cot)
    assert got["mean_latents/coconut"] == direct_co["mean_latents/coconut"] == 2.0
    assert got["mean_tokens/avg/cot"] == pytest.approx((got["mean_tokens/test/cot"] + got["mean_tokens/more/cot"]) / 2)

    # One row per setting, seed and question, its set named.
    assert len(suite.rows) == 3 * (2 + 1)
    assert [(r["set"], r["setting"], r["id"]) for r in suite.rows[:3]] == [("test", "c2", "p0"), ("test", "c2", "p1"),
                                                                           ("more", "c2", "p2")]
    assert {r["set"] for r in suite.rows} == {"test", "more"}


def test_one_set_has_no_average_and_no_baseline_model_means_no_baseline_keys(tmp_path, models):
    cfg, data_dir = _sets(tmp_path)
    cfg = cfg.model_copy(update={"datasets": cfg.datasets[:1]})
    suite = evaluate_suite(SuiteModels(colar=models.colar), load_eval_sets(cfg, data_dir), cfg,
                           ModelConfig(tiny={"hidden_size": 32, "num_layers": 1, "num_heads": 2}))
    assert list(suite.metrics) == _block("c2", "mean_latents", "test") + _block("c2", "mean_latents")
    assert len(suite.rows) == 2


def test_a_baseline_folder_of_another_method_is_refused_naming_it(tmp_path, models):
    cfg, data_dir = _sets(tmp_path)
    wrong = SuiteModels(colar=models.colar, baselines={"distill": models.baselines["coconut"]})
    with pytest.raises(ValueError, match=re.escape(f"{models.baselines['coconut']}: trained as 'coconut', "
                                                   "evaluated as 'distill'")):
        evaluate_suite(wrong, load_eval_sets(cfg, data_dir), cfg)
    with pytest.raises(ValueError, match="at least one test set"):
        evaluate_suite(models, {}, cfg)
    with pytest.raises(ValueError, match="trained maximum"):  # CoLaR past its trained factors
        evaluate_suite(SuiteModels(colar=models.colar), load_eval_sets(cfg, data_dir),
                       cfg.model_copy(update={"compression_factors": [3]}))


def test_an_eval_set_is_cut_to_its_own_count_else_the_global_one(tmp_path):
    cfg, data_dir = _sets(tmp_path)
    test, more = cfg.sets()
    assert len(load_eval_set(test, data_dir, None)) == len(PROBLEMS)
    assert len(load_eval_set(test, data_dir, 3)) == 3
    assert len(load_eval_set(more, data_dir, 3)) == 1  # the set's own n_examples wins


def test_every_model_is_evaluated_on_this_process_device(tmp_path, models, monkeypatch):
    """A saved folder loads onto the CPU; the suite moves each model to ``default_device()`` (this process's
    GPU where there is one) before decoding, or a GPU run would evaluate on the CPU."""
    import colar_core.evaluation_suite as suite_mod

    moved: list[str] = []
    real_to = ColarModel.to

    def spy_to(self, *args, **kwargs):
        moved.append(str(args[0] if args else kwargs.get("device")))
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(ColarModel, "to", spy_to)
    monkeypatch.setattr(suite_mod, "default_device", lambda: torch.device("cpu", 0))  # a device a GPU run names
    cfg, data_dir = _sets(tmp_path)
    cfg = cfg.model_copy(update={"datasets": cfg.datasets[:1]})
    evaluate_suite(models, load_eval_sets(cfg, data_dir), cfg)
    assert moved == ["cpu:0"] * 3, moved  # CoLaR, CoT, Coconut
