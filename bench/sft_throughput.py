"""SFT throughput: a plain causal-LM step, a CoT SFT step and a CoLaR SFT step, on the project's engines.

Every step runs through :func:`colar_core.training.engines.build_engine` (``TrainConfig``: backend
deepspeed ZeRO-2 by default, or ``--backend torch``; bf16 on CUDA) and
:func:`colar_core.training.loop.train_loop`, on the same random-weight Llama-3.2-1B backbone built
from ``colar_core/archs/llama-3.2-1b-instruct.json`` (nothing is downloaded), trained in full or, with
``--lora-r``, through LoRA adapters as the GPU recipe (r=128, alpha 32 on q_proj, v_proj):

* ``plain``: ``LlamaForCausalLM(input_ids, labels)`` on ``micro_batch x seq_len`` random tokens
  (no padding), backward, optimizer step. Tokens counted: ``micro_batch * seq_len``.
* ``cot``: the CoT SFT stage (``ObjectiveConfig(mode="cot")``, r = 1): ``SFTBatches`` collates the
  synthetic examples below and ``ColarModel.sft_loss`` takes CE on the chain and the answer.
* ``colar``: what ``colar_core.training.sft.train_sft`` runs: ``SFTBatches`` draws ``r`` from
  1..5 per step and collates synthetic examples (question ~100 tokens, steps ~120, answer ~10), then
  ``ColarModel.sft_loss`` (CE + soft-MSE latent loss). Tokens counted: ``n_positions`` returned by
  ``sft_loss`` (real positions fed to the backbone), so compression itself earns nothing.

Each phase runs in its own child process by default (``--isolate process``), so the second model
never shares GPU memory or a DeepSpeed process group with the first.

    python -m bench.sft_throughput                 # H100: writes bench/results/sft_throughput.json
    python -m bench.sft_throughput --tiny          # CPU smoke size (automatic without CUDA)

FLOPs: see ``bench/common.py`` and docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence

from bench import common
from colar_core.training.callbacks import CallbackBase

MODULE = "bench.sft_throughput"
PHASES = ("plain", "cot", "colar")
EMBEDDING_SCALE = 0.018  # the paper's constant for Llama-3.2-1B (the scale does not change the cost)

FULL = dict(micro_batch=32, seq_len=256, steps=30, warmup=5, question_tokens=100, step_tokens=120, answer_tokens=10)
TINY = dict(micro_batch=4, seq_len=64, steps=20, warmup=3, question_tokens=25, step_tokens=30, answer_tokens=4)
# CPU proxy (--proxy): common.PROXY model, full-size data lengths, few steps
PROXY = dict(micro_batch=8, seq_len=256, steps=8, warmup=2, question_tokens=100, step_tokens=120, answer_tokens=10)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="small model, CPU smoke size (automatic without CUDA)")
    p.add_argument("--proxy", action="store_true",
                   help="CPU proxy: a 256-wide 4-layer model whose LM head is ~21 %% of its parameters, as in the "
                        "1B shape, on full-size data lengths (micro-batch 8); fp32; not GPU evidence")
    p.add_argument("--steps", type=int, help="timed optimizer steps per phase (default 30; tiny 20)")
    p.add_argument("--warmup", type=int, help="untimed steps first (default 5; tiny 3)")
    p.add_argument("--micro-batch", type=int, help="sequences per step, both phases (default 32; tiny 4)")
    p.add_argument("--seq-len", type=int, help="plain-step sequence length (default 256; tiny 64)")
    p.add_argument("--question-tokens", type=int, help="CoLaR data: mean question length incl. BOS (100; tiny 25)")
    p.add_argument("--step-tokens", type=int, help="CoLaR data: mean reasoning-chain length (120; tiny 30)")
    p.add_argument("--answer-tokens", type=int, help="CoLaR data: mean answer length incl. ### and EOS (10; tiny 4)")
    p.add_argument("--length-spread", type=float, default=0.2,
                   help="CoLaR data: lengths are uniform in mean*(1 +- spread) (default 0.2)")
    p.add_argument("--length-grouping", type=int, default=64,
                   help="CoLaR phase: TrainConfig.length_grouping, pools of k micro-batches sorted by length "
                        "(default 64; 0 = off, random batches)")
    p.add_argument("--phases", default="plain,colar", help="comma-separated subset of plain,cot,colar")
    p.add_argument("--backend", choices=("deepspeed", "torch"), default="deepspeed",
                   help="TrainConfig.backend: DeepSpeed ZeRO-2 (default) or plain torch (bf16 autocast)")
    p.add_argument("--precision", choices=("fp32", "bf16"), help="TrainConfig.precision (default bf16; tiny fp32)")
    p.add_argument("--lora-r", type=int, default=0,
                   help="LoRA rank on the backbone (0 = full fine-tune, default; the GPU recipe: 128)")
    p.add_argument("--lora-alpha", type=int, default=32, help="LoRA alpha (default 32, the recipe's)")
    p.add_argument("--lora-targets", default="q_proj,v_proj", help="LoRA target modules (default q_proj,v_proj)")
    p.add_argument("--attn-impl", default="sdpa", help="transformers attention implementation (default sdpa)")
    p.add_argument("--isolate", choices=("process", "none"), default="process",
                   help="run each phase in a child process (default) or both in this one")
    common.add_run_options(p, "sft_throughput")
    p.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)  # internal: child process
    p.add_argument("--phase-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    common.resolve_size(args, FULL, TINY, PROXY)
    args.phase_list = [x.strip() for x in args.phases.split(",") if x.strip()]
    args.lora_target_list = [x.strip() for x in args.lora_targets.split(",") if x.strip()]
    if args.precision is None:
        args.precision = "fp32" if args.tiny else "bf16"
    if args.lora_r < 0 or (args.lora_r and not args.lora_target_list):
        p.error("--lora-r must be >= 0, with at least one --lora-targets module")
    bad = [x for x in args.phase_list if x not in PHASES]
    if bad or not args.phase_list:
        p.error(f"--phases: unknown {bad}; choose from {PHASES}")
    return args


def model_shape(args) -> common.LlamaShape:
    return common.PROXY if args.proxy else common.TINY if args.tiny else common.LLAMA_3_2_1B


def train_config(args, objective=None):
    from colar_core.config import ObjectiveConfig
    from colar_core.training.config import TrainConfig

    return TrainConfig(
        backend=args.backend, zero_stage=2, precision=args.precision,
        batch_size=args.micro_batch, grad_accum=1, max_steps=args.warmup + args.steps, lr=1e-5,
        objective=objective or ObjectiveConfig(mode="colar"), seed=args.seed, checkpoint_every=0,
        length_grouping=args.length_grouping,
    )


# ----------------------------------------------------------------------------------------------
# Synthetic data and models
# ----------------------------------------------------------------------------------------------
def bench_encoder():
    """A PromptEncoder for a small word-level tokenizer: supplies ###, pad, EOS, BOS and the speed
    suffix ids; example token ids themselves are random (see :func:`synthetic_examples`)."""
    from colar_core.text import PromptEncoder
    from colar_core.tokenizer import build_tokenizer

    return PromptEncoder(build_tokenizer([], max_number=200))


def synthetic_examples(n: int, encoder, vocab_size: int, question: int, steps: int, answer: int,
                       spread: float, seed: int) -> list:
    """``n`` EncodedExamples shaped like the training text: BOS + question ids, step ids, then
    ``###`` + answer ids + EOS, with lengths uniform in ``mean * (1 +- spread)``."""
    import random

    from colar_core.text import EncodedExample

    rng = random.Random(seed)
    lo = len(encoder.tokenizer) if len(encoder.tokenizer) < vocab_size else 0

    def length(mean: int, minimum: int) -> int:
        return max(minimum, round(rng.uniform(mean * (1 - spread), mean * (1 + spread))))

    def ids(k: int) -> tuple[int, ...]:
        return tuple(rng.randrange(lo, vocab_size) for _ in range(k))

    out = []
    for _ in range(n):
        q = encoder.bos_ids + ids(length(question, 2) - len(encoder.bos_ids))
        a = (encoder.think_id,) + ids(length(answer, 3) - 2) + (encoder.eos_id,)
        out.append(EncodedExample(q, ids(length(steps, 1)), a, "0"))
    return out


