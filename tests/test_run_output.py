"""What a person reads at the end of `colar run` (issue 26, item 5): Table 1 as text, the promotion
decision, what each stage did and the links; `--json` gives scripts one JSON object instead."""

from __future__ import annotations

import json

from flows.cli import build_parser, final_report, run_links, run_summary

RESULT = {
    "metrics": {"accuracy/test/c1": 0.52, "accuracy_ci95/test/c1": 0.007, "mean_latents/test/c1": 14.9,
                "sec_per_question/test/c1": 0.004, "accuracy/test/c2": 0.437, "accuracy_ci95/test/c2": 0.012,
                "mean_latents/test/c2": 8.0, "sec_per_question/test/c2": 0.0029, "accuracy/test/cot": 0.545,
                "accuracy_ci95/test/cot": 0.015, "mean_tokens/test/cot": 14.9, "sec_per_question/test/cot": 0.0056,
                "accuracy/c1": 0.52, "accuracy_ci95/c1": 0.007, "mean_latents/c1": 14.9},
    "stages": {"prepare": "Cached", "sft-colar": "Completed", "evaluate": "Completed"},
    "model_uri": "models:/m-1", "registered_model": "colar-tiny", "version": "3", "promoted": False,
    "promotion_reason": "accuracy/c2 0.4370 does not beat version 1's 0.4400",
}


def test_a_finished_run_ends_with_table_1_as_text_the_promotion_and_the_stages():
    text = final_report(RESULT, "abc123")
    lines = text.splitlines()
    assert lines[0].startswith("Table 1 (pipeline run abc123): accuracy (%) ± 95% interval over seeds")
    header = lines[1]
    assert "test Acc (%)" in header and "test #L" in header and "test ms/q" in header
    rows = {line.split()[0]: line for line in lines[2:] if line.split() and line.split()[0] in ("CoT", "CoLaR-1", "CoLaR-2")}
    assert "54.5 ± 1.5" in rows["CoT"] and "14.9" in rows["CoT"] and "5.6" in rows["CoT"]
    assert "43.7 ± 1.2" in rows["CoLaR-2"] and "8.0" in rows["CoLaR-2"] and "2.9" in rows["CoLaR-2"]
    assert "Registered model: colar-tiny version 3; 'candidate' kept: accuracy/c2 0.4370" in text
    assert lines[-1] == "Stages: prepare Cached, sft-colar Completed, evaluate Completed"
    assert len(lines) < 12  # not the 40-line JSON that repeated each metric with and without its set
    assert '"accuracy/c1"' not in text
    promoted = final_report({**RESULT, "promoted": True, "alias_uri": "models:/colar-tiny@candidate",
                             "promotion_reason": "no candidate yet"}, "abc123")
    assert "Registered model: models:/colar-tiny@candidate (version 3: no candidate yet)" in promoted


def test_json_gives_scripts_one_object_with_metrics_stages_model_and_links():
    urls = {"mlflow": "http://user:secret@127.0.0.1:5000", "prefect": "http://127.0.0.1:4200/api"}
    links = run_links(urls, "abc123", "7", "flow-1")
    assert links == {"mlflow_run": "http://user:***@127.0.0.1:5000/#/experiments/7/runs/abc123",
                     "prefect_flow_run": "http://127.0.0.1:4200/runs/flow-run/flow-1"}
    summary = json.loads(json.dumps(run_summary(RESULT, "abc123", links)))
    assert summary["metrics"]["accuracy/test/c2"] == 0.437 and summary["stages"]["sft-colar"] == "Completed"
    assert summary["parent_run_id"] == "abc123" and summary["links"] == links
    assert summary["promoted"] is False and summary["version"] == "3"
    parser = build_parser()
    assert parser.parse_args(["run", "--json"]).json and not parser.parse_args(["run"]).json
    assert parser.parse_args(["retry", "r1", "--json"]).json
