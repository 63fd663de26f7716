"""Entry point one process of a baseline stage runs:
``python -m colar_core.baselines.baseline_main --config job.json`` (alone, or under ``torchrun`` /
``deepspeed`` as :mod:`colar_core.training.sft_main`). The job file is a
:class:`~colar_core.baselines.stage.BaselineJob`; rank 0 writes ``output_dir/result.json``."""

from __future__ import annotations

import sys

from colar_core.baselines.stage import BaselineJob, run_baseline_job
from colar_core.training.launch import job_entry_main


def _run(path: str):
    return run_baseline_job(BaselineJob.from_file(path))


def main(argv=None) -> int:
    return job_entry_main(argv, prog="python -m colar_core.baselines.baseline_main",
                          description="Run one baseline stage (iCoT, Coconut, Distill) from a job file.",
                          job_name="BaselineJob", run_file=_run)


if __name__ == "__main__":
    sys.exit(main())
