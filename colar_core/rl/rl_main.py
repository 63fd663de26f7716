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

import argparse
import json
import logging
import os
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m colar_core.rl.rl_main", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="RLJob file (JSON or YAML)")
    # the deepspeed launcher passes --local_rank; the environment carries the same value
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    logging.basicConfig(level=os.environ.get("COLAR_LOG_LEVEL", "WARNING"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from colar_core.rl.trainer import RLJob, run_rl_job

    job = RLJob.from_file(args.config)
    result = run_rl_job(job)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"result": result.to_dict()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
