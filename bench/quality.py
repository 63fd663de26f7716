"""The paper's Table 1 at small scale: No-CoT, CoT, CoLaR at c = 1..5 and CoLaR + RL.

A small Llama-shaped model is trained from scratch on the built-in problems (no weights can be
downloaded), then every method is evaluated on a held-out test set over several sampling seeds.
Runs as stages that each save what the next needs, so it fits in 10-minute device sessions:
re-running a stage resumes it from its newest checkpoint, and a finished stage returns at once.

    python -m bench.quality --stage all            # on a GPU: the full run (or one stage at a time)
    python -m bench.quality --tiny --stage all     # CPU smoke run at a tiny size

Stages: data, nocot, cot, colar, rl, eval (eval writes the JSON, the plot and prints the table).
The same run through the pipeline: ``colar run --config configs/gpu.yaml`` (no No-CoT/RL tables).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from bench.common import command_line, default_out, device_info, pick_device, utc_now, versions, write_json

STAGES = ("data", "nocot", "cot", "colar", "rl", "eval")

FULL = dict(
    data=dict(n_train=100_000, n_val=500, n_test=1000, difficulty="hard"),
    model=dict(arch="llama", hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=4,
               max_position_embeddings=512),
    precision="bf16", batch_size=256, lr=1e-3, length_grouping=16,
    steps=dict(nocot=3000, cot=3000, colar=8000, rl=300),
    rl=dict(questions_per_step=32, group_size=8, lr=1e-5),
    eval=dict(seeds=[0, 1, 2], n_test=1000, max_latents=64),
)
TINY = dict(
    data=dict(n_train=400, n_val=20, n_test=40, difficulty="tiny"),
    model=dict(arch="llama", hidden_size=64, num_layers=2, num_heads=4, max_position_embeddings=256),
    precision="fp32", batch_size=16, lr=3e-3, length_grouping=16,
    steps=dict(nocot=20, cot=20, colar=30, rl=4),
    rl=dict(questions_per_step=4, group_size=4, lr=1e-4),
    eval=dict(seeds=[0, 1, 2], n_test=40, max_latents=24),
)


def _train_cfg(preset: dict, stage: str, mode: str, factors):
    from colar_core.config import ObjectiveConfig
    from colar_core.training.config import TrainConfig

    steps = preset["steps"][stage]
    return TrainConfig(objective=ObjectiveConfig(mode=mode, compression_factors=factors), max_steps=steps,
                       batch_size=preset["batch_size"], lr=preset["lr"], warmup_steps=min(100, steps // 10),
                       lr_schedule="cosine", min_lr_ratio=0.1, precision=preset["precision"],
                       checkpoint_every=max(1, min(500, steps // 4)), zero_stage=2,
                       length_grouping=preset["length_grouping"])


def stage_data(out: Path, preset: dict) -> None:
    from colar_core.data.prepare import load_split, prepare_data
    from colar_core.tokenizer import build_tokenizer

    if not (out / "data" / "manifest.json").exists():
        prepare_data("builtin", out / "data", builtin=preset["data"])
    if not (out / "tokenizer").exists():
        build_tokenizer(load_split(out / "data" / "train.jsonl"), out / "tokenizer")


def _sft(out: Path, preset: dict, stage: str, mode: str, factors, init_from=None):
    from colar_core.config import ModelConfig
    from colar_core.training.sft import SFTJob, run_sft_job
    from colar_core.training.stage import StageData

    job = SFTJob(output_dir=str(out / stage), train=_train_cfg(preset, stage, mode, factors),
                 model=ModelConfig(tiny=preset["model"], tokenizer=str(out / "tokenizer")), init_from=init_from,
                 data=StageData(train=str(out / "data" / "train.jsonl"), val=str(out / "data" / "val.jsonl")))
    return run_sft_job(job)


def stage_rl(out: Path, preset: dict) -> None:
    from colar_core.config import GenerationConfig
    from colar_core.rl.config import RLConfig
    from colar_core.rl.trainer import RLJob, run_rl_job
    from colar_core.training.stage import StageData

    rl = RLConfig(max_steps=preset["steps"]["rl"], compression_factor=2, precision=preset["precision"],
                  generation=GenerationConfig(max_latents=preset["eval"]["max_latents"]), **preset["rl"])
    run_rl_job(RLJob(output_dir=str(out / "rl"), init_from=str(out / "colar" / "model"), rl=rl,
                     data=StageData(train=str(out / "data" / "train.jsonl"))))


def _entry(metrics: dict, key: str, length: str) -> dict:
    return {"accuracy": metrics[f"accuracy/{key}"], "ci95": metrics[f"accuracy_ci95/{key}"],
            "mean_len": metrics[f"{length}/{key}"]}


def stage_eval(out: Path, preset: dict, device, tiny: bool, argv) -> dict:
    from colar_core.config import GenerationConfig
    from colar_core.data.prepare import load_split
    from colar_core.evaluation import evaluate_latent, evaluate_text
    from colar_core.model import ColarModel
    from colar_core.text import PromptEncoder
    from colar_core.tokenizer import load_tokenizer

    test = load_split(out / "data" / "test.jsonl")[: preset["eval"]["n_test"]]
    seeds = preset["eval"]["seeds"]
    gen = GenerationConfig(max_latents=preset["eval"]["max_latents"], max_cot_tokens=256, batch_size=256)
    enc = PromptEncoder(load_tokenizer(str(out / "tokenizer")))

    def load(stage):
        model, _ = ColarModel.load_dir(out / stage / "model", is_trainable=False)
        return model.to(device)

    result = {"device": device_info(device), "versions": versions(), "date": utc_now(), "tiny": tiny,
              "command": command_line("bench.quality", argv), "preset": preset, "n_test": len(test), "seeds": seeds}
    m, _ = evaluate_text(load("nocot"), enc, test, "nocot", seeds, gen)
    result["nocot"] = _entry(m, "nocot", "mean_tokens")
    m, _ = evaluate_text(load("cot"), enc, test, "cot", seeds, gen)
    result["cot"] = _entry(m, "cot", "mean_tokens")
    m, _ = evaluate_latent(load("colar"), enc, test, [1, 2, 3, 4, 5], seeds, gen)
    result["colar"] = {str(c): _entry(m, f"c{c}", "mean_latents") for c in range(1, 6)}
    m, _ = evaluate_latent(load("rl"), enc, test, [2], seeds, gen)
    rl = _entry(m, "c2", "mean_latents")
    result["colar_rl"] = {"c": 2, **rl, "sft_accuracy": result["colar"]["2"]["accuracy"],
                          "sft_mean_len": result["colar"]["2"]["mean_len"]}
    result["targets"] = targets(result)
    return result


def targets(r: dict) -> dict:
    """The issue's targets, checked on the measured numbers (True = met)."""
    cot, c2, c5, rl = r["cot"], r["colar"]["2"], r["colar"]["5"], r["colar_rl"]
    return {
        "c2_len_le_0.55_cot": c2["mean_len"] <= 0.55 * cot["mean_len"],
        "c2_acc_ge_0.90_cot": c2["accuracy"] >= 0.90 * cot["accuracy"],
        "c5_ge_nocot_plus_10pts": c5["accuracy"] >= r["nocot"]["accuracy"] + 0.10,
        "rl_acc_within_ci_or_better": rl["accuracy"] >= rl["sft_accuracy"] - max(rl["ci95"], r["colar"]["2"]["ci95"]),
        "rl_shortens": rl["mean_len"] < rl["sft_mean_len"],
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [result["colar"][str(c)]["mean_len"] for c in range(1, 6)]
    ys = [result["colar"][str(c)]["accuracy"] for c in range(1, 6)]
    es = [result["colar"][str(c)]["ci95"] for c in range(1, 6)]
    ax.errorbar(xs, ys, yerr=es, marker="o", label="CoLaR c=1..5")
    for name, marker in (("cot", "s"), ("nocot", "x"), ("colar_rl", "*")):
        e = result[name]
        ax.errorbar([e["mean_len"]], [e["accuracy"]], yerr=[e["ci95"]], marker=marker, linestyle="", label=name)
    ax.set_xlabel("mean chain length (latents; tokens for CoT)")
    ax.set_ylabel("accuracy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", default="all", choices=("all",) + STAGES)
    ap.add_argument("--out", default=None, help="work directory (default runs/quality or runs/quality-tiny)")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke size (automatic without CUDA)")
    ap.add_argument("--results", default=None, help="JSON path (default bench/results/quality.json on CUDA, "
                    "quality_<device>_tiny.json otherwise); the plot goes next to it in docs/img unless given")
    args = ap.parse_args(argv)
    device = pick_device()
    tiny = args.tiny or device.type != "cuda"
    preset = TINY if tiny else FULL
    out = Path(args.out or ("runs/quality-tiny" if tiny else "runs/quality"))
    out.mkdir(parents=True, exist_ok=True)
    todo = STAGES if args.stage == "all" else (args.stage,)
    for stage in todo:
        t0 = time.perf_counter()
        if stage == "data":
            stage_data(out, preset)
        elif stage == "nocot":
            _sft(out, preset, "nocot", "nocot", [1])
        elif stage == "cot":
            _sft(out, preset, "cot", "cot", [1])
        elif stage == "colar":
            _sft(out, preset, "colar", "colar", [1, 2, 3, 4, 5], init_from=str(out / "cot" / "model"))
        elif stage == "rl":
            stage_rl(out, preset)
        else:
            result = stage_eval(out, preset, device, tiny, argv)
            path = write_json(Path(args.results) if args.results else default_out("quality", device, tiny), result)
            img = path.parent if args.results else Path("docs/img")
            img.mkdir(parents=True, exist_ok=True)
            plot(result, img / f"{path.stem}.png")
            print(json.dumps({k: result[k] for k in ("nocot", "cot", "colar", "colar_rl", "targets")}, indent=2))
        print(f"[bench.quality] stage {stage} done in {time.perf_counter() - t0:.1f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
