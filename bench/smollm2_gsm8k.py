"""A short SmolLM2-135M run on real GSM8K through the pipeline's stages, timed stage by stage.

What ``colar run --config configs/smollm2.yaml`` runs, without Prefect and MLflow (the GPU machine has
neither): the config's data, model, SFT and evaluation sections, shortened by the options below, run
through the same ``colar_core`` calls the pipeline's tasks make:

* **data**: ``prepare_data`` on the bundled GSM8K train set (7,473 problems; ``--n-train`` keeps the
  first N of the prepared train split);
* **sft_cot**, then **sft_colar** from its model: ``run_sft_job`` (``SFTJob``: the config's ``sft_cot`` /
  ``sft_colar`` ``TrainConfig`` with ``--steps``, ``--batch`` and ``--precision`` set, LoRA as the config
  says), the backbone SmolLM2-135M-Instruct from its GGUF (``--gguf``);
* **eval**: ``evaluate_latent`` (CoLaR at the config's factors) and ``evaluate_text`` (the CoT model) on the
  first ``--eval-n`` problems of the config's test set, with each model moved to the device. (The
  pipeline's ``evaluate_suite`` loads models on the CPU; on a GPU machine it would decode there.)

The JSON is rewritten after every stage, so a run stopped part-way still reports the stages it finished.
Tokens/s of a stage are the training loop's own (packed positions over its step times, from
``metrics.jsonl``); a stage's seconds also hold loading, the GGUF's one-time conversion and saving.

    python -m bench.smollm2_gsm8k                       # SmolLM2 from `colar model fetch-smollm2`
    python -m bench.smollm2_gsm8k --tiny --out x.json   # a tiny random Llama (or --gguf FILE), seconds on a CPU
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

from bench import common

MODULE = "bench.smollm2_gsm8k"
CONFIG = "configs/smollm2.yaml"

#: Sized for a few minutes of an H100 (GGUF conversion and model folders included).
FULL = dict(steps=60, batch=32, eval_n=128, decode_batch=64, max_cot_tokens=160, max_latents=64, n_train=0)
#: A CPU smoke size: every stage runs, on a handful of problems.
TINY = dict(steps=2, batch=2, eval_n=2, decode_batch=2, max_cot_tokens=8, max_latents=4, n_train=32)
#: What ``--tiny`` builds when no ``--gguf`` is given (a word-level tokenizer is built from the data).
TINY_MODEL = dict(arch="llama", hidden_size=32, num_layers=1, num_heads=2)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=CONFIG, help=f"pipeline config to follow (default {CONFIG})")
    p.add_argument(
        "--gguf",
        help="the backbone's GGUF file (default: the config's model.gguf_file; with --tiny: none, a tiny random Llama)",
    )
    p.add_argument("--tiny", action="store_true", help="CPU smoke size (automatic without CUDA)")
    p.add_argument("--steps", type=int, help="optimizer steps of each SFT stage (default 60; tiny 2)")
    p.add_argument("--batch", type=int, help="problems per step (default 32; tiny 2)")
    p.add_argument("--n-train", type=int, help="keep the first N prepared training problems (default all; tiny 32)")
    p.add_argument("--eval-n", type=int, help="test problems evaluated (default 128; tiny 2)")
    p.add_argument("--decode-batch", type=int, help="questions decoded together (default 64; tiny 2)")
    p.add_argument("--max-cot-tokens", type=int, help="CoT decoding budget (default 160; tiny 8)")
    p.add_argument("--max-latents", type=int, help="latent decoding budget (default 64; tiny 4)")
    p.add_argument(
        "--precision", choices=("fp32", "bf16"), help="TrainConfig.precision (default bf16 on CUDA, fp32 on the CPU)"
    )
    p.add_argument("--work", help="work folder (default: a fresh one under runs/, removed at the end)")
    p.add_argument("--keep", action="store_true", help="keep the work folder (models, metrics)")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--threads", type=int, help="torch threads (default 1 on the CPU)")
    p.add_argument("--out", help="result JSON (default bench/results/smollm2_gsm8k_<device>[_tiny].json)")
    args = p.parse_args(argv)
    device = common.pick_device(args.device)
    args.tiny = bool(args.tiny or device.type != "cuda")
    for key, value in (TINY if args.tiny else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.precision is None:
        args.precision = "bf16" if device.type == "cuda" else "fp32"
    if args.threads is None and device.type == "cpu":
        args.threads = 1
    for key in ("steps", "batch", "eval_n", "decode_batch", "max_cot_tokens", "max_latents"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be at least 1")
    return args


def read_config(path: str) -> dict:
    """The config's sections this run follows; a missing section is an error naming it."""
    import yaml

    cfg = yaml.safe_load(Path(path).read_text()) or {}
    missing = [k for k in ("data", "model", "sft_cot", "sft_colar", "eval") if k not in cfg]
    if missing:
        raise ValueError(f"{path}: no {', '.join(missing)} section (needed by {MODULE})")
    return cfg


