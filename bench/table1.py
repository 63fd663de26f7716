"""Table 1 over training seeds: one ``colar run`` of a config (default ``configs/table1.yaml``) per seed,
then every method's accuracy (mean over seeds, 95 % interval over seeds) and #L side by side.

    python -m bench.table1 --seeds 0 1 2                   # three full pipeline runs, then the table
    python -m bench.table1 --seeds 0 1 2 --aggregate-only  # the table from runs already finished

A seed sets every training stage's ``seed`` (model init, data order, factor and label draws): the CoT,
CoLaR and No-CoT stages and each baseline; the data and the evaluation's sampling seeds
(``eval.seeds``) stay as configured, so each seed's accuracy is itself a mean over those. Each run
has its own output folder (``<output-root>/seed<k>``); its numbers are read from the evaluate
stage's ``metrics.json``. Runs use one torch thread (``OMP_NUM_THREADS=1``) unless told otherwise.
Writes ``bench/results/table1_cpu_tiny.json`` (or ``--out``) and prints the markdown table. A config
with ``eval.protocol: both`` (configs/table1.yaml) gives CoT and each baseline a second row, evaluated
under the reference's protocol (setting ``{setting}-reference``, labelled ``(reference eval)``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from bench.common import RESULTS_DIR, ROOT, command_line, utc_now, versions, write_json


def seed_overrides(config_path: str, seed: int) -> list[str]:
    """``--set`` pairs that give every training stage of the config the training seed ``seed``."""
    from flows.config import load_config  # the pipeline package: only when a run is prepared

    cfg = load_config(config_path)
    sets = [f"sft_colar.seed={seed}"]
    if cfg.sft_cot is not None:
        sets.append(f"sft_cot.seed={seed}")  # the No-CoT stage copies this section
    sets += [f"baselines.{name}.train.seed={seed}" for name, _ in cfg.baselines.selected()]
    if cfg.rl is not None:
        sets.append(f"rl.seed={seed}")
    return sets


def run_seed(config_path: str, seed: int, out_dir: Path, threads: int, extra: Sequence[str]) -> float:
    """One ``colar run`` for ``seed`` into ``out_dir``; returns its wall time (s)."""
    cmd = [sys.executable, "-m", "flows.cli", "run", "--config", config_path]
    for pair in [*seed_overrides(config_path, seed), f"output_dir={out_dir}", f"name=table1-seed{seed}", *extra]:
        cmd += ["--set", pair]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, cwd=ROOT)
    return time.perf_counter() - t0


def evaluate_metrics(out_dir: Path) -> dict:
    """The newest evaluate stage's ``metrics.json`` under a run's output folder."""
    found = sorted(out_dir.glob("evaluate-*/metrics.json"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"{out_dir}: no evaluate-*/metrics.json (did the run finish?)")
    return json.loads(found[-1].read_text())


def reevaluate(config_path: str, out_dir: Path, methods: Sequence[str]) -> dict:
    """Evaluate the finished run's models of ``methods`` (baselines) again with today's code, on the
    run's own test split, evaluation seeds, decoding and protocols (``eval.protocol``); returns their
    metrics (primary set). For a fix to how a metric is counted, without training anything again."""
    from colar_core.data.prepare import load_split
    from colar_core.evaluation import evaluate_baseline, for_set
    from colar_core.model import ColarModel
    from colar_core.text import PromptEncoder
    from flows.config import load_config  # pipeline package: only here

    cfg = load_config(config_path).eval
    records = load_split(next(out_dir.glob("prepare-*/data/test.jsonl")))[: cfg.n_examples]
    metrics = {}
    for method in methods:
        model_dir = sorted(out_dir.glob(f"sft-{method}-*/model"), key=lambda p: p.stat().st_mtime)[-1]
        model, tokenizer = ColarModel.load_dir(model_dir, is_trainable=False)
        found, _ = evaluate_baseline(model, PromptEncoder(tokenizer), records, cfg.seeds, cfg.generation,
                                     cfg.protocols())
        metrics.update(found)
    return {**metrics, **for_set(metrics, cfg.sets()[0].name)}  # unprefixed and under the primary set's name


def aggregate(per_seed: dict[int, dict]) -> dict:
    """Per method (primary test set): accuracy of each seed, their mean and 95 % interval over
    seeds, mean #L, and the within-run interval over sampling seeds of each run."""
    from colar_core.scoring import mean_ci95
    from tasks.table1 import method_label, per_set_values, setting_order  # pipeline package

    rows: dict[str, dict] = {}
    for seed, metrics in sorted(per_seed.items()):
        sets, values = per_set_values(metrics)
        primary = sets[0]
        for (metric, set_name, setting), value in values.items():
            if set_name != primary:
                continue
            row = rows.setdefault(setting, {"method": method_label(setting), "accuracy": {}, "length": {},
                                            "sampling_ci95": {}})
            if metric == "accuracy":
                row["accuracy"][seed] = value
            elif metric in ("mean_latents", "mean_tokens"):
                row["length"][seed] = value
                row["length_kind"] = "latents" if metric == "mean_latents" else "tokens"
            elif metric == "accuracy_ci95":
                row["sampling_ci95"][seed] = value
    out = {}
    for setting in sorted(rows, key=setting_order):
        row = rows[setting]
        accs = list(row["accuracy"].values())
        acc, ci = mean_ci95(accs)
        lengths = list(row["length"].values())
        out[setting] = {**row, "accuracy_mean": acc, "accuracy_ci95_over_seeds": ci,
                        "length_mean": sum(lengths) / len(lengths) if lengths else None, "n_seeds": len(accs)}
    return out


