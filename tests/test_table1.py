"""Per-set metric names, the average over sets, named evaluation sets in the config, and the
Table-1 report built from a run's metrics (no servers)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from colar_core.config import EvalConfig
from colar_core.evaluation import average_over_sets, for_set
from tasks.table1 import table1, table1_markdown, table1_png


def test_for_set_puts_the_set_name_after_the_metric():
    m = {"accuracy/c2": 0.5, "mean_latents/c2": 7.0, "accuracy/cot": 0.6, "sec_per_question/nocot": 0.01}
    assert for_set(m, "svamp") == {"accuracy/svamp/c2": 0.5, "mean_latents/svamp/c2": 7.0,
                                   "accuracy/svamp/cot": 0.6, "sec_per_question/svamp/nocot": 0.01}


def test_average_over_sets_is_the_plain_mean_of_settings_every_set_has():
    metrics = {**for_set({"accuracy/c1": 0.2, "accuracy_ci95/c1": 0.1, "mean_latents/c1": 4.0, "accuracy/cot": 0.9}, "a"),
               **for_set({"accuracy/c1": 0.6, "accuracy_ci95/c1": 0.3, "mean_latents/c1": 8.0}, "b"),
               "accuracy/c1": 0.2}
    avg = average_over_sets(metrics, ["a", "b"])
    assert avg == {"accuracy/avg/c1": pytest.approx(0.4), "mean_latents/avg/c1": pytest.approx(6.0)}
    # 'cot' only on set a: no average; intervals are not averaged.


def test_eval_sets_config_names_bad_fields():
    cfg = EvalConfig(datasets=["svamp", {"name": "hard", "source": "gsm-hard", "n_examples": 5}])
    assert [(s.name, s.source) for s in cfg.sets()] == [("svamp", "svamp"), ("hard", "gsm-hard")]
    assert [(s.name, s.source) for s in EvalConfig().sets()] == [("test", "test")]
    for bad, field in ((["svamp", "svamp"], "datasets"), (["avg"], "datasets.0.name"),
                       ([{"name": "x y", "source": "svamp"}], "datasets.0.name"),
                       ([{"name": "x", "source": "svamp", "format": "csv"}], "datasets.0.format")):
        with pytest.raises(ValidationError) as err:
            EvalConfig(datasets=bad)
        assert field in str(err.value), (bad, str(err.value))


METRICS = {
    **for_set({"accuracy/c1": 0.5, "accuracy_ci95/c1": 0.02, "mean_latents/c1": 10.0, "sec_per_question/c1": 0.004,
               "accuracy/c2": 0.4, "accuracy_ci95/c2": 0.03, "mean_latents/c2": 5.0,
               "accuracy/cot": 0.6, "accuracy_ci95/cot": 0.01, "mean_tokens/cot": 20.0,
               "accuracy/nocot": 0.1, "mean_tokens/nocot": 1.0}, "gsm"),
    **for_set({"accuracy/c1": 0.3, "mean_latents/c1": 8.0, "accuracy/c2": 0.2, "mean_latents/c2": 4.0,
               "accuracy/cot": 0.35, "mean_tokens/cot": 18.0}, "svamp"),
    "accuracy/c1": 0.5, "time/sft-cot/wall_s": 3.0,
}


def test_table1_rows_methods_columns_sets_then_the_average(tmp_path):
    METRICS.update(average_over_sets(METRICS, ["gsm", "svamp"]))
    table = table1(METRICS)
    assert list(table.index) == ["No-CoT", "CoT", "CoLaR-1", "CoLaR-2"]
    assert list(table.columns) == ["gsm Acc (%)", "gsm #L", "gsm ms/q", "svamp Acc (%)", "svamp #L", "svamp ms/q",
                                   "Average Acc (%)", "Average #L", "Average ms/q"]
    assert table.loc["CoLaR-1", "gsm Acc (%)"] == "50.0 ± 2.0"
    assert table.loc["CoLaR-1", "gsm ms/q"] == "4.0"
    assert table.loc["CoLaR-2", "Average Acc (%)"] == "30.0" and table.loc["CoLaR-2", "Average #L"] == "4.5"
    assert table.loc["No-CoT", "svamp Acc (%)"] == "-"  # not evaluated there
    md = table1_markdown(table, "run x")
    assert md.splitlines()[2].startswith("| method | gsm Acc (%) |") and "| CoT | 60.0 ± 1.0 | 20.0 |" in md
    png = table1_png(table, tmp_path / "t.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_a_run_from_before_named_sets_gives_one_set_named_test():
    table = table1({"accuracy/c1": 0.5, "accuracy_ci95/c1": 0.1, "mean_latents/c1": 3.0, "accuracy/cot": 0.7})
    assert list(table.index) == ["CoT", "CoLaR-1"]
    assert list(table.columns)[:2] == ["test Acc (%)", "test #L"]


def test_preflight_checks_each_eval_set_and_the_test_split_only_when_evaluated(tmp_path):
    from flows.config import ConfigError, load_config, preflight

    data = tmp_path / "train.jsonl"
    data.write_text('{"question": "q", "steps": ["1+1=2"], "answer": "2"}\n')
    base = [f"data.source={data}", "data.test_fraction=0"]
    with pytest.raises(ConfigError, match=r"field 'data\.test_fraction'"):
        preflight(load_config(None, base))  # evaluates the (empty) test split
    preflight(load_config(None, base + ["eval.datasets=[svamp, multiarith]"]))  # bundled sets: fine
    with pytest.raises(ConfigError, match=r"field 'eval\.datasets\[1\]\.source': file or directory '/no/such\.jsonl'"):
        preflight(load_config(None, base + ["eval.datasets=[svamp, {name: x, source: /no/such.jsonl}]"]))


def test_eval_set_sources_key_the_evaluate_stage_by_content(tmp_path):
    """An in-place edit of an evaluation set re-keys the evaluate stage; an unchanged one does not;
    a bundled name is keyed by its file's content, and the test split by the data digest (not here)."""
    from tasks.keys import eval_inputs

    f = tmp_path / "extra.jsonl"
    f.write_text('{"question": "q", "steps": [], "answer": "2"}\n')
    conf = EvalConfig(datasets=["test", "svamp", {"name": "extra", "source": str(f)}]).model_dump(mode="json")
    first = eval_inputs(conf)
    assert set(first) == {"eval.svamp", "eval.extra"} and first["eval.svamp"].startswith("sha256:")
    assert eval_inputs(conf) == first
    f.write_text('{"question": "q", "steps": [], "answer": "3"}\n')
    second = eval_inputs(conf)
    assert second["eval.extra"] != first["eval.extra"] and second["eval.svamp"] == first["eval.svamp"]