def model_config(cfg: dict, args, tokenizer_dir: Optional[Path]):
    """The config's ``model`` section with the backbone this run uses: ``--gguf`` (or the config's GGUF),
    or for ``--tiny`` without one a tiny random Llama on the word-level tokenizer in ``tokenizer_dir``."""
    from colar_core.config import ModelConfig

    section = dict(cfg["model"])
    if args.tiny and not args.gguf:
        section.pop("gguf_file", None)
        section.pop("name_or_path", None)
        return ModelConfig(**section, tiny=TINY_MODEL, tokenizer=str(tokenizer_dir))
    if args.gguf:
        section["gguf_file"] = args.gguf
        section.pop("name_or_path", None)
    gguf = Path(str(section.get("gguf_file") or "")).expanduser()
    if not gguf.is_file():
        raise FileNotFoundError(
            f"no GGUF at {str(gguf)!r} (model.gguf_file of {args.config}, or --gguf): "
            "`colar model fetch-smollm2` puts SmolLM2's there"
        )
    return ModelConfig(**section)


def train_config(cfg: dict, stage: str, args):
    """The config's ``stage`` TrainConfig, shortened: ``--steps``, ``--batch``, ``--precision``, torch
    backend, no checkpoints or validation (the run is timed, not kept)."""
    from colar_core.training.config import TrainConfig

    section = dict(cfg[stage])
    section.update(
        max_steps=args.steps,
        batch_size=args.batch,
        grad_accum=1,
        precision=args.precision,
        backend="torch",
        checkpoint_every=0,
        eval_every=0,
        log_every=1,
    )
    return TrainConfig(**section)