def markdown(table: dict) -> str:
    lines = ["| method | accuracy % (mean ± 95% CI over seeds) | per seed | #L |",
             "|---|---:|---|---:|"]
    for row in table.values():
        per_seed = " / ".join(f"{100 * v:.1f}" for _, v in sorted(row["accuracy"].items()))
        length = "-" if row["length_mean"] is None else f"{row['length_mean']:.1f}"
        acc, ci = 100 * row["accuracy_mean"], 100 * row["accuracy_ci95_over_seeds"]
        lines.append(f"| {row['method']} | {acc:.1f} ± {ci:.1f} | {per_seed} | {length} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.table1", description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/table1.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--output-root", default="runs/table1", help="a run per seed in <root>/seed<k>")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each run (default 1)")
    parser.add_argument("--aggregate-only", action="store_true", help="read finished runs, run nothing")
    parser.add_argument("--reevaluate", nargs="*", default=[], metavar="METHOD",
                        help="baselines whose trained models are evaluated again with the current code (their "
                             "metrics replace the run's; the run's own are kept in the JSON as pipeline_metrics)")
    parser.add_argument("--set", dest="extra", action="append", default=[], help="extra key.path=value overrides")
    parser.add_argument("--out", default=str(RESULTS_DIR / "table1_cpu_tiny.json"))
    args = parser.parse_args(argv)

    root = Path(args.output_root).resolve()
    walls = {}
    if not args.aggregate_only:
        for seed in args.seeds:
            walls[seed] = run_seed(args.config, seed, root / f"seed{seed}", args.threads, args.extra)
    per_seed = {seed: evaluate_metrics(root / f"seed{seed}") for seed in args.seeds}
    pipeline_metrics = {seed: dict(m) for seed, m in per_seed.items()}
    if args.reevaluate:
        from colar_core.evaluation import REFERENCE_SUFFIX  # torch: only here

        for seed in args.seeds:
            again = reevaluate(args.config, root / f"seed{seed}", args.reevaluate)
            per_seed[seed] = {k: v for k, v in per_seed[seed].items()
                              if k.rsplit("/", 1)[-1].removesuffix(REFERENCE_SUFFIX) not in args.reevaluate} | again
            for key in sorted(k for k in again if k.startswith(("accuracy/", "mean_")) and k.count("/") == 1):
                print(f"[table1] seed {seed} {key}: pipeline {pipeline_metrics[seed].get(key)} -> again {again[key]}")
    table = aggregate(per_seed)
    text = markdown(table)
    print(text)
    write_json(args.out, {"command": command_line("bench.table1", argv), "config": args.config, "seeds": args.seeds,
                          "threads": args.threads, "wall_s_per_seed": walls, "finished_at": utc_now(),
                          "versions": versions(), "table": table, "per_seed_metrics": per_seed,
                          "reevaluated": args.reevaluate,
                          "pipeline_metrics": pipeline_metrics if args.reevaluate else None,
                          "markdown": text})
    print(f"[table1] wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
