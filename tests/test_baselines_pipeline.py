"""The baselines in the pipeline: config sections, Table-1 rows and plot markers, evaluation by the
method a folder records, and (slow) one run with all three baselines end to end."""

from __future__ import annotations

import pytest
import torch

from bench.tiny import PROBLEMS, encoder_for, tiny_model, tiny_tokenizer
from colar_core.baselines.config import ICoTConfig
from colar_core.config import GenerationConfig
from colar_core.evaluation import evaluate_baseline
from flows.config import ConfigError, PipelineConfig, load_config
from tasks.table1 import table1

METRICS = {
    "accuracy/nocot": 0.1, "mean_tokens/nocot": 0.0, "accuracy/cot": 0.9, "mean_tokens/cot": 12.0,
    "accuracy/distill": 0.3, "mean_latents/distill": 6.0, "accuracy/icot": 0.2, "mean_tokens/icot": 0.0,
    "accuracy/coconut": 0.25, "accuracy_ci95/coconut": 0.05, "mean_latents/coconut": 6.0,
    "accuracy/c1": 0.8, "mean_latents/c1": 11.0, "accuracy/c2": 0.7, "mean_latents/c2": 6.0,
}


def test_baselines_are_off_by_default_and_a_section_runs_with_reference_defaults():
    assert PipelineConfig().baselines.selected() == []
    cfg = load_config(None, ["baselines.icot={}", "baselines.coconut.thoughts_per_step=1"])
    names = [name for name, _ in cfg.baselines.selected()]
    assert names == ["icot", "coconut"]
    assert cfg.baselines.icot == ICoTConfig() and cfg.baselines.coconut.n_thoughts == 3


def test_a_baseline_that_starts_from_the_cot_model_needs_the_cot_stage():
    with pytest.raises(ConfigError, match=r"baselines\.coconut\.init_from_cot"):
        load_config(None, ["baselines.coconut={}", "sft_cot=null"])
    cfg = load_config(None, ["baselines.distill.init_from_cot=false", "sft_cot=null"])
    assert cfg.baselines.distill.init_from_cot is False
    with pytest.raises(ConfigError, match=r"baselines\.icot\.max_stage"):
        load_config(None, ["baselines.icot.max_stage=0"])


def test_an_eval_set_cannot_take_a_method_name():
    with pytest.raises(ConfigError, match="reserved"):
        load_config(None, ["eval.datasets=[{name: coconut, source: svamp}]"])


def test_table1_puts_the_baselines_between_cot_and_colar():
    table = table1(METRICS)
    assert list(table.index) == ["No-CoT", "CoT", "iCoT", "Coconut", "Distill", "CoLaR-1", "CoLaR-2"]
    assert table.loc["Coconut", "test Acc (%)"] == "25.0 ± 5.0" and table.loc["Coconut", "test #L"] == "6.0"
    assert table.loc["iCoT", "test #L"] == "0.0"


def test_the_accuracy_vs_length_plot_marks_every_method(tmp_path, monkeypatch):
    from tasks import plots

    labels = []
    real = plots.save_figure

    def keep_labels(fig, path):
        labels.extend(t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts())
        return real(fig, path)

    monkeypatch.setattr(plots, "save_figure", keep_labels)
    plots.accuracy_vs_length_plot(METRICS, tmp_path / "p.png")
    assert {"CoLaR", "No-CoT", "CoT", "iCoT", "Coconut", "Distill"} <= set(labels)


def test_evaluation_decodes_a_baseline_as_its_folder_says():
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    model = tiny_model(tok).eval()
    model.state.method, model.state.n_thoughts = "coconut", 3
    gen = GenerationConfig(do_sample=False, max_answer_tokens=3, max_cot_tokens=4)
    metrics, rows = evaluate_baseline(model, encoder_for(tok), PROBLEMS, [0, 1], gen)
    assert set(metrics) == {"accuracy/coconut", "accuracy_ci95/coconut", "accuracy_qci95/coconut",
                            "n_questions/coconut", "mean_latents/coconut", "sec_per_question/coconut"}
    assert metrics["mean_latents/coconut"] == 3.0 and len(rows) == 2 * len(PROBLEMS)
    model.state.method = "icot"
    metrics, _ = evaluate_baseline(model, encoder_for(tok), PROBLEMS, [0], gen)
    assert "mean_tokens/icot" in metrics
    model.state.method = "colar"
    with pytest.raises(ValueError, match="not a baseline model"):
        evaluate_baseline(model, encoder_for(tok), PROBLEMS, [0], gen)


