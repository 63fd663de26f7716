"""How the RL length bonus moves accuracy and chain length, over RL seeds (CPU, about 30 s a run).

The start and the measurement are those of ``tests/test_rl_training.py``: a tiny Llama after 100
CoLaR-SFT steps on the four problems of ``tests/tiny.py``; sampled accuracy and mean #L at c=2 over
64 samples per problem at two seeds; 60 RL steps of 4 questions x 8 rollouts at lr 1e-3.

    python -m bench.rl_length_bonus --weight 2 --seeds 0,1,2
    python -m bench.rl_length_bonus --weight 0 --seeds 0,1,2          # plain GRPO (correctness only)
    python -m bench.rl_length_bonus --weight 1 --continue-actions
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> list:
    p = argparse.ArgumentParser(prog="python -m bench.rl_length_bonus", description=__doc__.split("\n\n")[0])
    p.add_argument("--weight", type=float, default=2.0, help="weight of the linear length bonus (0 = plain GRPO)")
    p.add_argument("--continue-actions", action="store_true", help="also score the 'go on' decisions")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated RL seeds")
    args = p.parse_args(argv)

    import torch

    from tests.test_rl_training import rl_cfg, run, sampled_accuracy, sft_start

    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="rl-length-"))
    start = sft_start(root / "sft-start")
    acc0, len0 = sampled_accuracy(start)
    print(f"start: accuracy {acc0:.3f}, mean #L {len0:.2f}", flush=True)
    rewards = {"correct": 1.0, "length": args.weight} if args.weight else {"correct": 1.0}
    rows = []
    for seed in [int(x) for x in args.seeds.split(",") if x.strip()]:
        result = run(start, root / f"rl-{seed}", rl_cfg(rewards=rewards, seed=seed,
                                                        continue_actions=args.continue_actions))
        acc, length = sampled_accuracy(result.model_dir)
        rows.append({"seed": seed, "accuracy": acc, "mean_latents": length})
        print(f"seed {seed}: accuracy {acc:.3f}, mean #L {length:.2f}", flush=True)
    print(json.dumps({"weight": args.weight, "continue_actions": args.continue_actions,
                      "start": {"accuracy": acc0, "mean_latents": len0}, "runs": rows}))
    return rows


if __name__ == "__main__":
    main()
