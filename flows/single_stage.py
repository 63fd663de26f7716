"""Single-stage flows, for deployments that re-run one stage on existing outputs."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from prefect import flow

from colar_core.config import EvalConfig
from colar.tasks.evaluate import evaluate_stage
from colar.tasks.runs import ending_run, start_parent_run
from colar.tasks.stage_spec import StageSpec


@flow(name="colar-evaluate", log_prints=True)
def evaluate_model_flow(model_dir: str, data_dir: str, eval: Optional[dict] = None, experiment: str = "colar",
                        output_dir: str = "runs") -> dict:
    """Evaluate a saved CoLaR model directory on ``data_dir/test.jsonl``; one MLflow run with an 'evaluate' child."""
    cfg = EvalConfig.model_validate(eval or {}).model_dump(mode="json")
    parent = start_parent_run(experiment, f"evaluate {Path(model_dir).name}", {"colar.single_stage": "evaluate"},
                              {"eval": cfg, "model_dir": model_dir, "data_dir": data_dir})
    spec = StageSpec(evaluate_stage, "evaluate-only", {"eval_cfg": cfg},
                     inputs={"model_dir": str(Path(model_dir).resolve()), "data": data_dir},
                     args={"colar_model_dir": model_dir, "cot_model_dir": None, "nocot_model_dir": None,
                           "data_dir": data_dir, "parent_run_id": parent})
    with ending_run(parent):
        result = spec.run(output_dir).result()  # raises the stage's exception if it failed
    return {"parent_run_id": parent, **result}