def build_backbone(shape: common.LlamaShape, device, seed: int, attn_impl: str, pad_id=None, lora=None):
    """A random-weight causal LM of ``shape``, initialised directly on ``device`` (fp32; the DeepSpeed
    engine casts to bf16, the torch engine autocasts); with ``lora`` (a ``colar_core.config.LoraConfig``)
    wrapped in peft adapters, the backbone frozen."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(shape.hf_config(pad_id=pad_id), attn_implementation=attn_impl)
        if lora is not None:
            from peft import LoraConfig as PeftLoraConfig
            from peft import get_peft_model

            model = get_peft_model(model, PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                         target_modules=lora.target_modules, task_type="CAUSAL_LM"))
    return model


def lora_config(args):
    """The ``colar_core.config.LoraConfig`` of ``--lora-r/--lora-alpha/--lora-targets`` (None: full fine-tune)."""
    from colar_core.config import LoraConfig

    if not args.lora_r:
        return None
    return LoraConfig(r=args.lora_r, alpha=args.lora_alpha, target_modules=args.lora_target_list)


def build_colar(shape: common.LlamaShape, device, seed: int, attn_impl: str, encoder, lora=None):
    """``ColarModel`` around a random backbone, constructed directly (the vocabulary stays at the
    backbone's size; the tokenizer is only needed for the special ids)."""
    import torch

    from colar_core.latent_head import LatentHead
    from colar_core.model import ColarModel, ColarState

    lm = build_backbone(shape, device, seed, attn_impl, pad_id=encoder.pad_id, lora=lora)
    state = ColarState(base_model=f"random-{'tiny' if shape.vocab_size < 10000 else 'llama-3.2-1b'}-shape",
                       hidden_size=shape.hidden_size, latent_intermediate_size=shape.hidden_size,
                       embedding_scale=EMBEDDING_SCALE, embedding_scale_source="config",
                       trained_compression_factors=[1, 2, 3, 4, 5], lora=lora.model_dump() if lora else None)
    with torch.device(device):
        head = LatentHead(shape.hidden_size, shape.hidden_size)
    return ColarModel(lm, head, state)


# ----------------------------------------------------------------------------------------------
# One phase
# ----------------------------------------------------------------------------------------------
class _Recorder(CallbackBase):
    """train_loop callback: per-step metrics, and synchronised clocks (wall and process CPU time)
    read at the end of every step, so the timed window and each step's time come from one clock."""

    def __init__(self, device, warmup: int, total: int):
        self.device, self.warmup, self.total = device, warmup, total
        self.steps: list[dict] = []
        self.marks: list[tuple[float, float]] = []  # (wall, cpu) at train start and after each step

    def on_train_start(self, info: dict) -> None:
        self._mark()

    def on_step(self, step: int, metrics: dict) -> None:
        self._mark()
        wall = self.marks[-1][0] - self.marks[-2][0]
        cpu = self.marks[-1][1] - self.marks[-2][1]
        self.steps.append(dict(metrics, step=step, bench_wall_s=wall, bench_cpu_s=cpu))

    def _mark(self) -> None:
        import time

        common.sync(self.device)  # train_loop already synchronises each step; this makes it explicit
        self.marks.append((time.perf_counter(), time.process_time()))

    def window(self) -> tuple[float, float]:
        """(wall, cpu) seconds from the end of the warm-up to the end of the last step."""
        (w0, c0), (w1, c1) = self.marks[self.warmup], self.marks[self.total]
        return w1 - w0, c1 - c0


def run_phase(phase: str, args) -> dict:
    """Build the model and engine for ``phase``, run warm-up + timed steps, return the numbers."""
    import torch

    from colar_core.training.engines import build_engine
    from colar_core.training.loop import LoopPlan, StepBatch, train_loop

    common.apply_threads(args.threads)
    device = common.pick_device(args.device)
    shape = model_shape(args)
    n_params = shape.param_count()
    lora = lora_config(args)
    n_lora = common.lora_param_count(shape, lora.r, lora.target_modules) if lora else 0
    head_params = common.latent_head_param_count(shape.hidden_size)
    total = args.warmup + args.steps
    common.reset_peak_memory(device)
    stats: list[dict] = []  # per step: positions, per-row lengths, LM-head rows, latent-head rows

    if phase == "plain":
        model = build_backbone(shape, device, args.seed, args.attn_impl, lora=lora)
        cfg = train_config(args)
        engine = build_engine(model, cfg)
        g = torch.Generator(device="cpu").manual_seed(args.seed)
        ids = torch.randint(0, shape.vocab_size, (args.micro_batch, args.seq_len), generator=g).to(engine.device)
        n_pos = torch.tensor(float(ids.numel()), device=engine.device)
        row = {"positions": ids.numel(), "rows": [args.seq_len] * args.micro_batch,
               "lm_head_rows": ids.numel(), "latent_head_rows": 0}

        def batches_fn(step: int):
            stats.append(row)
            return StepBatch([ids], {})

        def loss_fn(m, batch):
            out = m(input_ids=batch, labels=batch)  # HF shifts the labels; logits at every position
            return {"loss": out.loss, "n_positions": n_pos}
    else:
        from colar_core.config import ObjectiveConfig
        from colar_core.training.sft import SFTBatches

        encoder = bench_encoder()
        model = build_colar(shape, device, args.seed, args.attn_impl, encoder, lora=lora)
        obj = (ObjectiveConfig(mode="colar", compression_factors=[1, 2, 3, 4, 5]) if phase == "colar"
               else ObjectiveConfig(mode="cot", compression_factors=[1]))
        cfg = train_config(args, obj)
        engine = build_engine(model, cfg)
        examples = synthetic_examples(max(64 * args.micro_batch, 256), encoder, shape.vocab_size,
                                      args.question_tokens, args.step_tokens, args.answer_tokens,
                                      args.length_spread, args.seed)
        batches = SFTBatches(examples, encoder, cfg, engine.rank, engine.world_size, engine.device)

        def batches_fn(step: int):
            sb = batches(step)
            b = sb.micro_batches[0]
            rows = b.packed_mask.sum(1)  # the backbone runs on the packed layout (pads only at row ends)
            unpacked = b.prompt_mask.shape[1] + b.group_mask.shape[1] + b.answer_mask.shape[1]
            stats.append({"positions": int(rows.sum()), "rows": rows.tolist(), "lm_head_rows": b.label_index.numel(),
                          "latent_head_rows": b.latent_src.numel(), "width": b.packed_mask.shape[1],
                          "unpacked_width": unpacked, "slots": b.packed_mask.numel(), "r": b.r})
            return sb

        def loss_fn(m, batch):  # exactly train_sft's loss_fn
            return m.sft_loss(batch.to(engine.device), obj, generator=batches.loss_gen)

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    rec = _Recorder(engine.device, args.warmup, total)
    train_loop(engine, batches_fn, loss_fn, LoopPlan(max_steps=total, log_every=1), callbacks=[rec])
    wall, cpu = rec.window()
    secs = wall if args.clock == "wall" else cpu
    timed_steps, timed_stats = rec.steps[args.warmup:], stats[args.warmup:total]

    positions = sum(s["positions"] for s in timed_stats)
    counted = sum(m.get("n_positions", 0.0) for m in timed_steps)  # what the loss function reported
    flops = {k: sum(step_flops(shape, n_lora, head_params, s)[k] for s in timed_stats)
             for k in ("nominal", "nominal_6n", "executed")}
    peak, _ = common.peak_bf16_flops(common.device_info(device)["name"])
    out = {
        "tokens_per_s": counted / secs,
        "tflops": common.tflops(flops["nominal"], secs),
        "mfu": common.mfu(common.tflops(flops["nominal"], secs), peak),
        "mfu_6n": common.mfu(common.tflops(flops["nominal_6n"], secs), peak),
        "tflops_executed": common.tflops(flops["executed"], secs),
        "step_time_ms": 1000 * secs / args.steps,
        "tokens_per_step": counted / args.steps,
        "timed_steps": args.steps,
        "warmup_steps": args.warmup,
        "clock": args.clock,
        "wall_s": wall,
        "process_cpu_s": cpu,
        "tokens_per_s_wall": counted / wall,
        "loop_step_time_s_sum": sum(m["step_time_s"] for m in timed_steps),  # train_loop's own wall clock
        "loss_first": rec.steps[0].get("loss"),
        "loss_last": rec.steps[-1].get("loss"),
        "peak_memory_gib": common.peak_memory_gib(device),
        "attn_implementation": _backbone(engine.model).config._attn_implementation,
        "zero_stage": getattr(engine, "zero_stage", None),
        "backend": cfg.backend,
        "precision": cfg.precision,
        "lora": lora.model_dump() if lora else None,
        "trainable_params": trainable,
    }
    if abs(positions - counted) > 0.5:
        out["positions_mismatch"] = {"collated": positions, "reported": counted}
    if phase == "colar":
        out.update(_per_r(timed_steps, timed_stats, "bench_wall_s" if args.clock == "wall" else "bench_cpu_s"))
    if phase != "plain":
        out["mean_padded_width"] = sum(s["width"] for s in timed_stats) / len(timed_stats)
        out["mean_unpacked_width"] = sum(s["unpacked_width"] for s in timed_stats) / len(timed_stats)
        out["padding_fraction"] = 1 - positions / sum(s["slots"] for s in timed_stats)
        out["mean_lm_head_rows"] = sum(s["lm_head_rows"] for s in timed_stats) / len(timed_stats)
    out["params"] = n_params + n_lora + (head_params if phase != "plain" else 0)

    _release(engine)
    return out


def step_flops(shape: common.LlamaShape, n_lora: int, head_params: int, s: dict) -> dict:
    """One step's FLOPs (``s``: its positions, row lengths, LM-head and latent-head rows), three ways:

    * ``nominal``: the model FLOPs MFU counts: the backbone at every position, trained in full
      (``6 N``) or frozen under LoRA adapters (``4 N + 6 N_lora``: :func:`common.train_flops`), plus attention;
    * ``nominal_6n``: ``6 (N + N_lora)`` at every position plus attention, the full fine-tune convention;
    * ``executed``: as nominal, but the tied LM head only on the rows whose logits are computed, plus the
      latent head (trained: 6 per parameter) on each latent prediction.
    """
    n_params = shape.param_count()
    emb = shape.vocab_size * shape.hidden_size
    attn = common.attention_train_flops(shape, s["rows"])
    pos = s["positions"]
    frozen, trained = (n_params, n_lora) if n_lora else (0, n_params)
    if n_lora:
        body = common.train_flops(n_params - emb, n_lora, pos) + common.train_flops(emb, 0, s["lm_head_rows"])
    else:
        body = common.train_flops(0, n_params - emb, pos) + common.train_flops(0, emb, s["lm_head_rows"])
    return {"nominal": common.train_flops(frozen, trained, pos) + attn,
            "nominal_6n": common.dense_train_flops(n_params + n_lora, pos) + attn,
            "executed": body + common.train_flops(0, head_params, s["latent_head_rows"]) + attn}


def _backbone(model):
    return model.causal_lm if hasattr(model, "causal_lm") else model


def _per_r(steps: list[dict], stats: list[dict], clock_key: str) -> dict:
    """Per compression factor: step count, tokens per step, step time and tokens/s (on the run's
    clock), and the 'balanced' tokens/s a uniform draw of r gives in expectation (sum of per-r
    mean tokens / sum of per-r mean step times), which removes the luck of the r draw."""
    by_r: dict[int, list] = {}
    for m, s in zip(steps, stats):
        by_r.setdefault(int(s["r"]), []).append((m["n_positions"], m[clock_key]))
    per_r = {}
    for r in sorted(by_r):
        pos, secs = sum(p for p, _ in by_r[r]), sum(t for _, t in by_r[r])
        per_r[str(r)] = {"steps": len(by_r[r]), "tokens_per_step": pos / len(by_r[r]),
                         "step_time_ms": 1000 * secs / len(by_r[r]), "tokens_per_s": pos / secs}
    mean_pos = sum(v["tokens_per_step"] for v in per_r.values())
    mean_time = sum(v["step_time_ms"] for v in per_r.values()) / 1000
    return {"per_r": per_r, "tokens_per_s_balanced_r": mean_pos / mean_time if mean_time else None,
            "r_drawn": [int(s["r"]) for s in stats]}


def _release(engine) -> None:
    from colar_core.devices import release_memory

    engine.close()  # DeepSpeed's hooks would keep its optimizer state alive (colar_core.training.engines)
    del engine
    release_memory()  # gc, CUDA's cached blocks, glibc's freed heap


# ----------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------
def child_argv(argv: Sequence[str], phase: str, out: Path) -> list[str]:
    """The command that runs one ``phase`` in its own process, writing its numbers to ``out``."""
    keep, skip = [], False
    for a in argv:  # drop --out / --isolate / --phases (the parent owns them)
        if skip:
            skip = False
            continue
        if a in ("--out", "--isolate", "--phases", "--phase", "--phase-out"):
            skip = True
            continue
        if a.split("=", 1)[0] in ("--out", "--isolate", "--phases", "--phase", "--phase-out"):
            continue
        keep.append(a)
    return [sys.executable, "-m", MODULE, *keep, "--isolate", "none", "--phase", phase, "--phase-out", str(out)]


def _run_child(argv: Sequence[str], phase: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="colar-bench-") as tmp:
        out = Path(tmp) / f"{phase}.json"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(common.ROOT), *filter(None, [env.get("PYTHONPATH")])])
        for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):  # each child is its own job
            env.pop(var, None)
        proc = subprocess.run(child_argv(argv, phase, out), cwd=common.ROOT, env=env)
        if proc.returncode != 0 or not out.is_file():
            raise RuntimeError(f"{phase} phase failed (exit {proc.returncode})")
        return json.loads(out.read_text())


