"""Entry point one process of an RL stage runs: ``python -m colar_core.rl.rl_main --config job.json``.

Works alone (one process: DeepSpeed gets the single-process environment it needs) and under a
launcher, which starts one copy per process and sets RANK / WORLD_SIZE / LOCAL_RANK /
MASTER_ADDR / MASTER_PORT::

    torchrun --nproc_per_node 2 -m colar_core.rl.rl_main --config job.json
    deepspeed --num_gpus 8 --module colar_core.rl.rl_main --config job.json

The job file is an :class:`~colar_core.rl.trainer.RLJob` (JSON or YAML). The result is written to
``output_dir/result.json`` by rank 0 and printed as one JSON line.
"""

from __future__ import annotations

import sys

from colar_core.rl.trainer import RLJob, run_rl_job
from colar_core.training.launch import job_entry_main


def _run(path: str):
    return run_rl_job(RLJob.from_file(path))


def main(argv=None) -> int:
    return job_entry_main(argv, prog="python -m colar_core.rl.rl_main", description=__doc__.split("\n")[0], job_name="RLJob",
                          run_file=_run)


if __name__ == "__main__":
    sys.exit(main())
