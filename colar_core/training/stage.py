"""The skeleton every training stage shares (SFT, RL, and the baselines of colar_core.baselines).

A stage is a job file (a :class:`StageJob` with its method's config and :class:`StageData`) that
trains one model in ``output_dir`` and leaves there its config, ``metrics.jsonl``,
``checkpoints/``, ``best/``, the final ``model/`` and ``result.json`` (:data:`JOB_RESULT_FILE`: a
dataclass with :class:`JobResultMixin`, written by rank 0 when training ends). That file is the job's
own record: how a launcher that ran the job in other processes gets its result back
(:func:`~colar_core.training.launch.run_job`), and what a job run by hand leaves. (The pipeline's
record of the stage, ``stage_result.json`` beside it, is another file with another writer:
:mod:`tasks.stage_spec`.) Resume does not read it: it reads ``checkpoints/``.

A method builds its engine, batches and loss, then calls :func:`run_stage_loop`: validation with
best-k exports (:mod:`colar_core.training.validation`), the shared :func:`~colar_core.training.loop.train_loop` with
checkpoints and resume (the model's own state kept by :class:`ModelStateKeeper`), and the final
``model/`` (the best validated model or the last).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any, ClassVar, NamedTuple, Optional, Protocol, Sequence, TypeVar, Union

from pydantic import Field
from typing_extensions import Self

from colar_core.config import StrictModel
from colar_core.data import builtin_splits, load_split
from colar_core.files import atomic_write_json, atomic_write_text
from colar_core.model import ColarModel
from colar_core.text import PromptEncoder
from colar_core.training.callbacks import Callback, stage_callbacks
from colar_core.training.checkpoint import CheckpointManager, export_model, link_or_copy
from colar_core.training.config import TrainConfig
from colar_core.training.distributed import DistEnv, dist_env
from colar_core.training.engines import Engine
from colar_core.training.loop import (
    BatchSource,
    LoopPlan,
    LoopState,
    LossFn,
    Stateful,
    train_loop,
)
from colar_core.training.validation import stage_validation

METRICS_FILE = "metrics.jsonl"
MODEL_DIR = "model"
JOB_RESULT_FILE = "result.json"
_PATH_FIELDS = ("model_dir", "metrics_path", "best_model_dir", "output_dir")


# ----------------------------------------------------------------------------------------------
# The job file
# ----------------------------------------------------------------------------------------------
class StageData(StrictModel):
    """Where the stage's examples come from: split files written by ``colar_core.data.prepare_data``
    (JSONL, read with ``load_split``), or the built-in synthetic task when ``train`` is None."""

    train: Optional[str] = Field(None, description="train.jsonl from prepare_data; None = built-in problems.")
    val: Optional[str] = Field(None, description="val.jsonl from prepare_data (validation).")
    builtin_train: int = Field(2000, gt=0, description="Built-in task: training problems.")
    builtin_val: int = Field(200, ge=0, description="Built-in task: validation problems.")
    builtin_seed: int = Field(0, description="Built-in task: generator seed.")
    builtin_difficulty: Union[int, str] = Field("easy", description="Built-in task: easy / medium / hard or max steps.")

    def load(self) -> tuple[list, list]:
        """``(train records, validation records)``."""
        if self.train is None:
            splits = builtin_splits(self.builtin_train, self.builtin_val, 0, seed=self.builtin_seed,
                                    difficulty=self.builtin_difficulty)
            return splits["train"], splits["val"]
        return load_split(self.train), (load_split(self.val) if self.val else [])


class StageJob(StrictModel):
    """What every stage's job file has: the run directory. Read from JSON or YAML with :meth:`from_file`."""

    output_dir: str = Field(..., description="Run directory (checkpoints, metrics.jsonl, model/); reused = resumed.")

    @classmethod
    def from_file(cls, path) -> Self:
        text = Path(path).read_text()
        if str(path).endswith((".yaml", ".yml")):
            import yaml  # only YAML job files need it

            return cls.model_validate(yaml.safe_load(text))
        return cls.model_validate_json(text)


# ----------------------------------------------------------------------------------------------
# The result file
# ----------------------------------------------------------------------------------------------
class JobResultMixin:
    """JSON round trip (``output_dir/result.json``) for a job-result dataclass whose path fields
    are ``Path`` objects."""

    __dataclass_fields__: ClassVar[dict[str, Any]]  # the dataclass it is mixed into has them

    def to_dict(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict):
        return cls(**{k: (Path(v) if k in _PATH_FIELDS and v is not None else v) for k, v in d.items()
                      if k in cls.__dataclass_fields__})

    @classmethod
    def load(cls, output_dir):
        return cls.from_dict(json.loads((Path(output_dir) / JOB_RESULT_FILE).read_text()))

    def save(self, output_dir) -> Path:
        """Write ``output_dir/result.json`` atomically (the old file or the new, never half of one)."""
        path = Path(output_dir) / JOB_RESULT_FILE
        atomic_write_json(path, self.to_dict(), sort_keys=False)
        return path


