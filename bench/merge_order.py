"""What digit tokens cost CoLaR's merge, and whether an order-aware merge or whole-number tokens win it back.

A from-scratch Llama-shaped model is trained on the built-in problems through ``colar_core``
(no servers, no pipeline): CoT SFT, then CoLaR SFT at r in {1, 2, 3}, then evaluated on the test
split at c = 1, 2, 3 (accuracy and mean latents #L). Conditions, all with the same steps:

* ``digits/sqrt``   - a tokenizer that splits numbers into digits (``numbers="digits"``), plain merge;
* ``digits/rotate`` - the same, merged with pooling ``rotate`` (slot j turned by j * angle);
* ``digits/gain``   - the same, merged with pooling ``gain`` (learned per-slot gains);
* ``whole/sqrt``    - the digit tokenizer with whole-number tokens added (``model.add_number_tokens``,
  colar_core.number_tokens), plain merge.

The digit conditions share one CoT model per seed (CoT training never merges: r = 1). Each CoLaR
run is also evaluated halfway, to show whether it has reached its plateau. One torch thread.

    python -m bench.merge_order                      # the documented run (3 seeds) -> bench/results/merge_order.json
    python -m bench.merge_order --tiny --out x.json  # smoke size (seconds)
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from statistics import mean, pstdev

from bench.common import command_line, utc_now, versions, write_json

CONDITIONS = ("digits/sqrt", "digits/rotate", "digits/gain", "whole/sqrt")
FACTORS = (1, 2, 3)

FULL = dict(
    data=dict(n_train=3000, n_val=20, n_test=200, difficulty="tiny"),
    model=dict(arch="llama", hidden_size=96, num_layers=3, num_heads=4, max_position_embeddings=256),
    batch_size=32, lr=3e-3, cot_steps=500, colar_steps=900, seeds=(0, 1, 2), max_number=100, angle=0.2,
)
TINY = dict(
    data=dict(n_train=40, n_val=4, n_test=8, difficulty="tiny"),
    model=dict(arch="llama", hidden_size=32, num_layers=1, num_heads=2, max_position_embeddings=256),
    batch_size=8, lr=3e-3, cot_steps=2, colar_steps=2, seeds=(0,), max_number=100, angle=0.2,
)


def _train_cfg(preset: dict, mode: str, steps: int, seed: int):
    from colar_core.config import GenerationConfig, ObjectiveConfig
    from colar_core.training.config import TrainConfig

    return TrainConfig(
        objective=ObjectiveConfig(mode=mode, compression_factors=list(FACTORS) if mode == "colar" else [1]),
        max_steps=steps, batch_size=preset["batch_size"], lr=preset["lr"], warmup_steps=min(50, steps // 10),
        lr_schedule="cosine", min_lr_ratio=0.1, precision="fp32", backend="torch", checkpoint_every=0,
        seed=seed, final_model="last", keep_best=0, length_grouping=0,
        generation=GenerationConfig(max_latents=24),
    )


class _HalfwayEval:
    """A training callback that evaluates the model in training once, at ``step``."""

    def __init__(self, step: int, run_eval):
        self.step, self.run_eval, self.result = step, run_eval, None

    def on_step(self, step: int, metrics: dict) -> None:
        if step == self.step and self.result is None:
            self.result = self.run_eval()


def _evaluate(model, encoder, test) -> dict:
    import torch

    from colar_core.config import GenerationConfig
    from colar_core.evaluation import evaluate_latent

    was_training = model.training
    model.eval()
    gen = GenerationConfig(max_latents=24, max_answer_tokens=8, do_sample=False, sample_latents=False,
                           batch_size=256)
    with torch.no_grad():
        m, _ = evaluate_latent(model, encoder, test, list(FACTORS), [0], gen)
    model.train(was_training)
    return {str(c): {"accuracy": m[f"accuracy/c{c}"], "mean_latents": m[f"mean_latents/c{c}"]} for c in FACTORS}


def _evaluate_cot(model, encoder, test) -> tuple[float, float]:
    """(accuracy, mean chain tokens) of the CoT model, decoding its chain greedily."""
    import torch

    from colar_core.config import GenerationConfig
    from colar_core.evaluation import evaluate_text

    model.eval()
    gen = GenerationConfig(max_cot_tokens=64, max_answer_tokens=8, do_sample=False, batch_size=256)
    with torch.no_grad():
        m, _ = evaluate_text(model, encoder, test, "cot", [0], gen)
    model.train()
    return m["accuracy/cot"], m["mean_tokens/cot"]


def run_seed(preset: dict, seed: int, work: Path, log) -> dict:
    import torch

    from colar_core.config import ModelConfig
    from colar_core.data.synthetic import builtin_splits
    from colar_core.merging import GroupMerger
    from colar_core.model import ColarModel
    from colar_core.text import PromptEncoder
    from colar_core.tokenizer import build_tokenizer
    from colar_core.training.sft import train_sft

    splits = builtin_splits(**preset["data"], seed=0)
    train, val, test = splits["train"], splits["val"], splits["test"]
    results = {}
    cot_models = {}
    for condition in preset["conditions"]:
        numbers, pooling = condition.split("/")
        tok_key = numbers
        if tok_key not in cot_models:
            tokenizer = build_tokenizer(train + val, numbers="digits")
            cfg = ModelConfig(tiny=preset["model"], add_number_tokens=preset["max_number"] if numbers == "whole" else 0)
            torch.manual_seed(seed)
            model = ColarModel.build(cfg, tokenizer)  # adds the number tokens to ``tokenizer`` for "whole"
            t0 = time.perf_counter()
            train_sft(model, tokenizer, train, val, _train_cfg(preset, "cot", preset["cot_steps"], seed),
                      work / f"seed{seed}" / f"cot-{numbers}")
            cot_s = time.perf_counter() - t0
            cot_acc = _evaluate_cot(model, PromptEncoder(tokenizer), test)
            cot_models[tok_key] = (model, tokenizer, cot_s)
            results[f"cot/{numbers}"] = {"accuracy": cot_acc[0], "mean_tokens": cot_acc[1], "train_s": cot_s,
                                         "vocab": len(tokenizer)}
            log(f"seed {seed} cot {numbers}: {cot_s:.0f}s, vocab {len(tokenizer)}, accuracy {cot_acc[0]:.2f}, "
                f"{cot_acc[1]:.1f} tokens")
        cot_model, tokenizer, cot_s = cot_models[tok_key]
        model = copy.deepcopy(cot_model)
        torch.manual_seed(seed)  # the learned merge's initial gains
        model.merger = GroupMerger(pooling, model.state.hidden_size, preset["angle"])
        model.state.pooling, model.state.merge_angle = pooling, preset["angle"]
        encoder = PromptEncoder(tokenizer)
        half = _HalfwayEval(preset["colar_steps"] // 2, lambda m=model: _evaluate(m, encoder, test))
        t0 = time.perf_counter()
        result = train_sft(model, tokenizer, train, val, _train_cfg(preset, "colar", preset["colar_steps"], seed),
                           work / f"seed{seed}" / condition.replace("/", "-"), callbacks=[half])
        colar_s = time.perf_counter() - t0
        final = _evaluate(model, encoder, test)
        ce = _last_metric(result.metrics_path, "ce")
        results[condition] = {"final": final, "half": half.result, "final_ce": ce, "cot_train_s": cot_s,
                              "colar_train_s": colar_s, "vocab": len(tokenizer)}
        halfway = " ".join(f"{half.result[str(c)]['accuracy']:.2f}" for c in FACTORS) if half.result else "-"
        log(f"seed {seed} {condition}: " + " ".join(
            f"c{c} {final[str(c)]['accuracy']:.2f}/#L {final[str(c)]['mean_latents']:.1f}" for c in FACTORS)
            + f" (half: {halfway}) ce {ce} in {colar_s:.0f}s")
    return results


def _last_metric(path: Path, key: str):
    """The last logged value of ``key`` (or ``train/<key>``) in a stage's metrics.jsonl, if any."""
    value = None
    for line in Path(path).read_text().splitlines():
        row = json.loads(line)
        for k in (key, f"train/{key}"):
            if isinstance(row.get(k), (int, float)):
                value = row[k]
    return value


