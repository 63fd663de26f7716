"""Single-stage flows, for deployments that re-run one stage on existing outputs."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from prefect import flow

from colar_core.config import EvalConfig
from colar.tasks.keys import stage_dir, stage_key
from colar.tasks.stages import evaluate_stage
from colar.tasks.tracking import end_run, flatten_params, start_parent_run


@flow(name="colar-evaluate", log_prints=True)
def evaluate_model_flow(model_dir: str, data_dir: str, eval: Optional[dict] = None, experiment: str = "colar",
                        output_dir: str = "runs") -> dict:
    """Evaluate a saved CoLaR model directory on ``data_dir/test.jsonl``; one MLflow run with an 'evaluate' child."""
    cfg = EvalConfig.model_validate(eval or {}).model_dump(mode="json")
    parent = start_parent_run(experiment, f"evaluate {Path(model_dir).name}", {"colar.single_stage": "evaluate"},
                              flatten_params({"eval": cfg, "model_dir": model_dir, "data_dir": data_dir}))
    key = stage_key("evaluate-only", cfg, {"model_dir": str(Path(model_dir).resolve()), "data": data_dir})
    try:
        result = evaluate_stage(eval_cfg=cfg, colar_model_dir=model_dir, cot_model_dir=None, nocot_model_dir=None,
                                data_dir=data_dir, out_dir=str(stage_dir(output_dir, "evaluate-only", key)),
                                parent_run_id=parent, key=key)
    except BaseException:
        end_run(parent, "FAILED")
        raise
    end_run(parent, "FINISHED")
    return {"parent_run_id": parent, **result}