R = TypeVar("R", bound=JobResultMixin)


# ----------------------------------------------------------------------------------------------
# Start, loop, finish
# ----------------------------------------------------------------------------------------------
def start_stage(out: Path, config_file: str, config: StrictModel, backend: str) -> DistEnv:
    """This process's place in the job (DeepSpeed's single-process defaults set for ``backend``
    'deepspeed'); rank 0 creates ``out`` and writes the stage's config to ``out/config_file``."""
    env = dist_env(set_defaults=backend == "deepspeed")
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / config_file, config.model_dump_json(indent=2))
    return env


def finish_stage(engine: Engine, result: R, out: Path) -> R:
    """Rank 0 writes ``out/result.json``; every process waits for it and gets ``result`` back."""
    if engine.is_main:
        result.save(out)
    engine.barrier()
    return result


class ModelStateKeeper:
    """Checkpoints ``model.state`` (embedding scale, trained factors): it is not in the weights."""

    def __init__(self, model: ColarModel):
        self.model = model

    def state_dict(self) -> dict:
        return {"json": json.dumps(asdict(self.model.state))}

    def load_state_dict(self, state: dict) -> None:
        for k, v in json.loads(state["json"]).items():
            if hasattr(self.model.state, k):
                setattr(self.model.state, k, v)


class StageBatches(BatchSource, Stateful, Protocol):
    """A stage's batch source: gives each step's batch, and its position is checkpointed."""


class StageRun(NamedTuple):
    """What :func:`run_stage_loop` leaves: the loop's final state and the exported models."""

    state: LoopState
    model_dir: Path  # out/model
    best_dir: Optional[Path]  # the best validated export, if any


def run_stage_loop(engine: Engine, batches: StageBatches, loss_fn: LossFn, cfg: TrainConfig, *, model: ColarModel,
                   encoder: PromptEncoder, tokenizer, val_records: Sequence, manager: CheckpointManager, out: Path,
                   callbacks: Sequence[Callback] = (), eval_mode: Optional[str] = None) -> StageRun:
    """The part of a training stage that every method shares: validation with best-k exports,
    :func:`~colar_core.training.loop.train_loop` with checkpoints and resume (reporting to
    :func:`~colar_core.training.callbacks.stage_callbacks`), then ``out/model`` (the best validated
    model or the last weights, per ``cfg.final_model``); the engine is closed (``Engine.close``) however the
    loop ends, so a later stage in this process does not start beside this one's optimizer. ``eval_mode``: how
    validation decodes (:func:`~colar_core.training.validation.make_evaluator`'s ``mode``)."""
    try:
        validation = None
        if cfg.eval_every and len(val_records):
            validation = stage_validation(engine, encoder, val_records, cfg, manager, tokenizer, eval_mode)
        plan = LoopPlan(max_steps=cfg.max_steps, checkpoint_every=cfg.checkpoint_every, eval_every=cfg.eval_every,
                        keep_best=cfg.keep_best, early_stopping_patience=cfg.early_stopping_patience,
                        log_every=cfg.log_every)
        cbs = stage_callbacks(out / METRICS_FILE, callbacks) if engine.is_main else []
        state = train_loop(engine, batches, loss_fn, plan, checkpoints=manager,
                           stateful={"data": batches, "model_state": ModelStateKeeper(model)},
                           validation=validation, callbacks=cbs)

        best_dir = Path(state.best[0]["path"]) if state.best and state.best[0].get("path") else None
        model_dir = out / MODEL_DIR
        if cfg.final_model == "best" and best_dir is not None and best_dir.is_dir():
            if engine.is_main:
                copy_dir_atomic(best_dir, model_dir)
            engine.barrier()
        else:
            export_model(engine, model_dir, tokenizer)
        return StageRun(state, model_dir, best_dir)
    finally:  # what the engine holds (optimizer state, DeepSpeed's hooks) goes, the run ended or failed
        engine.close()


def copy_dir_atomic(src: Path, dst: Path) -> None:
    """Replace ``dst`` with a copy of ``src`` (copied to a temp name first, then renamed), its files hard links
    where the file system allows: the best export and the stage's model are the same weights (2.5 GB each for
    the 1B recipes), written once and never changed in place."""
    tmp = dst.with_name(f".tmp-{dst.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, copy_function=link_or_copy)
    if dst.exists():
        shutil.rmtree(dst)
    tmp.rename(dst)