@pytest.mark.slow
def test_one_run_trains_evaluates_and_reports_all_three_baselines(tmp_path, mlflow_server, prefect_server):
    from mlflow.tracking import MlflowClient

    from flows.pipeline import run_pipeline
    from tests.helpers import child_runs, tiny_config

    small = {"max_steps": 3, "batch_size": 8, "checkpoint_every": 0, "lr": 0.003}
    train = "{" + ", ".join(f"{k}: {v}" for k, v in small.items()) + "}"
    cfg = tiny_config(tmp_path,
                      f"baselines.icot={{epochs_per_stage: 0.1, max_stage: 2, train: {train}}}",
                      f"baselines.coconut={{epochs_per_stage: 0.1, max_stage: 2, thoughts_per_step: 1, train: {train}}}",
                      f"baselines.distill={{n_thoughts: 2, train: {train}}}")
    state = run_pipeline(cfg, return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    assert {"sft-icot", "sft-coconut", "sft-distill"} <= set(result["stages"])
    metrics = result["metrics"]
    for method in ("icot", "coconut", "distill"):
        assert 0.0 <= metrics[f"accuracy/{method}"] <= 1.0
    assert metrics["mean_latents/coconut"] == 2.0 and metrics["mean_latents/distill"] == 2.0
    assert "mean_tokens/icot" in metrics
    client = MlflowClient()
    children = {r.data.tags["colar.stage"]: r for r in child_runs(client, result["parent_run_id"])}
    assert {"sft-icot", "sft-coconut", "sft-distill"} <= set(children)
    assert "distill" in children["sft-distill"].data.metrics and "stage" in children["sft-coconut"].data.metrics
    table = (tmp_path / "runs" / "reports" / result["parent_run_id"] / "table1.md").read_text()
    assert "| iCoT |" in table and "| Coconut |" in table and "| Distill |" in table
    # the same config again: every stage cached, the baselines included
    again = run_pipeline(cfg, return_state=True).result()
    assert all(again["stages"][s] == "Cached" for s in ("sft-icot", "sft-coconut", "sft-distill", "evaluate"))


@pytest.mark.parametrize("name", ["table1.yaml", "table1-gpu.yaml"])
def test_the_table1_configs_run_every_method(name):
    from pathlib import Path

    cfg = load_config(str(Path(__file__).resolve().parents[1] / "configs" / name))
    assert [m for m, _ in cfg.baselines.selected()] == ["icot", "coconut", "distill"]
    assert cfg.eval.nocot_baseline and cfg.eval.cot_baseline and cfg.sft_cot is not None and cfg.rl is None
    assert cfg.baselines.coconut.n_thoughts == 6 and cfg.baselines.distill.n_thoughts == 6


def test_colar_compare_plots_each_baseline_as_a_marker_of_the_run(tmp_path, monkeypatch):
    import pandas as pd

    from flows import compare

    labels = []
    real = compare.save_figure

    def keep_labels(fig, path):
        labels.extend(t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts())
        return real(fig, path)

    monkeypatch.setattr(compare, "save_figure", keep_labels)
    runs = pd.DataFrame([{"run_id": "abcdef123", "tags.mlflow.runName": "t1",
                          **{f"metrics.{k}": v for k, v in METRICS.items()}}])
    compare._plot(runs, str(tmp_path / "c.png"))
    assert {"t1 abcdef", "t1 abcdef iCoT", "t1 abcdef Coconut", "t1 abcdef Distill", "t1 abcdef CoT"} <= set(labels)


def test_the_table1_bench_averages_each_method_over_training_seeds():
    from bench.table1 import aggregate, markdown, seed_overrides

    per_seed = {0: {**METRICS, "accuracy/coconut": 0.2}, 1: {**METRICS, "accuracy/coconut": 0.4}}
    table = aggregate(per_seed)
    assert list(table)[:5] == ["nocot", "cot", "icot", "coconut", "distill"]
    row = table["coconut"]
    assert row["accuracy"] == {0: 0.2, 1: 0.4} and row["accuracy_mean"] == pytest.approx(0.3)
    assert row["accuracy_ci95_over_seeds"] == pytest.approx(1.96 * (0.02 ** 0.5) / 2 ** 0.5)
    assert row["length_mean"] == 6.0 and row["length_kind"] == "latents" and table["icot"]["length_kind"] == "tokens"
    assert "| Coconut | 30.0 ± 19.6 | 20.0 / 40.0 | 6.0 |" in markdown(table)
    from pathlib import Path

    sets = seed_overrides(str(Path(__file__).resolve().parents[1] / "configs" / "table1.yaml"), 7)
    assert {"sft_cot.seed=7", "sft_colar.seed=7", "baselines.distill.train.seed=7"} <= set(sets)
