"""``colar compare``: pipeline runs side by side, from MLflow's search API."""

from __future__ import annotations

import re

import mlflow
import pandas as pd

from colar.tasks.plots import pyplot, save_figure

HIGHLIGHTS = {
    "params.model.name_or_path": "model",
    "params.sft_colar.objective.compression_factors": "trained_c",
    "params.sft_colar.max_steps": "colar_steps",
    "params.data.source": "data",
}


def compare_runs(experiment: str = "colar", plot_path: str | None = None) -> pd.DataFrame:
    """One row per parent (pipeline) run: config highlights, accuracy and #L per c, wall time."""
    runs = mlflow.search_runs(experiment_names=[experiment], output_format="pandas")
    if runs.empty:
        return runs
    if "tags.mlflow.parentRunId" in runs:
        runs = runs[runs["tags.mlflow.parentRunId"].isna()]
    runs = runs[runs["status"] == "FINISHED"]
    if runs.empty:
        return runs
    metric_cols = [c for c in runs.columns if re.match(r"metrics\.(accuracy|mean_latents|mean_tokens)/", c)]
    table = pd.DataFrame({
        "run_id": runs["run_id"].str[:8],
        "name": runs.get("tags.mlflow.runName"),
        **{short: runs.get(col) for col, short in HIGHLIGHTS.items() if col in runs},
        "wall_min": ((runs["end_time"] - runs["start_time"]).dt.total_seconds() / 60).round(1),
    })
    for col in sorted(metric_cols, key=_metric_order):
        table[col.removeprefix("metrics.")] = runs[col].round(3)
    if plot_path:
        _plot(runs, plot_path)
    return table.reset_index(drop=True)


def table_text(table: pd.DataFrame) -> str:
    """The table as text, every column shown."""
    with pd.option_context("display.max_columns", None, "display.width", 200):
        return table.to_string(index=False)


def _metric_order(col: str):
    m = re.search(r"/c(\d+)$", col)
    return (0 if m else 1, int(m.group(1)) if m else 0, col)


def _plot(runs: pd.DataFrame, path: str) -> None:
    fig, ax = pyplot().subplots(figsize=(6, 4))
    for _, run in runs.iterrows():
        cs = sorted(int(m.group(1)) for c in runs.columns if (m := re.match(r"metrics\.accuracy/c(\d+)$", c))
                    and pd.notna(run[c]))
        xs = [run[f"metrics.mean_latents/c{c}"] for c in cs]
        ys = [run[f"metrics.accuracy/c{c}"] for c in cs]
        if xs:
            ax.plot(xs, ys, marker="o", label=f"{run.get('tags.mlflow.runName', '')} {run['run_id'][:6]}")
    ax.set_xlabel("mean #latents")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7)
    save_figure(fig, path)
