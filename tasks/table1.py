"""The paper's Table 1 from a run's metrics: one row per method (No-CoT, CoT, the baselines iCoT,
Coconut and Distill when they ran, CoLaR at each compression factor), per test set the accuracy with
its 95% interval and the mean chain length #L (latents for CoLaR, continuous thoughts for Coconut and
Distill, reasoning tokens for CoT and iCoT), the decoding time per question, and the average over
the sets when there are several.

Reads the metric names :mod:`colar_core.evaluation` defines (``accuracy/{set}/{setting}``,
``accuracy_ci95/...``, ``mean_latents/...``, ``mean_tokens/...``, ``sec_per_question/...``). A run
from before named sets (only ``accuracy/c1``...) gives one set, named ``test``.

A run evaluated under the reference's protocol too (``eval.protocol: both``) has a second row for
CoT and each baseline, right below colar's, labelled ``... (reference eval)``: the setting
``{setting}-reference`` (the baselines decoded, and #L counted, as the reference's evaluation does).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Mapping, Optional

import pandas as pd

from colar_core.evaluation import REFERENCE_SUFFIX
from tasks.plots import pyplot, save_figure

__all__ = ["table1", "table1_markdown", "table1_png", "method_label", "per_set_values", "setting_order"]

_KEY = re.compile(r"(?P<metric>accuracy|accuracy_ci95|mean_latents|mean_tokens|sec_per_question)"
                  r"/(?:(?P<set>[^/]+)/)?(?P<setting>[^/]+)")
#: Row order and labels of the text baselines; latent settings ``c{c}`` follow, by c.
_TEXT_METHODS = {"nocot": "No-CoT", "cot": "CoT"}
#: The latent-reasoning baselines (colar_core.baselines), between the text baselines and CoLaR.
_BASELINES = {"icot": "iCoT", "coconut": "Coconut", "distill": "Distill"}
AVERAGE = "avg"
#: The row label's mark of a setting evaluated under the reference's protocol (``{setting}-reference``).
_REFERENCE_LABEL = " (reference eval)"


def method_label(setting: str) -> str:
    """The row label of a setting: ``nocot`` -> No-CoT, ``cot`` -> CoT, ``icot`` -> iCoT, ``c2`` -> CoLaR-2,
    ``icot-reference`` -> iCoT (reference eval)."""
    if setting.endswith(REFERENCE_SUFFIX):
        return method_label(setting[: -len(REFERENCE_SUFFIX)]) + _REFERENCE_LABEL
    if setting in _TEXT_METHODS:
        return _TEXT_METHODS[setting]
    if setting in _BASELINES:
        return _BASELINES[setting]
    m = re.fullmatch(r"c(\d+)", setting)
    return f"CoLaR-{m.group(1)}" if m else setting


def setting_order(setting: str):
    """Sort key of a setting's row: text baselines, latent baselines, CoLaR by c; a reference-protocol
    row right after its colar-protocol one."""
    if setting.endswith(REFERENCE_SUFFIX):
        group, index, _ = setting_order(setting[: -len(REFERENCE_SUFFIX)])
        return (group, index, REFERENCE_SUFFIX)
    if setting in _TEXT_METHODS:
        return (0, list(_TEXT_METHODS).index(setting), "")
    if setting in _BASELINES:
        return (1, list(_BASELINES).index(setting), "")
    m = re.fullmatch(r"c(\d+)", setting)
    return (2, int(m.group(1)), "") if m else (1, len(_BASELINES), setting)


def per_set_values(metrics: Mapping[str, float]) -> tuple[list[str], dict[tuple[str, str, str], float]]:
    """(set names in first-seen order, avg last; {(metric, set, setting): value}). Unprefixed keys
    count only when no key names a set (a run from before named sets)."""
    named, plain = {}, {}
    for key, value in metrics.items():
        m = _KEY.fullmatch(key)
        if m is None or value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        if m["set"] is None:
            plain[(m["metric"], "test", m["setting"])] = float(value)
        else:
            named[(m["metric"], m["set"], m["setting"])] = float(value)
    values = named or plain
    sets = list(dict.fromkeys(s for (_, s, _) in values if s != AVERAGE))
    if any(s == AVERAGE for (_, s, _) in values):
        sets.append(AVERAGE)
    return sets, values


def table1(metrics: Mapping[str, float]) -> pd.DataFrame:
    """The table as a DataFrame: index the method labels, columns ``{set} Acc (%)``, ``{set} #L``,
    ``{set} ms/q`` per set (``Average ...`` last; its interval is not shown, see
    :func:`colar_core.evaluation.average_over_sets`). Cells are text; a method not evaluated on a set
    shows ``-``."""
    sets, values = per_set_values(metrics)
    settings = sorted({st for (_, _, st) in values}, key=setting_order)
    rows = {}
    for setting in settings:
        row = {}
        for s in sets:
            label = "Average" if s == AVERAGE else s
            acc = values.get(("accuracy", s, setting))
            ci = values.get(("accuracy_ci95", s, setting))
            length = values.get(("mean_latents", s, setting), values.get(("mean_tokens", s, setting)))
            sec = values.get(("sec_per_question", s, setting))
            row[f"{label} Acc (%)"] = "-" if acc is None else (
                f"{100 * acc:.1f}" + (f" ± {100 * ci:.1f}" if ci is not None else ""))
            row[f"{label} #L"] = "-" if length is None else f"{length:.1f}"
            row[f"{label} ms/q"] = "-" if sec is None else f"{1000 * sec:.1f}"
        rows[method_label(setting)] = row
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "method"
    return table


def table1_markdown(table: pd.DataFrame, title: Optional[str] = None) -> str:
    """The table as a GitHub-flavoured markdown table (no extra dependency)."""
    header = [table.index.name or "", *table.columns]
    lines = [f"### {title}", ""] if title else []
    lines.append("| " + " | ".join(header) + " |")
    lines.append("| " + " | ".join(["---"] + ["---:"] * len(table.columns)) + " |")
    for label, row in table.iterrows():
        lines.append("| " + " | ".join([str(label), *map(str, row.tolist())]) + " |")
    return "\n".join(lines) + "\n"


def table1_png(table: pd.DataFrame, path: Path, title: str = "") -> Path:
    """The table drawn as an image (matplotlib's table), for the MLflow UI's artifact viewer."""
    n_rows, n_cols = table.shape
    fig, ax = pyplot().subplots(figsize=(min(2.0 + 1.15 * n_cols, 40), 0.9 + 0.38 * (n_rows + 1)))
    ax.axis("off")
    drawn = ax.table(cellText=table.values.tolist(), rowLabels=list(table.index), colLabels=list(table.columns),
                     loc="center", cellLoc="center")
    drawn.auto_set_font_size(False)
    drawn.set_fontsize(8)
    drawn.scale(1.0, 1.3)
    if title:
        ax.set_title(title, fontsize=9)
    return save_figure(fig, path)
