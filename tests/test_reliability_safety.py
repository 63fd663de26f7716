"""Reliability, safety: no remote code unless asked, weights only from safetensors (a pickle is never
loaded), and secrets from the environment never reach MLflow params/tags or the logs.

Servers binding to 127.0.0.1 is tested in tests/test_servers.py (the listening address is read
from /proc/net/tcp).
"""

from __future__ import annotations

import logging
import os
import pickle

import pytest
import torch

from bench.tiny import tiny_model, tiny_tokenizer
from colar_core.config import ModelConfig
from colar_core.model import ColarModel, load_backbone
from colar_core.tokenizer import load_tokenizer
from flows.config import PipelineConfig
from tests.helpers import Payload

SECRET = "some-secret-value-123"


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "m"
    tiny_model(tok, hidden=32, layers=1, heads=2).save_pretrained(path, tok)
    return path, tok


def _spy(monkeypatch, cls, calls):
    original = cls.from_pretrained

    def from_pretrained(*args, **kwargs):
        calls.append((cls.__name__, kwargs))
        return original(*args, **kwargs)

    monkeypatch.setattr(cls, "from_pretrained", from_pretrained)


def test_remote_code_is_off_unless_the_config_says_so(saved_model, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, tok = saved_model
    calls: list = []
    _spy(monkeypatch, AutoModelForCausalLM, calls)
    _spy(monkeypatch, AutoTokenizer, calls)
    assert PipelineConfig().model.trust_remote_code is False and ModelConfig().trust_remote_code is False

    ColarModel.from_pretrained(path)
    load_backbone(ModelConfig(name_or_path=str(path / "backbone")), tok)
    load_tokenizer(str(path / "tokenizer"))
    assert [name for name, _ in calls] == ["AutoModelForCausalLM", "AutoModelForCausalLM", "AutoTokenizer"]
    assert all(kw["trust_remote_code"] is False for _, kw in calls)
    assert all(kw["use_safetensors"] is True for name, kw in calls if name == "AutoModelForCausalLM")

    calls.clear()
    load_backbone(ModelConfig(name_or_path=str(path / "backbone"), trust_remote_code=True), tok)
    load_tokenizer(str(path / "tokenizer"), trust_remote_code=True)
    assert [kw["trust_remote_code"] for _, kw in calls] == [True, True]


def test_a_model_directory_with_only_a_pickle_is_refused_unopened(saved_model, tmp_path, monkeypatch):
    import shutil

    path, tok = saved_model
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    (bad / "backbone" / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    with open(bad / "backbone" / "pytorch_model.bin", "wb") as fh:
        pickle.dump({"model.embed_tokens.weight": Payload(str(marker))}, fh)
    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a) or real_load(*a, **k))

    with pytest.raises(OSError, match="safetensors"):
        ColarModel.from_pretrained(bad)
    with pytest.raises(OSError, match="safetensors"):
        load_backbone(ModelConfig(name_or_path=str(bad / "backbone")), tok)
    assert not marker.exists() and loads == []  # never unpickled


@pytest.mark.slow
def test_secrets_never_reach_params_tags_or_logs(tmp_path, mlflow_server, prefect_server, monkeypatch, capfd):
    """HF_TOKEN's value, pasted into a config field, is masked everywhere the pipeline records it."""
    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    from flows.pipeline import run_pipeline
    from tests.helpers import tiny_config

    class Recorder(logging.Handler):  # every log record, as the console would format it
        def __init__(self):
            super().__init__(logging.DEBUG)
            self.lines: list[str] = []

        def emit(self, record):
            self.lines.append(self.format(record))

    recorder = Recorder()
    loggers = [logging.getLogger(), logging.getLogger("prefect")]
    for logger in loggers:
        logger.addHandler(recorder)
    monkeypatch.setenv("HF_TOKEN", SECRET)
    cfg = tiny_config(tmp_path, f"name=rel-secret-{SECRET}", "tracking.registered_model_name=null",
                      "sft_cot=null", "eval.cot_baseline=false")
    try:
        state = run_pipeline(cfg, return_state=True)
    finally:
        for logger in loggers:
            logger.removeHandler(recorder)
    assert state.is_completed(), state.message
    parent_id = state.result()["parent_run_id"]
    APILogHandler().flush()

    client = MlflowClient()
    parent = client.get_run(parent_id)
    runs = [parent] + client.search_runs([parent.info.experiment_id],
                                         filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")
    assert {r.data.tags.get("colar.stage") for r in runs} == {None, "prepare", "sft-colar", "evaluate"}
    for run in runs:
        recorded = {**run.data.params, **run.data.tags, "run_name": run.info.run_name}
        leaks = {k: v for k, v in recorded.items() if SECRET in k or SECRET in v}
        assert not leaks, f"{run.info.run_name}: {leaks}"
    assert parent.info.run_name == "rel-secret-***" and parent.data.tags["colar.pipeline"] == "rel-secret-***"
    assert parent.data.params["name"] == "rel-secret-***"

    flow_run_id = parent.data.tags["prefect.flow_run_id"]
    with get_client(sync_client=True) as pc:
        logs = pc.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    assert len(logs) > 5  # the flow's and the tasks' logs reached the server
    assert not [log.message for log in logs if SECRET in log.message]
    assert any(log.message.startswith("[train] step 6/6") for log in logs)  # training progress is in the flow's log
    assert any("MLflow parent run" in line for line in recorder.lines)  # the log records were seen
    assert not [line for line in recorder.lines if SECRET in line]
    out, err = capfd.readouterr()  # and what reached stdout/stderr directly (MLflow's and Prefect's prints)
    assert SECRET not in out + err
    assert os.environ["HF_TOKEN"] == SECRET
