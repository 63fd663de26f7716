"""The pipeline's plots (PNG files): training curves of a stage, accuracy against chain length.

matplotlib is imported on first use (:func:`pyplot`): the headless backend is a process-wide
setting that has to be chosen before ``matplotlib.pyplot`` is imported, so it is left until a plot
is drawn.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

__all__ = ["accuracy_vs_length_plot", "pyplot", "save_figure", "training_curves_plot"]


def pyplot():
    """``matplotlib.pyplot`` on the headless Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path) -> Path:
    """Lay out, write (100 dpi) and close ``fig``; return ``path``."""
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    pyplot().close(fig)
    return path


def training_curves_plot(steps: list[dict], path: Path, title: str = "") -> Path:
    """Loss and its parts (``loss``, ``ce``, ``latent``) against the step, from metrics.jsonl step rows."""
    fig, ax = pyplot().subplots(figsize=(6, 4))
    for name in ("loss", "ce", "latent"):
        pts = [(r["step"], r[name]) for r in steps if name in r]
        if pts:
            ax.plot(*zip(*pts), label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.set_title(title)
    return save_figure(fig, path)


def accuracy_vs_length_plot(metrics: dict, path: Path, title: str = "") -> Path:
    """Accuracy against mean chain length: one point per compression factor, plus the baselines."""
    fig, ax = pyplot().subplots(figsize=(6, 4))
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
    return save_figure(fig, path)