def stage_numbers(out: Path) -> dict:
    """Steps, tokens/s (the loop's packed positions over its step times) and first/last loss of a stage."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in rows if "step_time_s" in r and "loss" in r]
    if not steps:
        raise RuntimeError(f"{out / 'metrics.jsonl'}: no training steps recorded")
    secs = sum(r["step_time_s"] for r in steps)
    positions = sum(r.get("n_positions", 0.0) for r in steps)
    return {
        "steps": len(steps),
        "loop_s": secs,
        "positions": positions,
        "tokens_per_s": positions / secs if secs > 0 else None,
        "loss_first": steps[0]["loss"],
        "loss_last": steps[-1]["loss"],
    }


class Report:
    """The result JSON, rewritten after every stage (atomically)."""

    def __init__(self, path: Path, head: dict):
        self.path, self.data = path, dict(head, stages={}, complete=False)
        self.t0 = time.perf_counter()
        self.write()

    def stage(self, name: str, seconds: float, numbers: dict) -> None:
        self.data["stages"][name] = {"seconds": seconds, **numbers}
        print(
            f"[{MODULE} {time.perf_counter() - self.t0:5.0f}s] {name}: {seconds:.1f} s "
            + ", ".join(f"{k} {v:.4g}" for k, v in numbers.items() if isinstance(v, float)),
            flush=True,
        )
        self.write()

    def write(self) -> None:
        self.data["wall_s"] = time.perf_counter() - self.t0
        common.write_json(self.path, self.data)


def run(args, argv: Sequence[str], work: Path) -> dict:
    from colar_core.config import EvalConfig
    from colar_core.data.prepare import load_split, prepare_data, write_split
    from colar_core.evaluation import evaluate_latent, evaluate_text
    from colar_core.evaluation_suite import load_eval_sets
    from colar_core.model import ColarModel
    from colar_core.text import PromptEncoder
    from colar_core.tokenizer import build_tokenizer
    from colar_core.training.sft import SFTJob, run_sft_job
    from colar_core.training.stage import StageData

    common.apply_threads(args.threads)
    device = common.pick_device(args.device)
    cfg = read_config(args.config)
    out = (
        Path(args.out)
        if args.out
        else common.RESULTS_DIR / (f"smollm2_gsm8k_{device.type}{'_tiny' if args.tiny else ''}.json")
    )
    info = common.device_info(device)
    report = Report(
        out,
        {
            "benchmark": "smollm2_gsm8k",
            "device": common.describe_device(info),
            "device_info": info,
            "tiny": args.tiny,
            "config": args.config,
            "backbone": args.gguf or ("tiny random Llama" if args.tiny else cfg["model"].get("gguf_file")),
            "options": {
                k: getattr(args, k)
                for k in (
                    "steps",
                    "batch",
                    "n_train",
                    "eval_n",
                    "decode_batch",
                    "max_cot_tokens",
                    "max_latents",
                    "precision",
                    "threads",
                )
            },
            "versions": common.versions(),
            "command": common.command_line(MODULE, argv),
            "timestamp": common.utc_now(),
        },
    )

    t = time.perf_counter()
    data = cfg["data"]
    prepare_data(
        data["source"],
        work / "data",
        format=data.get("format", "auto"),
        val_fraction=data.get("val_fraction", 0.1),
        test_fraction=data.get("test_fraction", 0.1),
    )
    train_path = work / "data" / "train.jsonl"
    records = load_split(train_path)
    if args.n_train:
        records = records[: args.n_train]
        train_path = work / "data" / "train_first.jsonl"
        write_split(records, train_path)
    tokenizer_dir = None
    if args.tiny and not args.gguf:
        tokenizer_dir = work / "tokenizer"
        build_tokenizer(records, tokenizer_dir)
    model_cfg = model_config(cfg, args, tokenizer_dir)
    report.stage("data", time.perf_counter() - t, {"train_problems": len(records)})

    stage_data = StageData(train=str(train_path))
    init_from = None
    for stage in ("sft_cot", "sft_colar"):
        t = time.perf_counter()
        job = SFTJob(
            output_dir=str(work / stage),
            train=train_config(cfg, stage, args),
            model=model_cfg,
            init_from=init_from,
            data=stage_data,
        )
        result = run_sft_job(job)
        report.stage(stage, time.perf_counter() - t, stage_numbers(work / stage))
        init_from = str(result.model_dir)

    t = time.perf_counter()
    eval_section = dict(cfg["eval"])
    generation = dict(eval_section.get("generation") or {})
    generation.update(batch_size=args.decode_batch, max_cot_tokens=args.max_cot_tokens, max_latents=args.max_latents)
    eval_section.update(
        n_examples=args.eval_n,
        seeds=list(eval_section.get("seeds") or [0])[:1],
        thoughts_questions=0,
        generation=generation,
    )
    eval_cfg = EvalConfig(**eval_section)
    sets = load_eval_sets(eval_cfg, work / "data")
    name, test = next(iter(sets.items()))
    options = ColarModel.load_options(model_cfg)

    def load(stage: str):
        model, tokenizer = ColarModel.load_dir(work / stage / "model", is_trainable=False, **options)
        return model.to(device), PromptEncoder(tokenizer)

    gen, seeds = eval_cfg.generation, eval_cfg.seeds
    model, encoder = load("sft_colar")
    metrics, _ = evaluate_latent(model, encoder, test, eval_cfg.compression_factors, seeds, gen)
    del model
    model, encoder = load("sft_cot")
    metrics.update(evaluate_text(model, encoder, test, "cot", seeds, gen)[0])
    del model
    settings = [f"c{c}" for c in eval_cfg.compression_factors] + ["cot"]
    numbers = {"test_set": name, "questions": len(test)}
    for s in settings:
        spq = metrics.get(f"sec_per_question/{s}")
        numbers[s] = {
            "accuracy": metrics.get(f"accuracy/{s}"),
            "ci95": metrics.get(f"accuracy_ci95/{s}"),
            "mean_length": metrics.get(f"mean_latents/{s}", metrics.get(f"mean_tokens/{s}")),
            "sec_per_question": spq,
            "questions_per_s": 1 / spq if spq else None,
        }
    report.stage("eval", time.perf_counter() - t, numbers)
    report.data["complete"] = True
    report.write()
    print(f"[{MODULE}] wrote {out}", flush=True)
    return report.data


def main(argv: Optional[Sequence[str]] = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.work:
        work = Path(args.work)
        if work.exists() and any(work.iterdir()):
            raise SystemExit(f"{MODULE}: --work {work} is not empty (a stage would resume instead of being timed)")
        work.mkdir(parents=True, exist_ok=True)
    else:
        (common.ROOT / "runs").mkdir(exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix="smollm2-gsm8k-", dir=common.ROOT / "runs"))
    try:
        return run(args, argv, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
