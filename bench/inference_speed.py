"""Inference speed: a latent step vs a decoded token, and CoLaR chains vs a CoT chain, end to end.

Times the product's code path, ``colar_core.inference.generate_latent`` / ``generate_text`` (KV
cache via ``DecodeState``), on a random-weight Llama-3.2-1B-shaped ``ColarModel`` in bf16:

* per step: ``(T(n + K) - T(n)) / K`` for chains of ``n`` and ``n + K`` latents (generate_latent) or
  chain tokens (generate_text) after the same prompt, so prefill and answer decoding cancel. A
  latent step = latent head + sample + decoder step + the LM-head ``###`` check; a token step =
  LM head + sample + embedding + decoder step.
* end to end: a 24-token CoT chain (then ``###`` and the answer) vs ``ceil(24 / c)`` latents (then
  ``###`` fed and the answer) for each ``c``; questions/s = batch / time.

Random weights never stop by themselves, and could stop by chance: the benchmark model masks the
``###``, EOS and pad logits (one ``index_fill_`` on the logits, the same in both paths), so every row runs
exactly the forced lengths; the lengths are checked after each call.

    python -m bench.inference_speed                # H100: writes bench/results/inference_speed.json
    python -m bench.inference_speed --tiny         # CPU smoke size (automatic without CUDA)
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
from typing import Optional, Sequence

from bench import common

MODULE = "bench.inference_speed"
EMBEDDING_SCALE = 0.018  # the paper's constant for Llama-3.2-1B

FULL = dict(batch_sizes="64,256", reps=5, probe_start=8, probe_steps=32)
TINY = dict(batch_sizes="4,16", reps=5, probe_start=4, probe_steps=32)
PROXY = dict(batch_sizes="16,64", reps=5, probe_start=8, probe_steps=32)  # CPU proxy: common.PROXY model


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="small model, CPU smoke size (automatic without CUDA)")
    p.add_argument("--proxy", action="store_true",
                   help="CPU proxy: the 256-wide 4-layer model of bench.common.PROXY (LM head ~21 %% of the "
                        "parameters, as in the 1B shape), batches 16,64; not GPU evidence")
    p.add_argument("--batch-sizes", help="comma-separated prompts per batch (default 64,256; tiny 4,16)")
    p.add_argument("--factors", default="1,2,3,4,5", help="compression factors timed end to end (default 1..5)")
    p.add_argument("--cot-tokens", type=int, default=24, help="CoT chain length before the closing ### (default 24)")
    p.add_argument("--answer-tokens", type=int, default=4,
                   help="answer tokens decoded after ### incl. EOS, e.g. 'Answer' ':' '18' EOS (default 4)")
    p.add_argument("--question-tokens", type=int, default=100, help="mean question length incl. BOS (default 100)")
    p.add_argument("--length-spread", type=float, default=0.1, help="question lengths uniform in mean*(1 +- spread)")
    p.add_argument("--reps", type=int, help="timed repetitions per measurement; the median is reported (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls of each configuration first (default 1)")
    p.add_argument("--probe-start", type=int, help="per-step probe: shorter chain length (default 8; tiny 4)")
    p.add_argument("--probe-steps", type=int, help="per-step probe: extra steps K of the longer chain (default 32)")
    p.add_argument("--greedy", action="store_true", help="argmax tokens instead of sampling (default: sample, as the paper)")
    common.add_run_options(p, "inference_speed")
    args = p.parse_args(argv)
    common.resolve_size(args, FULL, TINY, PROXY)
    args.batch_list = [int(x) for x in str(args.batch_sizes).split(",") if x.strip()]
    args.factor_list = [int(x) for x in str(args.factors).split(",") if x.strip()]
    if not args.batch_list or min(args.batch_list) < 1 or not args.factor_list or min(args.factor_list) < 1:
        p.error("--batch-sizes and --factors need positive integers")
    return args


# ----------------------------------------------------------------------------------------------
# Model, prompts
# ----------------------------------------------------------------------------------------------
def build_model(shape: common.LlamaShape, device, encoder, seed: int, dtype):
    """A ColarModel whose LM head never picks ``###``, EOS or pad, so chain lengths are exactly forced
    (the product counts a CoT chain's non-pad tokens, so a sampled pad id would shorten it)."""
    import torch
    from transformers import AutoModelForCausalLM

    from colar_core.latent_head import LatentHead
    from colar_core.model import ColarModel, ColarState

    class ForcedLengthColarModel(ColarModel):
        def token_logits(self, hidden):
            logits = super().token_logits(hidden)
            return logits.index_fill_(-1, self.never_ids, torch.finfo(logits.dtype).min)

    torch.manual_seed(seed)
    with torch.device(device):
        lm = AutoModelForCausalLM.from_config(shape.hf_config(pad_id=encoder.pad_id), dtype=dtype)
        head = LatentHead(shape.hidden_size, shape.hidden_size).to(dtype)
    state = ColarState(base_model="random-llama-shape", hidden_size=shape.hidden_size,
                       latent_intermediate_size=shape.hidden_size, embedding_scale=EMBEDDING_SCALE,
                       embedding_scale_source="config", trained_compression_factors=[1, 2, 3, 4, 5])
    model = ForcedLengthColarModel(lm, head, state).eval()
    model.never_ids = torch.tensor(sorted({encoder.think_id, encoder.eos_id, encoder.pad_id}), device=device)
    return model


def make_questions(encoder, n: int, mean_tokens: int, spread: float, seed: int) -> list[str]:
    """Questions of numbers (each one token in the bench tokenizer) whose encoded question
    (BOS + 'Question: ... step by step:') has about ``mean_tokens`` tokens."""
    rng = random.Random(seed)
    overhead = len(encoder.encode_question("1")) - 1
    out = []
    for _ in range(n):
        target = round(rng.uniform(mean_tokens * (1 - spread), mean_tokens * (1 + spread)))
        out.append(" ".join(str(rng.randrange(0, 200)) for _ in range(max(1, target - overhead))))
    return out


# ----------------------------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------------------------
class Bench:
    def __init__(self, model, encoder, device, args):
        import torch

        from colar_core.config import GenerationConfig

        self.model, self.encoder, self.device, self.args = model, encoder, device, args
        self.gen_cls = GenerationConfig
        self.generator = torch.Generator(device=device).manual_seed(args.seed)

    def gen(self, **kw):
        base = dict(do_sample=not self.args.greedy, sample_latents=True, batch_size=10**6,
                    max_cot_tokens=1, max_latents=1)
        return self.gen_cls(**(base | kw))

    def cot(self, questions, chain: int):
        """A CoT decode of exactly ``chain`` tokens + ``###`` + the answer tokens."""
        from colar_core.inference import generate_text

        a = self.args.answer_tokens
        out = generate_text(self.model, self.encoder, questions, 1,
                            self.gen(max_cot_tokens=chain + 1, max_answer_tokens=a), self.generator)
        bad = [g.n_tokens for g in out if g.n_tokens != chain + 1 + a]
        if bad:
            raise RuntimeError(f"CoT rows decoded {bad[:4]} tokens, expected {chain + 1 + a}: length forcing failed")
        return out

    def latent(self, questions, c: int, n_latents: int):
        """``n_latents`` latents at speed ``c``, ``###`` fed, then the answer tokens."""
        from colar_core.inference import generate_latent

        out = generate_latent(self.model, self.encoder, questions, c,
                              self.gen(max_latents=n_latents, max_answer_tokens=self.args.answer_tokens),
                              self.generator)
        bad = [g.n_latents for g in out if g.n_latents != n_latents]
        if bad:
            raise RuntimeError(f"latent rows ran {bad[:4]} latents, expected {n_latents}: length forcing failed")
        return out

    def timed(self, configs: dict) -> tuple[dict, dict, dict]:
        """Median seconds of each ``name -> fn`` (on the run's clock) after warm-up, repetitions
        interleaved; also every repetition, and the median wall-clock seconds."""
        for fn in configs.values():
            for _ in range(self.args.warmup):
                fn()
        times: dict[str, list] = {k: [] for k in configs}
        walls: dict[str, list] = {k: [] for k in configs}
        for _ in range(self.args.reps):
            for name, fn in configs.items():
                with common.Timer(self.device, self.args.clock) as t:
                    fn()
                times[name].append(t.seconds)
                walls[name].append(t.wall_s)
        med = {k: statistics.median(v) for k, v in times.items()}
        return med, times, {k: statistics.median(v) for k, v in walls.items()}

    def components(self, questions, n: int = 16) -> dict:
        """Milliseconds per call of the pieces of one step, on a live DecodeState (cache ~ the prompt)."""
        import torch

        from colar_core.inference import DecodeState, pick_tokens

        m, g = self.model, self.gen(max_answer_tokens=1)
        prompts = [self.encoder.prompt_ids(self.encoder.encode_question(q), 4) for q in questions]
        with torch.no_grad():
            with common.Timer(self.device, self.args.clock) as t_prefill:
                state = DecodeState(m, prompts, self.encoder.pad_id)
            keep = torch.ones(len(prompts), dtype=torch.bool, device=m.device)
            tok = pick_tokens(m.token_logits(state.hidden), g, self.generator)
            emb = m.embed(tok)
            pieces = {
                "decoder_step": lambda: state.feed(emb, keep),
                "lm_head_and_pick": lambda: pick_tokens(m.token_logits(state.hidden), g, self.generator),
                "embed": lambda: m.embed(tok),
                "latent_head_sample": lambda: m.latent_head.sample(state.hidden, sample=True, generator=self.generator),
            }
            out = {"prefill": 1000 * t_prefill.seconds}
            for name, fn in pieces.items():
                fn()
                with common.Timer(self.device, self.args.clock) as t:
                    for _ in range(n):
                        fn()
                out[name] = 1000 * t.seconds / n
        return out


def run_batch(bench: Bench, questions: list[str], args) -> dict:
    b = len(questions)
    s0, k = args.probe_start, args.probe_steps
    chain = args.cot_tokens
    n_lat = {c: math.ceil(chain / c) for c in args.factor_list}

    # per step: difference of two chain lengths, same prompt (speed 4 for latents, 1 for CoT)
    probe, probe_all, probe_wall = bench.timed({
        "latent_lo": lambda: bench.latent(questions, 4, s0),
        "latent_hi": lambda: bench.latent(questions, 4, s0 + k),
        "cot_lo": lambda: bench.cot(questions, s0),
        "cot_hi": lambda: bench.cot(questions, s0 + k),
    })
    latent_step = (probe["latent_hi"] - probe["latent_lo"]) / k
    token_step = (probe["cot_hi"] - probe["cot_lo"]) / k

    configs = {"cot": lambda: bench.cot(questions, chain)}
    for c in args.factor_list:
        configs[f"c{c}"] = (lambda c=c: bench.latent(questions, c, n_lat[c]))
    e2e, e2e_all, e2e_wall = bench.timed(configs)
    comps = bench.components(questions)
    prefill = comps["prefill"] / 1000

    a = args.answer_tokens
    return {
        "batch_size": b,
        "token_step_ms": 1000 * token_step,
        "latent_step_ms": 1000 * latent_step,
        "latent_step_over_token_step": latent_step / token_step if token_step > 0 else None,
        "e2e_ms": {k2: 1000 * v for k2, v in e2e.items()},
        "e2e_wall_ms": {k2: 1000 * v for k2, v in e2e_wall.items()},
        "questions_per_s": {k2: b / v for k2, v in e2e.items()},
        "over_cot": {k2: v / e2e["cot"] for k2, v in e2e.items() if k2 != "cot"},
        "decode_only_over_cot": {k2: (v - prefill) / (e2e["cot"] - prefill) for k2, v in e2e.items() if k2 != "cot"},
        "chain_lengths": {"cot": chain, **{f"c{c}": n for c, n in n_lat.items()}},
        # decoder forward calls per batch: the prompt, then one per fed token/latent; _decode_tokens
        # also feeds the last token it picks (see docs/BENCHMARKS.md)
        "decoder_calls": {"cot": 1 + chain + 1 + a, **{f"c{c}": 1 + n + 1 + a for c, n in n_lat.items()}},
        "components_ms": comps,
        "probe": {"start": s0, "extra_steps": k, "median_s": probe, "all_s": probe_all, "median_wall_s": probe_wall},
        "e2e_all_s": e2e_all,
        "prompt_tokens_mean": statistics.mean(
            len(bench.encoder.prompt_ids(bench.encoder.encode_question(q), 4)) for q in questions),
    }


def summary_line(b, res: dict) -> str:
    """One batch's result as a line; the step ratio is None when timing noise made the token step come
    out <= 0 (a few repetitions on a busy machine), and the line says so instead of failing."""
    ratio = res["latent_step_over_token_step"]
    ratio_text = f"x{ratio:.3f}" if ratio is not None else "ratio n/a: token step <= 0, raise --reps"
    line = (f"[inference_speed] batch {b}: token step {res['token_step_ms']:.2f} ms, latent step "
            f"{res['latent_step_ms']:.2f} ms ({ratio_text}); e2e "
            + ", ".join(f"{k} {v:.1f} ms" for k, v in res["e2e_ms"].items()))
    if "c4" in res["over_cot"]:
        line += f"; c4/cot {res['over_cot']['c4']:.3f}"
    return line


def main(argv: Optional[Sequence[str]] = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    common.apply_threads(args.threads)

    import torch

    from bench.sft_throughput import bench_encoder

    device = common.pick_device(args.device)
    shape = common.PROXY if args.proxy else common.TINY if args.tiny else common.LLAMA_3_2_1B
    dtype = torch.bfloat16
    encoder = bench_encoder()
    model = build_model(shape, device, encoder, args.seed, dtype)
    bench = Bench(model, encoder, device, args)
    all_q = make_questions(encoder, max(args.batch_list), args.question_tokens, args.length_spread, args.seed)

    batches = {}
    for b in args.batch_list:
        common.reset_peak_memory(device)
        res = run_batch(bench, all_q[:b], args)
        res["peak_memory_gib"] = common.peak_memory_gib(device)
        batches[str(b)] = res
        print(summary_line(b, res), flush=True)

    ratios = [v["latent_step_over_token_step"] for v in batches.values() if v["latent_step_over_token_step"]]
    c4 = [v["over_cot"]["c4"] for v in batches.values() if "c4" in v["over_cot"]]
    info = common.device_info(device)
    gpu = device.type == "cuda" and not args.tiny
    report = {
        "benchmark": "inference_speed",
        "device": common.describe_device(info),
        "device_info": info,
        "tiny": args.tiny,
        "proxy": args.proxy,
        "latent_step_over_token_step": max(ratios) if ratios else None,
        "c4_over_cot": max(c4) if c4 else None,
        "questions_per_s": {b: v["questions_per_s"] for b, v in batches.items()},
        "summary_note": "top-level ratios are the worst (largest) over the batch sizes",
        "batches": batches,
        "targets": {
            "latent_step_over_token_step": {"value": max(ratios) if ratios else None, "target": "<= 1.1",
                                            "met": (max(ratios) <= 1.1) if (gpu and ratios) else None},
            "c4_over_cot": {"value": max(c4) if c4 else None, "target": "<= 0.35",
                            "met": (max(c4) <= 0.35) if (gpu and c4) else None},
            "note": "targets apply to the full-size bf16 run on an H100" + ("" if gpu else "; this run is a smoke run"),
        },
        "config": {
            "model": shape.as_dict(), "dtype": "bfloat16", "batch_sizes": args.batch_list,
            "factors": args.factor_list, "cot_tokens": args.cot_tokens, "answer_tokens": args.answer_tokens,
            "question_tokens": args.question_tokens, "length_spread": args.length_spread, "reps": args.reps,
            "warmup": args.warmup, "sampling": "greedy" if args.greedy else "multinomial (temperature 1)",
            "latents": "sampled from the Gaussian head", "attn_implementation": model.causal_lm.config._attn_implementation,
            "forced_lengths": "###, EOS and pad logits masked to the dtype minimum in token_logits", "seed": args.seed,
            "threads": args.threads, "clock": args.clock,
        },
        "versions": common.versions(),
        "command": common.command_line(MODULE, argv),
        "timestamp": common.utc_now(),
    }
    common.write_report("inference_speed", report, args, device)
    return report


if __name__ == "__main__":
    main()
