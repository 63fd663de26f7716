"""Single-stage flows, for deployments that re-run one stage on existing outputs."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from prefect import flow

from colar_core.config import EvalConfig
from colar_core.files import content_digest
from colar_infra.tracking.runs import ending_run, start_parent_run
from tasks.evaluate import EvaluateResult, evaluate_stage
from tasks.keys import stage_code
from tasks.stage_spec import StageSpec


def evaluate_only_spec(model_dir: str, data_dir: str, eval_cfg: dict, output_dir: str, parent_run_id: str) -> StageSpec:
    """The evaluate-only stage, keyed on the content of what it reads (the model folder and
    ``data_dir/test.jsonl``), not on their paths, and on the absolute ``output_dir``."""
    return StageSpec(evaluate_stage, "evaluate-only", {"eval_cfg": eval_cfg}, output_dir,
                     inputs={"model": content_digest(model_dir),
                             "data": content_digest(Path(data_dir) / "test.jsonl")},
                     args={"colar_model_dir": model_dir, "cot_model_dir": None, "nocot_model_dir": None,
                           "data_dir": data_dir, "parent_run_id": parent_run_id},
                     code=stage_code("evaluate"))


@flow(name="colar-evaluate", log_prints=True)
def evaluate_model_flow(model_dir: str, data_dir: str, eval: Optional[dict] = None, experiment: str = "colar",
                        output_dir: str = "runs") -> dict:
    """Evaluate a saved CoLaR model directory on ``data_dir/test.jsonl``; one MLflow run with an 'evaluate' child."""
    cfg = EvalConfig.model_validate(eval or {}).model_dump(mode="json")
    parent = start_parent_run(experiment, f"evaluate {Path(model_dir).name}", {"colar.single_stage": "evaluate"},
                              {"eval": cfg, "model_dir": model_dir, "data_dir": data_dir})
    with ending_run(parent):
        spec = evaluate_only_spec(model_dir, data_dir, cfg, output_dir, parent)  # fails here if either is missing
        result = spec.run().result()  # raises the stage's exception if it failed
    if not isinstance(result, EvaluateResult):
        raise TypeError(f"stage {spec.name} returned {type(result).__name__}, not an EvaluateResult")
    return {"parent_run_id": parent, **result.model_dump()}
