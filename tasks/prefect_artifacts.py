"""What a pipeline run shows in the Prefect UI (flow run -> Artifacts tab, and the Artifacts page).

- ``colar-evaluation``: a table artifact, one row per test set and method (accuracy, its 95 %
  interval, mean chain length, ms per question), made by the ``evaluate`` stage;
- ``colar-table1``: the Table-1 report (``table1.md`` of the report stage) as markdown;
- ``colar-thoughts``: a few test questions read step by step (each latent chain's nearest tokens beside
  the CoT text; ``thoughts.html`` of the evaluate stage's MLflow run is the full page), as markdown;
- ``colar-links``: markdown linking the MLflow parent run, its stage runs and the registered model
  version in the MLflow UI;
- ``colar-progress-<stage>``: a progress artifact per training stage, updated while it trains
  (:class:`TrainingProgress`, a training callback; ``colar_core`` knows nothing of Prefect).

Every call is best effort: an artifact that cannot be written is a warning in the task's log, never
a failed stage. Links never carry credentials (:func:`~colar_infra.secrets.mask_url`).
"""

from __future__ import annotations

import logging
import math
import re
import time
import urllib.parse
from collections.abc import Mapping
from typing import Any, Callable, Optional, cast
from uuid import UUID

from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from colar_infra.secrets import mask_url
from tasks.table1 import AVERAGE, method_label, per_set_values, setting_order

__all__ = [
    "EVALUATION_KEY",
    "LINKS_KEY",
    "TABLE1_KEY",
    "THOUGHTS_KEY",
    "TrainingProgress",
    "evaluation_rows",
    "evaluation_table_artifact",
    "links_markdown",
    "links_artifact",
    "mlflow_model_version_url",
    "mlflow_run_url",
    "mlflow_ui_base",
    "progress_key",
    "table1_artifact",
    "thoughts_artifact",
]

EVALUATION_KEY = "colar-evaluation"
TABLE1_KEY = "colar-table1"
LINKS_KEY = "colar-links"
THOUGHTS_KEY = "colar-thoughts"

_log = logging.getLogger(__name__)


def _warn(what: str, err: BaseException) -> None:
    """A warning in the task run's log (this module's log outside a run)."""
    message = f"Prefect artifact {what} not written: {err!r}"
    try:
        from prefect import get_run_logger

        get_run_logger().warning(message)
    except Exception:  # noqa: BLE001 - no run context
        _log.warning(message)


