"""The kill-anywhere soak (bench/chaos.py), short: a small pipeline (SFT CoT, SFT CoLaR and RL with
checkpoints every 2 steps) SIGKILLed at 2 seeded random moments and retried with ``colar retry``,
against an uninterrupted run of the same config. ``python -m bench.chaos --kills 20`` is the long one."""

from __future__ import annotations

import json

import pytest

from bench.chaos import main

KILLS = 2


@pytest.mark.slow
def test_every_kill_is_survived_with_identical_results_and_nothing_left_behind(tmp_path):
    out = tmp_path / "chaos.json"
    code = main(["--kills", str(KILLS), "--seed", "1", "--size", "ci", "--work-dir", str(tmp_path / "work"),
                 "--out", str(out)])
    report = json.loads(out.read_text())
    assert code == 0 and report["ok"], json.dumps({k: report[k] for k in (
        "kills_attempted", "kills_survived", "failures", "mismatches", "mlflow_problems", "orphans")}, indent=2)
    assert report["kills_attempted"] == report["kills_survived"] == KILLS
    assert report["completed"] and not report["failures"]
    # Same evaluation metrics and bit-identical weights of every stage's final model.
    assert report["identical"] and not report["mismatches"] and report["metrics"]
    assert set(report["weights"]) == {"sft-cot", "sft-colar", "rl"} and all(report["weights"].values())
    assert not report["orphans"] and not report["left_alive_after_kill"]
    # One FINISHED child run per stage; the killed attempts' runs are KILLED or FAILED, none RUNNING.
    assert not report["mlflow_problems"]
    for stage, statuses in report["child_runs"].items():
        assert statuses.count("FINISHED") == 1 and set(statuses) <= {"FINISHED", "FAILED", "KILLED"}, stage
    assert len(report["kills"]) == KILLS and report["extra_wall_per_kill_s"] is not None
