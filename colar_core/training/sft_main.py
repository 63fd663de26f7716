"""Entry point one process of an SFT stage runs: ``python -m colar_core.training.sft_main --config job.json``.

Works alone (one process: DeepSpeed gets the single-process environment it needs) and under a
launcher, which starts one copy per process and sets RANK / WORLD_SIZE / LOCAL_RANK /
MASTER_ADDR / MASTER_PORT::

    torchrun --nproc_per_node 2 -m colar_core.training.sft_main --config job.json
    deepspeed --num_gpus 8 --module colar_core.training.sft_main --config job.json

The job file is an :class:`~colar_core.training.sft.SFTJob` (JSON or YAML). The result is written to
``output_dir/result.json`` by rank 0.
"""

from __future__ import annotations

import sys

from colar_core.training.launch import job_entry_main
from colar_core.training.sft import SFTJob, run_sft_job


def _run(path: str):
    return run_sft_job(SFTJob.from_file(path))


def main(argv=None) -> int:
    return job_entry_main(argv, prog="python -m colar_core.training.sft_main", description=__doc__.split("\n")[0], job_name="SFTJob",
                          run_file=_run)


if __name__ == "__main__":
    sys.exit(main())