def _best_effort(what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except Exception as err:  # noqa: BLE001 - an artifact never fails a stage
        _warn(what, err)
        return None


# ---- MLflow UI links ---------------------------------------------------------------------------


def mlflow_ui_base(tracking_uri: str) -> Optional[str]:
    """The MLflow UI's base URL for an http(s) tracking URI (credentials masked), else None."""
    if not str(tracking_uri).startswith(("http://", "https://")):
        return None
    return mask_url(str(tracking_uri)).rstrip("/")


def mlflow_run_url(base: str, experiment_id: str, run_id: str) -> str:
    """MLflow 3's run page: ``<base>/#/experiments/<experiment>/runs/<run>``."""
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"


def mlflow_model_version_url(base: str, name: str, version: str) -> str:
    """MLflow 3's registered model version page: ``<base>/#/models/<name>/versions/<version>``."""
    return f"{base}/#/models/{urllib.parse.quote(name, safe='')}/versions/{version}"


# ---- evaluation table and Table 1 ---------------------------------------------------------------


def _number(x: Optional[float], scale: float = 1.0, digits: int = 1) -> Optional[float]:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(scale * x, digits)


def evaluation_rows(metrics: Mapping[str, float]) -> list[dict[str, Any]]:
    """One row per (test set, method) of the evaluation metrics, in Table 1's order (the average over
    sets last): ``set``, ``method``, ``accuracy_pct``, ``ci95_pct``, ``mean_length`` (#latents for
    CoLaR, #reasoning tokens for CoT), ``ms_per_question``."""
    sets, values = per_set_values(metrics)
    settings = sorted({st for (_, _, st) in values}, key=setting_order)
    rows = []
    for s in sets:
        for st in settings:
            if ("accuracy", s, st) not in values:
                continue
            length = values.get(("mean_latents", s, st), values.get(("mean_tokens", s, st)))
            rows.append({
                "set": "average" if s == AVERAGE else s,
                "method": method_label(st),
                "accuracy_pct": _number(values.get(("accuracy", s, st)), 100),
                "ci95_pct": _number(values.get(("accuracy_ci95", s, st)), 100),
                "mean_length": _number(length, 1, 2),
                "ms_per_question": _number(values.get(("sec_per_question", s, st)), 1000),
            })
    return rows


def evaluation_table_artifact(metrics: Mapping[str, float], description: str = "") -> Optional[UUID]:
    """The evaluation results as the table artifact ``colar-evaluation`` (None if not written)."""
    rows = evaluation_rows(metrics)
    if not rows:
        return None
    text = ("Evaluation: accuracy (%) with its 95 % interval, mean chain length (#latents for CoLaR, "
            "#thoughts for Coconut and Distill, #reasoning tokens for CoT and iCoT) and decoding time per "
            "question, per test set and method.")
    return _best_effort("colar-evaluation", create_table_artifact, rows, key=EVALUATION_KEY,
                        description=(description + "\n\n" + text).strip())


def table1_artifact(markdown: str, description: str = "") -> Optional[UUID]:
    """The Table-1 report (markdown) as the artifact ``colar-table1``."""
    return _best_effort("colar-table1", create_markdown_artifact, markdown, key=TABLE1_KEY,
                        description=description or "Table 1 of this run (table1.md on the MLflow parent run)")


def thoughts_artifact(markdown: str, description: str = "") -> Optional[UUID]:
    """A few questions' latent chains and CoT text (markdown: colar_core.latent_inspect.render_markdown)
    as the artifact ``colar-thoughts``."""
    return _best_effort("colar-thoughts", create_markdown_artifact, markdown, key=THOUGHTS_KEY,
                        description=description or "Latent thoughts (thoughts.html on the MLflow evaluate run)")


def links_markdown(*, tracking_uri: str, experiment_id: str, parent_run_id: str, pipeline: str = "",
                   children: Optional[Mapping[str, str]] = None, registered_model: Optional[str] = None,
                   version: Optional[str] = None, model_uri: Optional[str] = None, promoted: bool = True) -> str:
    """Markdown linking the MLflow parent run, its stage runs (``{stage: run_id}``) and the registered
    model version in the MLflow UI (plain ids when the tracking store is not an HTTP server)."""
    base = mlflow_ui_base(tracking_uri)

    def run_link(label: str, run_id: str) -> str:
        return f"[{label}]({mlflow_run_url(base, experiment_id, run_id)})" if base else f"{label} (`{run_id}`)"

    lines = ["### MLflow", "",
             f"- Parent run: {run_link(pipeline or parent_run_id, parent_run_id)} (run id `{parent_run_id}`, "
             f"experiment {experiment_id})"]
    if children:
        lines.append("- Stage runs: " + ", ".join(run_link(stage, rid) for stage, rid in children.items()))
    if registered_model and version:
        label = f"{registered_model} version {version}"
        page = f"[{label}]({mlflow_model_version_url(base, registered_model, version)})" if base else label
        lines.append(f"- Registered model: {page}, alias `models:/{registered_model}@candidate`" if promoted else
                     f"- Registered model: {page} (the alias `candidate` stayed on an earlier version: see the "
                     "promotion artifact)")
    elif model_uri:
        lines.append(f"- Logged model: `{model_uri}` (not registered)")
    if base:
        lines.append(f"- Tracking server: {base}")
    return "\n".join(lines) + "\n"


def links_artifact(markdown: str) -> Optional[UUID]:
    """The links (:func:`links_markdown`) as the markdown artifact ``colar-links``."""
    return _best_effort("colar-links", create_markdown_artifact, markdown, key=LINKS_KEY,
                        description="Where this run's results are in MLflow")


# ---- training progress ------------------------------------------------------------------------


def progress_key(stage: str) -> str:
    """``colar-progress-<stage>`` (artifact keys: lowercase letters, digits and dashes)."""
    return "colar-progress-" + (re.sub(r"[^a-z0-9-]+", "-", stage.lower()).strip("-") or "stage")


class TrainingProgress:
    """A training callback that keeps a Prefect progress artifact at ``100 * step / max_steps``.

    Made in the stage's task (the artifact belongs to its task run and flow run); created at
    ``on_train_start`` (a resumed run starts where it resumed), updated from ``on_step`` at most
    every ``min_interval_s`` seconds (and at the last step), finished at ``on_train_end``. A call
    that fails turns it off for the rest of the run, with one warning: the progress bar never
    slows training down more than once. :meth:`done` marks a stage that trained elsewhere (a
    launched multi-process job, whose callbacks run in its own processes) or ended early.
    """

    def __init__(self, stage: str, *, min_interval_s: float = 2.0, clock: Callable[[], float] = time.monotonic):
        self.stage = stage
        self.key = progress_key(stage)
        self.min_interval_s = min_interval_s
        self.clock = clock
        self.artifact_id: Optional[UUID] = None
        self.max_steps: Optional[int] = None
        self.progress: Optional[float] = None  # last value sent
        self.failed = False
        self._last_sent = -math.inf

    def _percent(self, step: int) -> float:
        if not self.max_steps:
            return 0.0
        return round(min(100.0, max(0.0, 100.0 * step / self.max_steps)), 1)

    def _description(self, step: int) -> str:
        return f"Training progress of stage {self.stage}: step {step} of {self.max_steps or '?'}"

    def _create(self, step: int) -> None:
        if self.failed:
            return
        value = self._percent(step)
        try:
            # Prefect's sync/async wrapper types this as a UUID or a coroutine; called from sync code it is the UUID
            self.artifact_id = cast(UUID, create_progress_artifact(progress=value, key=self.key,
                                                                   description=self._description(step)))
            self.progress, self._last_sent = value, self.clock()
        except Exception as err:  # noqa: BLE001
            self.failed = True
            _warn(self.key, err)

    def _update(self, step: int, force: bool = False) -> None:
        if self.failed or self.artifact_id is None:
            return
        value = self._percent(step)
        now = self.clock()
        if value == self.progress or (not force and now - self._last_sent < self.min_interval_s):
            return
        try:
            update_progress_artifact(self.artifact_id, progress=value, description=self._description(step))
            self.progress, self._last_sent = value, now
        except Exception as err:  # noqa: BLE001
            self.failed = True
            _warn(self.key, err)

    # ---- callback API ------------------------------------------------------------------------

    def on_train_start(self, info: dict) -> None:
        self.max_steps = info.get("max_steps") or self.max_steps
        self._create(int(info.get("step") or 0))

    def on_step(self, step: int, metrics: dict) -> None:
        self._update(step, force=step == self.max_steps)

    def on_eval(self, step: int, metrics: dict) -> None:
        pass

    def on_checkpoint(self, step: int, path) -> None:
        pass

    def on_train_end(self, info: dict) -> None:
        step = info.get("step")
        if step is not None:
            self._update(int(step), force=True)

    def done(self, final_step: Optional[int], max_steps: Optional[int] = None) -> None:
        """After the stage's training: the artifact at ``final_step`` (created now if the callbacks
        never ran in this process)."""
        self.max_steps = self.max_steps or max_steps
        if final_step is None:
            return
        if self.artifact_id is None:
            self._create(int(final_step))
        else:
            self._update(int(final_step), force=True)
