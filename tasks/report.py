"""The last stage: headline metrics on the parent run, the accuracy-vs-length plot, and the final
model logged as an MLflow pyfunc and registered with the alias ``candidate``."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

from prefect import get_run_logger, task

PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")


def accuracy_vs_length_plot(metrics: dict, path: Path, title: str = "") -> Path:
    """Accuracy against mean chain length: one point per compression factor, plus the baselines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    factors = sorted(int(m.group(1)) for k in metrics if (m := re.fullmatch(r"accuracy/c(\d+)", k)))
    xs = [metrics[f"mean_latents/c{c}"] for c in factors]
    ys = [metrics[f"accuracy/c{c}"] for c in factors]
    errs = [metrics.get(f"accuracy_ci95/c{c}", 0.0) for c in factors]
    ax.errorbar(xs, ys, yerr=errs, marker="o", label="CoLaR")
    for c, x, y in zip(factors, xs, ys):
        ax.annotate(f"c={c}", (x, y), textcoords="offset points", xytext=(4, 4))
    for mode, marker in (("cot", "s"), ("nocot", "x")):
        if f"accuracy/{mode}" in metrics:
            ax.scatter([metrics.get(f"mean_tokens/{mode}", 0.0)], [metrics[f"accuracy/{mode}"]], marker=marker,
                       label=mode.upper().replace("NO", "No-"), zorder=3)
    ax.set_xlabel("mean chain length (latents, or tokens for CoT)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.02)
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


@task(name="report", retries=1, retry_delay_seconds=2)
def report_stage(parent_run_id: str, metrics: dict, model_dir: str, out_dir: str,
                 registered_model_name: Optional[str], example_question: str) -> dict:
    import mlflow
    import pandas as pd
    from mlflow.models import infer_signature
    from mlflow.tracking import MlflowClient

    from colar.tasks.stages import _metric_list

    logger = get_run_logger()
    client = MlflowClient()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    client.log_batch(parent_run_id, metrics=_metric_list(metrics))
    plot = accuracy_vs_length_plot(metrics, out / "accuracy_vs_length.png")
    client.log_artifact(parent_run_id, str(plot), "plots")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))

    example = pd.DataFrame({"question": [example_question]})
    output = pd.DataFrame({"answer": ["0"], "n_latents": [1], "text": ["Answer:0"]})
    signature = infer_signature(example, output, params={"compression_factor": 2, "seed": 0, "max_latents": 64,
                                                         "sample": False})
    with mlflow.start_run(run_id=parent_run_id, nested=False, log_system_metrics=False):
        info = mlflow.pyfunc.log_model(name="colar_model", python_model=str(PYFUNC_CODE),
                                       artifacts={"colar_model": model_dir}, signature=signature,
                                       registered_model_name=registered_model_name)
    result = {"model_uri": info.model_uri, "plot": str(plot)}
    if registered_model_name:
        version = info.registered_model_version
        client.set_registered_model_alias(registered_model_name, "candidate", str(version))
        result.update(registered_model=registered_model_name, version=str(version),
                      alias_uri=f"models:/{registered_model_name}@candidate")
    logger.info("model logged at %s%s", info.model_uri,
                f", registered as models:/{registered_model_name}@candidate" if registered_model_name else "")
    return result