def main(argv: Optional[Sequence[str]] = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.phase:  # child: one phase, result to --phase-out
        result = run_phase(args.phase, args)
        common.write_json(args.phase_out, result)
        return result

    common.apply_threads(args.threads)
    device = common.pick_device(args.device)
    info = common.device_info(device)
    peak, peak_source = common.peak_bf16_flops(info["name"])
    results = {}
    for phase in args.phase_list:
        print(f"[sft_throughput] {phase} phase ...", flush=True)
        results[phase] = _run_child(argv, phase) if args.isolate == "process" else run_phase(phase, args)
        r = results[phase]
        print(f"[sft_throughput] {phase}: {r['tokens_per_s']:.1f} tokens/s, {r['tflops']:.4g} TFLOP/s "
              f"(MFU {100 * r['mfu']:.2f} % of {peak / 1e12:.0f}), {r['step_time_ms']:.1f} ms/step", flush=True)

    shape = model_shape(args)
    lora = lora_config(args)
    report = {
        "benchmark": "sft_throughput",
        "device": common.describe_device(info),
        "device_info": info,
        "tiny": args.tiny,
        "proxy": args.proxy,
        **results,
        "config": {
            "model": shape.as_dict(), "micro_batch": args.micro_batch, "seq_len": args.seq_len,
            "steps": args.steps, "warmup": args.warmup, "backend": args.backend,
            "zero_stage": 2 if args.backend == "deepspeed" else None, "precision": args.precision,
            "lora": lora.model_dump() if lora else None,
            "optimizer": "torch AdamW (fused on CUDA) via TrainConfig",
            "grad_clip": 1.0, "attn_implementation": args.attn_impl, "isolate": args.isolate,
            "colar_data": {"question_tokens": args.question_tokens, "step_tokens": args.step_tokens,
                           "answer_tokens": args.answer_tokens, "length_spread": args.length_spread,
                           "compression_factors": [1, 2, 3, 4, 5], "objective": "ce 1 + soft_mse 1",
                           "length_grouping": args.length_grouping},
            "seed": args.seed, "threads": args.threads, "clock": args.clock,
        },
        "flops": {
            "tflops": "(6 * N * positions + 12 * L * d * sum_rows(n_row^2)) / s, N = backbone params with the "
                      "tied embedding counted once, d = heads * head_dim, n_row = real positions in a row; under "
                      "LoRA (4 * N + 6 * N_lora) * positions: frozen weights run forward and pass input gradients, "
                      "but compute no weight gradient",
            "tflops_executed": "as tflops, but the LM-head share only on rows whose logits are computed, plus "
                               "6 * latent-head params per latent prediction (CoT, CoLaR)",
            "mfu": "tflops / the device's dense bf16 peak (peak_tflops, peak_source)",
            "mfu_6n": "6 * (N + N_lora) * positions + attention, over the same peak: the full fine-tune "
                      "convention (overstates a LoRA step's work by ~1.5x)",
            "peak_tflops": peak / 1e12,
            "peak_source": peak_source,
        },
        "versions": common.versions(),
        "command": common.command_line(MODULE, argv),
        "timestamp": common.utc_now(),
    }
    if "cot" in results and "colar" in results:
        report["colar_over_cot_tokens_per_s"] = results["colar"]["tokens_per_s"] / results["cot"]["tokens_per_s"]
    if "plain" in results and "colar" in results:
        ratio = results["colar"]["tokens_per_s"] / results["plain"]["tokens_per_s"]
        report["colar_over_plain_tokens_per_s"] = ratio
        gpu = device.type == "cuda" and not args.tiny
        report["targets"] = {
            "colar_tokens_per_s_at_least_plain": {"value": ratio, "target": ">= 1.0", "met": ratio >= 1.0 if gpu else None},
            "plain_tflops": {"value": results["plain"]["tflops"], "target": ">= 300",
                             "met": results["plain"]["tflops"] >= 300 if gpu else None},
            "note": "targets apply to the full-size bf16 run on an H100" + ("" if gpu else "; this run is a smoke run"),
        }
    common.write_report("sft_throughput", report, args, device)
    return report


if __name__ == "__main__":
    main()
