"""The ``report`` step, on the parent run: headline metrics, the accuracy-vs-length plot (a panel per
test set), the Table-1 report (``table1.md``, ``table1.png``: :mod:`colar.tasks.table1`), and the
final model logged as an MLflow pyfunc and registered with the alias ``candidate``.

The model logging is the one place in the pipeline that uses MLflow's active run (``mlflow.start_run``),
because in mlflow 3.17.2 ``mlflow.pyfunc.log_model`` takes its run from there: it has no ``run_id``
parameter, its ``model_id`` parameter does not link the model to a run (no run output, no run id in
``MLmodel``), and the lower-level ``Model.log(run_id=...)`` creates the LoggedModel in the default
experiment instead of the run's. It is safe: the active run belongs to this worker thread only, and
``start_run(run_id=parent)`` resumes the parent run for the block; leaving the block ends it
FINISHED (FAILED if logging raised), and the flow ends it for good right after the report.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.models import infer_signature
from prefect import get_run_logger, task

from colar.tasks.plots import accuracy_vs_length_plot
from colar.tasks.runs import log_metrics
from colar.tasks.stage_spec import stage_folder
from colar.tasks.table1 import table1, table1_markdown, table1_png

PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")


@task(name="report", retries=1, retry_delay_seconds=2)
def report_stage(parent_run_id: str, metrics: dict, model_dir: str, out_dir: str,
                 registered_model_name: Optional[str], example_question: str) -> dict:
    """Log ``metrics`` and the plot to the parent run; log (and register, if named) the model."""
    logger = get_run_logger()
    client = MlflowClient()
    out = stage_folder(out_dir)
    log_metrics(parent_run_id, metrics, client=client)
    plot = accuracy_vs_length_plot(metrics, out / "accuracy_vs_length.png")
    client.log_artifact(parent_run_id, str(plot), "plots")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    table = table1(metrics)
    (out / "table1.md").write_text(table1_markdown(table, f"Table 1 (run {parent_run_id})"))
    table1_png(table, out / "table1.png", f"run {parent_run_id}")
    for name in ("table1.md", "table1.png"):
        client.log_artifact(parent_run_id, str(out / name))

    example = pd.DataFrame({"question": [example_question]})
    output = pd.DataFrame({"answer": ["0"], "n_latents": [1], "text": ["Answer:0"]})
    signature = infer_signature(example, output, params={"compression_factor": 2, "seed": 0, "max_latents": 64,
                                                         "sample": False})
    # The active run (this thread only): pyfunc.log_model has no run_id parameter (module docstring).
    with mlflow.start_run(run_id=parent_run_id, nested=False, log_system_metrics=False):
        info = mlflow.pyfunc.log_model(name="colar_model", python_model=str(PYFUNC_CODE),
                                       artifacts={"colar_model": model_dir}, signature=signature,
                                       registered_model_name=registered_model_name)
    result = {"model_uri": info.model_uri, "plot": str(plot), "table1": str(out / "table1.md")}
    if registered_model_name:
        version = info.registered_model_version
        client.set_registered_model_alias(registered_model_name, "candidate", str(version))
        result.update(registered_model=registered_model_name, version=str(version),
                      alias_uri=f"models:/{registered_model_name}@candidate")
    logger.info("model logged at %s%s", info.model_uri,
                f", registered as models:/{registered_model_name}@candidate" if registered_model_name else "")
    return result
