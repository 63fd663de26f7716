"""The pipeline against a real MLflow server and a real Prefect server: end to end, retry after
a failed stage, and config validation before any stage starts."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from flows.config import ConfigError, load_config
from tests.helpers import child_runs, tiny_config

pytestmark = pytest.mark.slow


def test_invalid_config_is_refused_before_any_stage_naming_the_field(tmp_path, capsys):
    from flows.cli import main

    with pytest.raises(ConfigError, match=r"sft_colar\.lr"):
        load_config(None, ["sft_colar.lr=-1"])
    with pytest.raises(ConfigError, match=r"eval\.compression_factors.*trained maximum"):
        load_config(None, ["eval.compression_factors=[1,9]"])
    with pytest.raises(ConfigError, match=r"sft_cot\.zero_stage"):
        load_config(None, ["sft_cot.zero_stage=7"])
    assert main(["run", "--set", "sft_colar.lr=-1", "--set", f"output_dir={tmp_path}"]) == 2
    assert "sft_colar.lr" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # no stage wrote anything


def test_pipeline_end_to_end_is_tracked_and_serves_the_model(tmp_path, mlflow_server, prefect_server):
    import mlflow
    from mlflow.tracking import MlflowClient

    from flows.pipeline import run_pipeline

    cfg = tiny_config(tmp_path, "rl.max_steps=2", "rl.questions_per_step=2", "rl.group_size=2",
                      "rl.checkpoint_every=0", "rl.compression_factor=2", "rl.lr=0.0001", "eval.nocot_baseline=true",
                      "eval.datasets=[test, {name: svamp, source: svamp, n_examples: 4}]")
    state = run_pipeline(cfg, return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    client = MlflowClient()
    parent = client.get_run(result["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["colar.config_hash"] == cfg.digest()
    assert parent.data.tags["prefect.flow_run_id"]
    assert parent.data.params["sft_colar.max_steps"] == "6"

    children = {r.data.tags["colar.stage"]: r for r in child_runs(client, parent.info.run_id)}
    assert set(children) == {"prepare", "sft-cot", "sft-colar", "rl", "sft-nocot", "evaluate"}
    assert "reward_mean" in children["rl"].data.metrics
    assert all(r.info.status == "FINISHED" for r in children.values())

    for c in (1, 2):
        for name in (f"accuracy/c{c}", f"mean_latents/c{c}", f"accuracy_ci95/c{c}"):
            assert name in children["evaluate"].data.metrics and name in parent.data.metrics
    assert {"accuracy/cot", "mean_tokens/cot", "accuracy/nocot"} <= set(parent.data.metrics)
    # Every set at every setting, the primary set ('test') also unprefixed, and the average over sets.
    for s in ("test", "svamp", "avg"):
        for setting in ("c1", "c2", "cot", "nocot"):
            assert f"accuracy/{s}/{setting}" in parent.data.metrics, (s, setting)
            assert f"sec_per_question/{s}/{setting}" in parent.data.metrics
    assert parent.data.metrics["accuracy/c2"] == parent.data.metrics["accuracy/test/c2"]
    avg = parent.data.metrics["mean_latents/avg/c2"]
    assert avg == pytest.approx((parent.data.metrics["mean_latents/test/c2"] +
                                 parent.data.metrics["mean_latents/svamp/c2"]) / 2)
    assert all(parent.data.metrics[f"sec_per_question/svamp/{st}"] > 0 for st in ("c1", "c2", "cot", "nocot"))
    predictions = pd.read_csv(client.download_artifacts(children["evaluate"].info.run_id, "predictions.csv", str(tmp_path)))
    assert predictions.groupby("set").size().to_dict() == {"test": 8 * 4, "svamp": 4 * 4}  # 4 settings, 1 seed
    root = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"table1.md", "table1.png"} <= root
    md = Path(client.download_artifacts(parent.info.run_id, "table1.md", str(tmp_path))).read_text()
    lines = [row for row in md.splitlines() if row.startswith("| ")]
    assert lines[0].split(" | ")[1:4] == ["test Acc (%)", "test #L", "test ms/q"]
    assert "Average Acc (%)" in lines[0] and "svamp #L" in lines[0]
    assert [row.split(" | ")[0].removeprefix("| ") for row in lines[2:]] == ["No-CoT", "CoT", "CoLaR-1", "CoLaR-2"]
    assert children["sft-colar"].data.metrics["ce"] > 0
    assert len(client.get_metric_history(children["sft-colar"].info.run_id, "loss")) == 6

    inputs = children["prepare"].inputs.dataset_inputs
    assert {i.dataset.name.rsplit(":", 1)[1] for i in inputs} == {"train", "val", "test"}
    assert all(len(i.dataset.digest) == 32 for i in inputs)

    artifacts = {a.path for a in client.list_artifacts(children["sft-colar"].info.run_id)}
    assert {"model", "plots"} <= artifacts
    assert "plots/accuracy_vs_length.png" in {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert {"predictions.csv", "eval_sets.json"} <= {a.path for a in client.list_artifacts(children["evaluate"].info.run_id)}
    # The gate's inputs: the interval over questions, how many, and each set's content digest (primary unnamed too)
    assert parent.data.metrics["n_questions/test/c2"] == 8 and parent.data.metrics["n_questions/svamp/c2"] == 4
    assert parent.data.metrics["accuracy_qci95/c2"] == parent.data.metrics["accuracy_qci95/test/c2"]
    digests = {k: v for k, v in parent.data.tags.items() if k.startswith("colar.eval.digest")}
    assert set(digests) == {"colar.eval.digest", "colar.eval.digest.test", "colar.eval.digest.svamp"}
    assert digests["colar.eval.digest"] == digests["colar.eval.digest.test"] != digests["colar.eval.digest.svamp"]

    # Every run registers a version; the gate decides whether 'candidate' moves to it, and says why.
    assert parent.data.tags["colar.promotion.decision"] in ("promoted", "kept")
    assert parent.data.tags["colar.promotion.metric"] == "accuracy/c2" and parent.data.tags["colar.promotion.reason"]
    assert (result.get("alias_uri") is not None) == (parent.data.tags["colar.promotion.decision"] == "promoted")
    model = mlflow.pyfunc.load_model("models:/colar-test@candidate")
    out = model.predict(pd.DataFrame({"question": ["Mia has 3 boxes of 4 pens. How many pens?"]}),
                        params={"compression_factor": 2})
    assert list(out.columns) == ["answer", "n_latents", "text", "compression_factor", "why", "warning"]
    # the pipeline logs the model with its frontier (issue 26, item 4): a latency budget chooses the factor
    out = model.predict(pd.DataFrame({"question": ["Mia has 3 boxes of 4 pens. How many pens?"]}),
                        params={"latency_budget_ms": 1e9})
    chosen = int(out["compression_factor"][0])  # every factor fits: the most accurate one evaluated
    assert f"accuracy/c{chosen}" in parent.data.metrics and out["warning"][0] == ""
    assert out["why"][0].startswith("latency_budget_ms 1e+09: the most accurate of the")
    assert 1 <= int(out["n_latents"][0]) <= 64


def test_retry_skips_finished_stages_and_resumes_the_failed_one(tmp_path, mlflow_server, prefect_server,
                                                                 fail_stage_once):
    from mlflow.tracking import MlflowClient

    from colar_core.training.sft import SFTResult
    from flows.cli import main
    from flows.pipeline import run_pipeline

    cfg = tiny_config(tmp_path, "name=test-retry", "tracking.registered_model_name=null", "training_retries=0")
    fail_stage_once("sft-colar", 3)  # after the step-2 checkpoint
    state = run_pipeline(cfg, return_state=True)
    assert state.is_failed()
    client = MlflowClient()
    parent_id = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        filter_string="attributes.run_name = 'test-retry' and tags.`colar.config_hash` != ''")[0].info.run_id
    assert client.get_run(parent_id).info.status == "FAILED"

    assert main(["retry", parent_id]) == 0

    children = child_runs(client, parent_id)
    stages = sorted((r.data.tags["colar.stage"], r.info.status) for r in children)
    assert stages == [("evaluate", "FINISHED"), ("prepare", "FINISHED"), ("sft-colar", "FAILED"),
                      ("sft-colar", "FINISHED"), ("sft-cot", "FINISHED")]
    assert client.get_run(parent_id).info.status == "FINISHED"
    colar_dir = next((tmp_path / "runs").glob("sft-colar-*"))
    result = SFTResult.load(colar_dir)
    assert result.resumed_from == 2 and result.final_step == 6


def test_compare_tables_finished_runs_and_plots(tmp_path, mlflow_server, prefect_server, capsys):
    """Runs after the end-to-end test in this module (same session servers); runs one itself if alone."""
    from mlflow.tracking import MlflowClient

    from flows.cli import main
    from flows.compare import compare_runs
    from flows.pipeline import run_pipeline

    client = MlflowClient()
    exp = client.get_experiment_by_name("colar")
    if exp is None or not client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'"):
        assert run_pipeline(tiny_config(tmp_path, "tracking.registered_model_name=null"),
                            return_state=True).is_completed()
    table = compare_runs("colar", str(tmp_path / "cmp.png"))
    assert {"accuracy/c1", "mean_latents/c2", "wall_min", "trained_c"} <= set(table.columns)
    assert (tmp_path / "cmp.png").stat().st_size > 1000
    assert main(["compare", "--plot", str(tmp_path / "cmp2.png")]) == 0
    assert "accuracy/c1" in capsys.readouterr().out
    assert main(["compare", "--table"]) == 0
    out = capsys.readouterr().out
    assert "| method | test Acc (%) | test #L | test ms/q |" in out and "| CoLaR-2 |" in out


RL_TINY = ["rl.max_steps=4", "rl.questions_per_step=2", "rl.group_size=2", "rl.checkpoint_every=2",
           "rl.compression_factor=2", "rl.lr=0.0001"]


@pytest.mark.parametrize("stage", ["sft-colar", "rl"])
def test_a_failed_training_stage_is_retried_by_prefect_and_resumes(tmp_path, mlflow_server, prefect_server,
                                                                   fail_stage_once, stage):
    """With training_retries=1 (the default) a stage that fails once is retried inside the same
    flow run, and the retry resumes from the stage's checkpoint instead of step 0."""
    from mlflow.tracking import MlflowClient

    from colar_core.rl.trainer import RLResult
    from colar_core.training.sft import SFTResult
    from flows.pipeline import run_pipeline

    extra = RL_TINY if stage == "rl" else []
    cfg = tiny_config(tmp_path, f"name=test-auto-retry-{stage}", "tracking.registered_model_name=null",
                      "eval.cot_baseline=false", *extra)
    fail_stage_once(stage, 3)  # after the step-2 checkpoint
    state = run_pipeline(cfg, return_state=True)
    assert state.is_completed(), state.message
    children = child_runs(MlflowClient(), state.result()["parent_run_id"])
    runs = sorted(r.info.status for r in children if r.data.tags["colar.stage"] == stage)
    assert runs == ["FAILED", "FINISHED"]
    result_cls = RLResult if stage == "rl" else SFTResult
    result = result_cls.load(next((tmp_path / "runs").glob(f"{stage}-*")))
    assert result.resumed_from == 2 and result.final_step == (4 if stage == "rl" else 6)