def summarise(per_seed: dict) -> dict:
    """Mean and spread over seeds per condition, factor and checkpoint (final / half)."""
    out = {}
    for numbers in ("digits", "whole"):
        rows = [per_seed[s][f"cot/{numbers}"] for s in per_seed if f"cot/{numbers}" in per_seed[s]]
        if not rows:
            continue
        out[f"cot/{numbers}"] = {"accuracy": mean(r["accuracy"] for r in rows),
                                 "accuracy_sd": pstdev([r["accuracy"] for r in rows]),
                                 "mean_tokens": mean(r["mean_tokens"] for r in rows)}
    for condition in [c for c in CONDITIONS if all(c in per_seed[s] for s in per_seed)]:
        rows = [per_seed[s][condition] for s in per_seed]
        cond = {}
        for when in ("final", "half"):
            if any(r[when] is None for r in rows):
                continue
            cond[when] = {str(c): {
                "accuracy": mean(r[when][str(c)]["accuracy"] for r in rows),
                "accuracy_sd": pstdev([r[when][str(c)]["accuracy"] for r in rows]),
                "mean_latents": mean(r[when][str(c)]["mean_latents"] for r in rows),
            } for c in FACTORS}
        out[condition] = cond
    return out


def markdown_table(summary: dict) -> str:
    head = "| condition | " + " | ".join(f"c={c} acc (half → full)" for c in FACTORS) + " | " + \
        " | ".join(f"#L c={c}" for c in FACTORS) + " |"
    lines = [head, "|---" * (1 + 2 * len(FACTORS)) + "|"]
    for condition, s in summary.items():
        if condition.startswith("cot/"):
            continue
        accs = []
        for c in FACTORS:
            f = s["final"][str(c)]
            half = f"{100 * s['half'][str(c)]['accuracy']:.0f} → " if "half" in s else ""
            accs.append(f"{half}**{100 * f['accuracy']:.0f}** ± {100 * f['accuracy_sd']:.0f} %")
        lens = [f"{s['final'][str(c)]['mean_latents']:.1f}" for c in FACTORS]
        lines.append(f"| {condition} | " + " | ".join(accs) + " | " + " | ".join(lens) + " |")
    cots = [f"{k.split('/')[1]} tokens {100 * v['accuracy']:.0f} ± {100 * v['accuracy_sd']:.0f} % "
            f"({v['mean_tokens']:.1f} chain tokens)" for k, v in summary.items() if k.startswith("cot/")]
    lines.append("")
    lines.append("CoT (the start point, explicit chain decoded greedily): " + "; ".join(cots))
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="smoke size: one seed, two steps per stage")
    ap.add_argument("--seeds", default=None, help="comma-separated training seeds (default 0,1,2; tiny 0)")
    ap.add_argument("--conditions", default=",".join(CONDITIONS), help="comma-separated subset of "
                    f"{', '.join(CONDITIONS)}")
    ap.add_argument("--cot-steps", type=int, default=None)
    ap.add_argument("--colar-steps", type=int, default=None)
    ap.add_argument("--work", default=None, help="scratch folder for the runs (default runs/merge_order[-tiny])")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/merge_order.json; tiny: "
                    "merge_order_tiny.json); the markdown table goes next to it (.md)")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    preset = dict(TINY if args.tiny else FULL)
    if args.seeds:
        preset["seeds"] = tuple(int(s) for s in args.seeds.split(","))
    preset["conditions"] = tuple(c for c in args.conditions.split(",") if c)
    if unknown := [c for c in preset["conditions"] if c not in CONDITIONS]:
        ap.error(f"unknown conditions {unknown}; choose from {', '.join(CONDITIONS)}")
    if args.cot_steps:
        preset["cot_steps"] = args.cot_steps
    if args.colar_steps:
        preset["colar_steps"] = args.colar_steps
    work = Path(args.work or ("runs/merge_order-tiny" if args.tiny else "runs/merge_order"))
    if work.exists():
        import shutil

        shutil.rmtree(work)  # every run trains from scratch: a stale stage would resume instead
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[bench.merge_order {time.perf_counter() - t_start:6.0f}s] {msg}", flush=True)

    default = Path("bench/results") / ("merge_order_tiny.json" if args.tiny else "merge_order.json")
    per_seed: dict = {}
    for seed in preset["seeds"]:  # the file is rewritten after every seed: a cut-short run keeps what it finished
        per_seed[str(seed)] = run_seed(preset, seed, work, log)
        summary = summarise(per_seed)
        table = markdown_table(summary)
        result = {"date": utc_now(), "versions": versions(), "command": command_line("bench.merge_order", argv),
                  "tiny": args.tiny, "torch_threads": 1, "preset": preset, "conditions": list(preset["conditions"]),
                  "factors": list(FACTORS), "eval": "test split, greedy answer, mean latents (no sampling)",
                  "seeds_done": list(per_seed), "wall_s": time.perf_counter() - t_start, "summary": summary,
                  "per_seed": per_seed, "table": table}
        path = write_json(Path(args.out) if args.out else default, result)
        path.with_suffix(".md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
