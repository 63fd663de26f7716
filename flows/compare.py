"""``colar compare``: pipeline runs side by side, from MLflow's search API: one row per run
(:func:`compare_runs`), or each run's Table 1 (:func:`table1_by_run`, ``colar compare --table``)."""

from __future__ import annotations

import re

import mlflow
import pandas as pd

from tasks.plots import pyplot, save_figure
from tasks.table1 import method_label, per_set_values, setting_order, table1

HIGHLIGHTS = {
    "params.model.name_or_path": "model",
    "params.sft_colar.objective.compression_factors": "trained_c",
    "params.sft_colar.max_steps": "colar_steps",
    "params.data.source": "data",
}


def finished_parent_runs(experiment: str = "colar") -> pd.DataFrame:
    """The experiment's FINISHED pipeline (parent) runs, newest first, as MLflow's search gives them."""
    runs = mlflow.search_runs(experiment_names=[experiment], output_format="pandas")
    if runs.empty:
        return runs
    if "tags.mlflow.parentRunId" in runs:
        runs = runs[runs["tags.mlflow.parentRunId"].isna()]
    return runs[runs["status"] == "FINISHED"]


def compare_runs(experiment: str = "colar", plot_path: str | None = None) -> pd.DataFrame:
    """One row per parent (pipeline) run: config highlights, accuracy and #L per c, wall time."""
    runs = finished_parent_runs(experiment)
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


def _run_metrics(run: pd.Series) -> dict:
    """A search-result row's metrics, without the ``metrics.`` prefix and without missing values."""
    return {c.removeprefix("metrics."): run[c] for c in run.index if c.startswith("metrics.") and pd.notna(run[c])}


def table1_by_run(experiment: str = "colar") -> list[tuple[str, pd.DataFrame]]:
    """``(title, Table 1)`` of each finished pipeline run, newest first (:func:`tasks.table1.table1`
    over the run's metrics)."""
    out = []
    for _, run in finished_parent_runs(experiment).iterrows():
        table = table1(_run_metrics(run))
        if not table.empty:
            out.append((f"{run.get('tags.mlflow.runName', '')} ({run['run_id']})", table))
    return out


def _plot(runs: pd.DataFrame, path: str) -> None:
    """Accuracy against #L of the CoLaR factors, a line per run, a panel per test set; every other
    method a run evaluated (CoT, No-CoT, iCoT, Coconut, Distill) a marker of its own, in the run's colour."""
    per_run = []
    for _, run in runs.iterrows():
        per_run.append((f"{run.get('tags.mlflow.runName', '')} {run['run_id'][:6]}", *per_set_values(_run_metrics(run))))
    sets = list(dict.fromkeys(s for _, run_sets, _ in per_run for s in run_sets)) or ["test"]
    fig, axes = pyplot().subplots(1, len(sets), figsize=(4.2 * len(sets), 4), squeeze=False)
    for ax, s in zip(axes[0], sets):
        for label, _, values in per_run:
            cs = sorted(int(st[1:]) for (metric, set_name, st) in values
                        if metric == "accuracy" and set_name == s and re.fullmatch(r"c\d+", st)
                        and ("mean_latents", s, st) in values)
            color = None
            if cs:
                line, = ax.plot([values[("mean_latents", s, f"c{c}")] for c in cs],
                                [values[("accuracy", s, f"c{c}")] for c in cs], marker="o", label=label)
                color = line.get_color()
            markers = iter("sxD^v<>P*")
            for st in sorted({st for (metric, set_name, st) in values if metric == "accuracy" and set_name == s
                              and not re.fullmatch(r"c\d+", st)}, key=setting_order):
                length = values.get(("mean_latents", s, st), values.get(("mean_tokens", s, st)))
                if length is not None:
                    dot = ax.plot([length], [values[("accuracy", s, st)]], marker=next(markers, "o"), linestyle="none",
                                  color=color, label=f"{label} {method_label(st)}")[0]
                    color = color or dot.get_color()
        ax.set_xlabel("#L: latents / thoughts (CoLaR, Coconut, Distill) or tokens (CoT, iCoT)")
        ax.set_ylabel("accuracy")
        ax.set_ylim(0, 1.02)
        ax.set_title("average over sets" if s == "avg" else s)
        ax.legend(fontsize=7)
    save_figure(fig, path)