def test_the_gpu_config_runs_through_the_pipeline_at_toy_size(tmp_path, mlflow_server, prefect_server):
    """configs/gpu.yaml (the benchmark-scale run) with only sizes shrunk: bf16 DeepSpeed, length
    grouping, RL and the No-CoT baseline all go through the same command a GPU user runs."""
    from pathlib import Path

    from flows.pipeline import run_pipeline

    shrink = ["data.builtin.n_train=256", "data.builtin.n_val=16", "data.builtin.n_test=16",
              "model.tiny.hidden_size=32", "model.tiny.num_layers=1", "model.tiny.num_heads=2",
              "model.tiny.num_kv_heads=1", "sft_cot.max_steps=4", "sft_cot.warmup_steps=0", "sft_cot.batch_size=16",
              "sft_colar.max_steps=4", "sft_colar.warmup_steps=0", "sft_colar.batch_size=16",
              "rl.max_steps=2", "rl.questions_per_step=2", "rl.group_size=2", "eval.n_examples=16",
              "eval.seeds=[0]", "eval.generation.max_latents=8", "eval.generation.max_cot_tokens=16",
              "tracking.registered_model_name=null", f"output_dir={tmp_path / 'runs'}"]
    cfg = load_config(str(Path(__file__).resolve().parents[1] / "configs" / "gpu.yaml"), shrink)
    assert cfg.sft_colar.precision == "bf16" and cfg.sft_colar.length_grouping > 0
    state = run_pipeline(cfg, return_state=True)
    assert state.is_completed(), state.message
    metrics = state.result()["metrics"]
    assert {f"accuracy/c{c}" for c in range(1, 6)} | {"accuracy/cot", "accuracy/nocot"} <= set(metrics)
