"""Padding in CoLaR SFT batches, per compression factor, for three layouts (CPU only, no model):

* ``three-block``: the width the backbone had before packing (prompt, groups and answer each padded
  to the batch maximum: Lp + G + La),
* ``packed``: what ``collate`` feeds the backbone now (each row's real positions first; width =
  longest row),
* ``packed+grouped``: the same with ``TrainConfig.length_grouping`` (pools of k micro-batches sorted
  by length).

Data: the SFT throughput benchmark's synthetic examples (question ~100, steps ~120, answer ~10
tokens, each length uniform in +-20 %).

    python -m bench.padding            # 4,096 examples, micro-batch 32, pools of 64
"""

from __future__ import annotations

import argparse
import json
from typing import Optional, Sequence


def padding_table(n: int, micro: int, pool: int, seed: int, spread: float) -> dict:
    import torch

    from bench.sft_throughput import bench_encoder, synthetic_examples
    from colar_core.collate import collate
    from colar_core.training.sft import example_length, group_by_length

    encoder = bench_encoder()
    examples = synthetic_examples(n, encoder, 128256, 100, 120, 10, spread, seed)
    orders = {"random": list(range(n)),
              "grouped": group_by_length(list(range(n)), [example_length(e, 3) for e in examples], micro, pool,
                                         torch.Generator().manual_seed(seed))}
    table: dict = {"three-block": {}, "packed": {}, "packed+grouped": {}}
    for r in range(1, 6):
        slots = {k: 0 for k in table}
        real = 0
        for name, order in orders.items():
            for lo in range(0, n - n % micro, micro):
                b = collate([examples[i] for i in order[lo: lo + micro]], encoder, r)
                if name == "random":
                    real += int(b.packed_mask.sum())
                    slots["three-block"] += micro * (b.prompt_mask.shape[1] + b.group_mask.shape[1]
                                                     + b.answer_mask.shape[1])
                    slots["packed"] += b.packed_mask.numel()
                else:
                    slots["packed+grouped"] += b.packed_mask.numel()
        for k in table:
            table[k][r] = round(1 - real / slots[k], 4)
    return table


def main(argv: Optional[Sequence[str]] = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.padding", description=__doc__.split("\n\n")[0])
    p.add_argument("--examples", type=int, default=4096)
    p.add_argument("--micro-batch", type=int, default=32)
    p.add_argument("--pool", type=int, default=64, help="length_grouping: micro-batches per sorted pool")
    p.add_argument("--length-spread", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    table = padding_table(args.examples, args.micro_batch, args.pool, args.seed, args.length_spread)
    for layout, per_r in table.items():
        print(f"{layout:>15}: " + "  ".join(f"r={r} {100 * v:5.1f} %" for r, v in per_r.items()))
    print(json.dumps(table))
    return table


if __name__ == "__main__":
    main()
