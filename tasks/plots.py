"""The pipeline's plots (PNG files): training curves of a stage, accuracy against chain length.

matplotlib is imported on first use (:func:`pyplot`): the headless backend is a process-wide
setting that has to be chosen before ``matplotlib.pyplot`` is imported, so it is left until a plot
is drawn.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Union

__all__ = ["accuracy_vs_length_plot", "pyplot", "save_figure", "training_curves_plot"]


def pyplot():
    """``matplotlib.pyplot`` on the headless Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Union[str, os.PathLike]) -> Path:
    """Lay out, write (100 dpi) and close ``fig``; return ``path``."""
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    pyplot().close(fig)
    return Path(path)


def training_curves_plot(steps: list[dict], path: Path, title: str = "") -> Path:
    """Loss and its parts (``loss``, ``ce``, ``latent``; Distill's ``teacher_ce``, ``student_ce``, ``distill``) against the step, from metrics.jsonl step rows."""
    fig, ax = pyplot().subplots(figsize=(6, 4))
    for name in ("loss", "ce", "latent", "teacher_ce", "student_ce", "distill"):
        pts = [(r["step"], r[name]) for r in steps if name in r]
        if pts:
            ax.plot(*zip(*pts), label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.set_title(title)
    return save_figure(fig, path)


def accuracy_vs_length_plot(metrics: dict, path: Path, title: str = "") -> Path:
    """Accuracy against mean chain length, one panel per test set (and the average over sets): one
    point per compression factor (a line through them, the 95% interval as error bars), one marker
    per text baseline (CoT, No-CoT) and per other method."""
    from tasks.table1 import method_label, per_set_values, setting_order  # table1 imports this module

    sets, values = per_set_values(metrics)
    settings = sorted({st for (_, _, st) in values}, key=setting_order)
    fig, axes = pyplot().subplots(1, max(1, len(sets)), figsize=(4.2 * max(1, len(sets)), 4), squeeze=False)
    for ax, s in zip(axes[0], sets):
        def point(setting):
            acc = values.get(("accuracy", s, setting))
            length = values.get(("mean_latents", s, setting), values.get(("mean_tokens", s, setting)))
            return None if acc is None or length is None else (length, acc, values.get(("accuracy_ci95", s, setting), 0.0))

        latent = [(int(st[1:]), p) for st in settings if re.fullmatch(r"c\d+", st) and (p := point(st))]
        if latent:
            xs, ys, errs = zip(*(p for _, p in latent))
            ax.errorbar(xs, ys, yerr=errs, marker="o", label="CoLaR")
            for (c, (x, y, _)) in latent:
                ax.annotate(f"c={c}", (x, y), textcoords="offset points", xytext=(4, 4))
        markers = iter("sxD^v<>P*")
        for st in settings:
            if not re.fullmatch(r"c\d+", st) and (p := point(st)):
                ax.errorbar([p[0]], [p[1]], yerr=[p[2]], marker=next(markers, "o"), linestyle="none",
                            label=method_label(st), zorder=3)
        ax.set_xlabel("#L: latents / thoughts (CoLaR, Coconut, Distill) or tokens (CoT, iCoT)")
        ax.set_ylabel("accuracy")
        ax.set_ylim(0, 1.02)
        ax.set_title("average over sets" if s == "avg" else s)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)
