"""What ``colar retry`` reuses, and the record it reads: the pipeline run's stage journal.

Every pipeline run keeps a journal of its stages in ``<output_dir>/.colar-pipeline/<parent run>.json``
(a local file, written atomically, so it is there whether or not the tracking server answered): per
stage the key it ran under, the digest of its code, the digest of what it was asked to do apart from
its code (:func:`tasks.keys.spec_digest`), its folder, and whether it finished.

``colar run`` is strict: each stage runs under today's key (:mod:`tasks.keys`). ``colar retry RUN``
works like Metaflow's ``resume``: a :class:`RetryPlan` reuses, as it is, every stage that finished in
that pipeline run (its ``stage_result.json`` in the folder of the key it finished under), even where
its code or inputs changed since; from the first stage that did not finish on, stages run with
today's code (a stage whose today's key already holds a finished result still comes back Cached).
``--from STAGE`` reuses only the stages before STAGE, and runs STAGE and everything after it again
(Prefect's cache refreshed). The first stage that runs again resumes from the checkpoints of the
attempt that failed when only its code changed (same config section, same inputs): they are
carried into today's folder (:func:`colar_core.training.checkpoint.carry_checkpoints`) and, if
they do not load with today's code, the stage starts again from step 0 and says why. Where its
config section or inputs changed, it starts again and says that.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, ValidationError

from colar_core.files import atomic_write_json
from colar_core.training.checkpoint import CHECKPOINT_DIR, carry_checkpoints, complete_checkpoints
from tasks.keys import absolute_dir, stage_dir
from tasks.stage_spec import STAGE_RESULT_FILE, StageSpec

__all__ = ["JOURNAL_DIR", "Journal", "RetryPlan", "StageRecord", "journal_path"]

log = logging.getLogger(__name__)

JOURNAL_DIR = ".colar-pipeline"


class StageRecord(BaseModel):
    """One stage of a pipeline run, as its journal holds it."""

    model_config = ConfigDict(extra="forbid")

    key: str
    code: str  # StageCode digest
    spec: str  # spec_digest: the stage's name, config section, inputs and output folder
    folder: str
    status: Literal["started", "finished"]
    reused_from_code: Optional[str] = None  # set when a retry reused it: the code digest it was made with


class Journal(BaseModel):
    """A pipeline run's stages (:class:`StageRecord` by stage name, in the order they started)."""

    model_config = ConfigDict(extra="forbid")

    parent_run_id: str
    stages: dict[str, StageRecord] = {}


def journal_path(output_dir: str, parent_run_id: str) -> Path:
    return absolute_dir(output_dir) / JOURNAL_DIR / f"{parent_run_id}.json"


def read_journal(output_dir: str, parent_run_id: str) -> Journal:
    """The journal of ``parent_run_id`` (empty if it has none: a run made before journals existed);
    an unreadable one is a ``ValueError`` naming the file."""
    path = journal_path(output_dir, parent_run_id)
    if not path.is_file():
        return Journal(parent_run_id=parent_run_id)
    try:
        return Journal.model_validate_json(path.read_bytes())
    except ValidationError as err:
        raise ValueError(f"{path}: not a stage journal: {err}") from None


def write_journal(output_dir: str, journal: Journal) -> None:
    atomic_write_json(journal_path(output_dir, journal.parent_run_id), journal.model_dump(mode="json"))


class RetryPlan:
    """What a run of the flow reuses of its pipeline run's earlier attempts, and the journal it keeps.

    ``earlier``: the journal as the earlier attempts left it (empty for a new run). ``retry``: a
    ``colar retry`` (reuse finished stages); ``from_stage``: ``--from`` (re-run it and what follows).
    Stages are asked about in the order they run: reuse stops at the first stage that runs again."""

    def __init__(self, output_dir: str, parent_run_id: str, *, retry: bool = False, from_stage: Optional[str] = None):
        self.output_dir = output_dir
        self.earlier = read_journal(output_dir, parent_run_id) if retry else Journal(parent_run_id=parent_run_id)
        self.journal = Journal(parent_run_id=parent_run_id, stages=dict(self.earlier.stages))
        self.retry = retry
        self.from_stage = from_stage
        self.reusing = retry
        self.reused: dict[str, StageRecord] = {}

    # ---- asked by the flow, stage by stage -------------------------------------------------------
    def reusable(self, spec: StageSpec) -> Optional[Path]:
        """The folder whose finished result a retry reuses for ``spec`` (None: run it). A stage that
        finished earlier under today's key is not "reused" here: it comes back Cached by itself."""
        if self.reusing and spec.name == self.from_stage:
            self.reusing = False
        if not self.reusing:
            return None
        record = self.earlier.stages.get(spec.name)
        if record is None or record.status != "finished" or record.key == spec.key:
            self.reusing = record is not None and record.status == "finished"  # same key: Cached, go on
            return None
        folder = Path(record.folder)
        if not (folder / STAGE_RESULT_FILE).is_file():
            log.warning("stage %s finished in %s, which no longer holds its result: it runs again with today's code",
                        spec.name, folder)
            self.reusing = False
            return None
        return folder

    def ran(self, spec: StageSpec, state_name: str) -> None:
        """After ``spec`` ran through Prefect: reuse stops once a stage did not come back Cached."""
        if state_name != "Cached":
            self.reusing = False

    def forced(self, spec: StageSpec) -> bool:
        """Whether ``spec`` runs again whatever Prefect's cache holds (``--from``: it and what follows)."""
        return self.from_stage is not None and not self.reusing

    def carry_over(self, spec: StageSpec) -> Optional[str]:
        """Before ``spec`` runs again in a retry: give its folder the checkpoints of the attempt that
        failed in it, when only the code changed since. Returns what it did (for the log), or None."""
        record = self.earlier.stages.get(spec.name)
        if not self.retry or record is None or record.status != "started" or record.key == spec.key:
            return None
        old = Path(record.folder)
        if not complete_checkpoints(old / CHECKPOINT_DIR):
            return None
        if record.spec != spec.spec_digest:
            return (f"stage {spec.name} starts again: its config section or inputs changed since the attempt "
                    f"that failed in {old} (its checkpoints are left there)")
        carried = carry_checkpoints(old, spec.folder, f"retry: code changed ({record.code[:16]} -> "
                                    f"{spec.code_digest[:16]}), same config section and inputs")
        if not carried:
            return None
        return (f"stage {spec.name}: only its code changed since the attempt that failed in {old}: it resumes "
                f"from that attempt's checkpoints ({', '.join(p.name for p in carried)}), if they load")

    # ---- the journal -----------------------------------------------------------------------------
    def started(self, spec: StageSpec) -> None:
        self._record(spec, "started")

    def finished(self, spec: StageSpec) -> None:
        self._record(spec, "finished")

    def reuse(self, spec: StageSpec, folder: Path) -> StageRecord:
        """Record that ``spec`` reuses the result in ``folder``; returns the earlier record."""
        record = self.earlier.stages[spec.name]
        self.reused[spec.name] = record
        self.journal.stages[spec.name] = record.model_copy(update={"reused_from_code": record.code})
        write_journal(self.output_dir, self.journal)
        return record

    def _record(self, spec: StageSpec, status: Literal["started", "finished"]) -> None:
        self.journal.stages[spec.name] = StageRecord(key=spec.key, code=spec.code_digest, spec=spec.spec_digest,
                                                     folder=str(stage_dir(spec.output_dir, spec.name, spec.key)),
                                                     status=status)
        write_journal(self.output_dir, self.journal)
