"""Reliability, bad data: every kind of bad record is located (file, line, field) under the fail
policy and counted exactly under the skip policy, and the prepare stage logs that count to MLflow.

The per-kind messages are tested in tests/test_data_readers.py; this file adds the oversized line
and the path through the pipeline's prepare stage (its ``records/skipped`` metric).
"""

from __future__ import annotations

import json

import pytest

from colar_core.config import ModelConfig
from colar_core.data import DataError, read_records
from colar_core.data.readers import MAX_LINE_BYTES
from flows.config import DataConfig
from tests.helpers import GOOD_ROW, TEN_MB, huge_row, mixed_file


@pytest.mark.parametrize("fmt", ["jsonl", "gsm8k-aug"])
def test_ten_megabyte_line_is_refused_with_file_line_field_or_counted(tmp_path, fmt):
    path = tmp_path / ("big.jsonl" if fmt == "jsonl" else "big.txt")
    good = json.dumps(GOOD_ROW).encode() if fmt == "jsonl" else b"Fine?||<<1+1=2>> #### 2"
    huge = huge_row() if fmt == "jsonl" else b"Q " + b"y" * TEN_MB + b"?||<<1+1=2>> #### 2"
    assert len(huge) > MAX_LINE_BYTES
    path.write_bytes(good + b"\n" + huge + b"\n" + good + b"\n")

    with pytest.raises(DataError) as info:
        read_records(str(path), format=fmt)
    msg = str(info.value)
    assert msg.startswith(f"{path}:2: field 'record': line is ") and "byte limit" in msg, msg
    assert len(msg) < 300  # the message does not quote the 10 MB
    assert (info.value.line, info.value.field) == (2, "record")

    skipped = read_records(str(path), format=fmt, policy="skip")
    assert len(skipped.records) == 2 and skipped.skipped == 1
    assert skipped.errors[0].startswith(f"{path}:2: field 'record'")


def test_prepare_stage_logs_the_exact_skipped_count_to_mlflow(tmp_path, mlflow_server):
    """tasks.prepare.prepare_stage (the task body) under a real parent run: skip counts, fail names."""
    from mlflow import MlflowClient
    from prefect.logging import disable_run_logger

    from colar_infra.tracking.runs import end_run, start_parent_run
    from tasks.prepare import prepare_stage

    source, n_good, n_bad = mixed_file(tmp_path / "mixed.jsonl")
    model = ModelConfig(tiny=dict(hidden_size=32, num_layers=1, num_heads=2)).model_dump(mode="json")
    client = MlflowClient()
    parent = start_parent_run("colar-reliability", "bad-data", tags={}, params={})

    data = DataConfig(source=source, policy="skip").model_dump(mode="json")
    with disable_run_logger():
        result = prepare_stage.fn(data=data, model=model, out_dir=str(tmp_path / "skip"), parent_run_id=parent,
                                  key="k-skip")
    child = client.get_run(result.mlflow_run_id)
    assert child.info.status == "FINISHED" and child.data.tags["mlflow.parentRunId"] == parent
    assert child.data.metrics["records/skipped"] == n_bad == 9
    assert sum(result.counts.values()) == n_good
    manifest = json.loads((tmp_path / "skip" / "data" / "manifest.json").read_text())
    assert manifest["skipped"] == n_bad and len(manifest["skipped_examples"]) == n_bad

    data = DataConfig(source=source, policy="fail").model_dump(mode="json")
    with disable_run_logger(), pytest.raises(DataError) as info:
        prepare_stage.fn(data=data, model=model, out_dir=str(tmp_path / "fail"), parent_run_id=parent, key="k-fail")
    assert str(info.value).startswith(f"{source}:11: field 'json': invalid JSON")
    failed = [r for r in client.search_runs([child.info.experiment_id],
                                            filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")
              if r.info.run_id != child.info.run_id]
    assert [r.info.status for r in failed] == ["FAILED"]
    assert not (tmp_path / "fail" / "data" / "train.jsonl").exists()  # nothing half-written
    end_run(parent)
