"""How the RL length bonus and the loss aggregation move accuracy and chain length, over RL seeds (CPU).

The start and the measurement are those of ``bench/tiny_rl.py`` (which tests/test_rl_training.py tests): a tiny
Llama after 100 CoLaR-SFT steps on the four problems of ``bench/tiny.py``; sampled accuracy and mean #L at c=2 over
64 samples per problem at two seeds; 60 RL steps of 4 questions x 8 rollouts at lr 1e-3.
``--aggregation`` picks ``RLConfig.loss_aggregation`` (default: the RLConfig default, ``part_mean``).

    python -m bench.rl_length_bonus --weight 2 --seeds 0,1,2
    python -m bench.rl_length_bonus --weight 0 --seeds 0,1,2          # plain GRPO (correctness only)
    python -m bench.rl_length_bonus --weight 0 --aggregation sum_div32  # the reference's shipped setting
    python -m bench.rl_length_bonus --weight 1 --continue-actions

The result is printed and written to ``bench/results/rl_length_bonus_<aggregation>_w<weight>.json``
(``_cont`` with --continue-actions; ``--out`` overrides) with the command, versions and device.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Sequence

from colar_core.rl.grpo import AGGREGATIONS


def main(argv: Optional[Sequence[str]] = None) -> list:
    p = argparse.ArgumentParser(prog="python -m bench.rl_length_bonus", description=__doc__.split("\n\n")[0])
    p.add_argument("--weight", type=float, default=2.0, help="weight of the linear length bonus (0 = plain GRPO)")
    p.add_argument("--continue-actions", action="store_true", help="also score the 'go on' decisions")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated RL seeds")
    p.add_argument("--aggregation", choices=AGGREGATIONS, default=None,
                   help="RLConfig.loss_aggregation (default: RLConfig's default)")
    p.add_argument("--out", help="result JSON (default bench/results/rl_length_bonus_<aggregation>_w<weight>.json)")
    args = p.parse_args(argv)

    import time

    import torch

    from bench.common import RESULTS_DIR, command_line, device_info, utc_now, versions, write_json
    from bench.tiny_rl import rl_cfg, run_rl, sampled_accuracy, sft_start
    from colar_core.rl.config import RLConfig

    aggregation = args.aggregation or RLConfig().loss_aggregation
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="rl-length-"))
    rows = []
    try:
        start = sft_start(root / "sft-start")
        acc0, len0 = sampled_accuracy(start)
        print(f"start: accuracy {acc0:.3f}, mean #L {len0:.2f}", flush=True)
        rewards = {"correct": 1.0, "length": args.weight} if args.weight else {"correct": 1.0}
        for seed in [int(x) for x in args.seeds.split(",") if x.strip()]:
            cfg = rl_cfg(rewards=rewards, seed=seed, loss_aggregation=aggregation,
                         continue_actions=args.continue_actions)
            result = run_rl(start, root / f"rl-{seed}", cfg)
            acc, length = sampled_accuracy(result.model_dir)
            rows.append({"seed": seed, "accuracy": acc, "mean_latents": length})
            print(f"seed {seed}: accuracy {acc:.3f}, mean #L {length:.2f}", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)  # the models (about 11 MB a run) are not needed afterwards
    report = {"weight": args.weight, "aggregation": aggregation, "continue_actions": args.continue_actions,
              "start": {"accuracy": acc0, "mean_latents": len0}, "runs": rows}
    print(json.dumps(report))
    weight = f"{args.weight:g}".replace(".", "p")
    out = Path(args.out) if args.out else RESULTS_DIR / (
        f"rl_length_bonus_{aggregation}_w{weight}{'_cont' if args.continue_actions else ''}.json")
    write_json(out, {**report, "command": command_line("bench.rl_length_bonus", argv), "date": utc_now(),
                     "wall_s": round(time.perf_counter() - t0, 1), "versions": versions(),
                     "device": device_info(torch.device("cpu"))})
    print(f"[rl_length_bonus] wrote {out}", flush=True)
    return rows


if __name__ == "__main__":
    main()
