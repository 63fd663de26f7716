"""Do a latent's nearest tokens hold the number the chain of thought has at that place?

``colar inspect`` and the evaluate stage's ``thoughts.html`` show, for each latent step, the
vocabulary tokens nearest to the latent (:mod:`colar_core.latent_inspect`). This script counts how
often they name the right number, on a trained model folder and the test questions of its data:

* **place** (:func:`colar_core.latent_inspect.chain_place`): at compression factor ``c``, latent ``k``
  (0-based) stands for tokens ``[k*c, (k+1)*c)`` of the chain, as training merges them;
* **a place with a number**: one whose tokens spell at least one number (``as_number``); only those count;
* **hit**: one of the latent's ``top-k`` nearest tokens spells a number of its place
  (:func:`~colar_core.latent_inspect.number_hit`); the **hit rate** is hits over the places with a number
  that the latent chain reaches (``reached``: the share of such places it reaches at all, reported beside);
* **chains** compared: the data's (the steps the latents were trained to compress, tokenized as training
  does) and the CoT text the same trained model writes for the question (explicit decoding at speed 1);
* **baselines**: *shuffled*: the trained model's latents of question ``i`` against the chains of another
  question (a random derangement, so the numbers a latent names are scored against a chain of the same
  kind); *random init*: a model of the same shape with fresh weights (``AutoModelForCausalLM.from_config``,
  a new latent head, its embedding scale measured), against the same chains.

Decoding is evaluation's (latents sampled from the head, tokens sampled at temperature 1, top-p 0.9;
``--greedy``: the head's means and argmax tokens), one seed, at most 32 latents (the default config's
``eval.generation``). One torch thread.

    python -m bench.thoughts                                   # the model a default `colar run` left in ./runs
    python -m bench.thoughts --runs DIR                        # ... in another output_dir
    python -m bench.thoughts --model DIR --data TEST.jsonl     # any model folder and test file

With ``--runs`` (default ``runs``, the default config's ``output_dir``) it takes the newest
``rl-*/model`` (else ``sft-colar-*/model``) and the newest ``prepare-*/data/test.jsonl`` there.
Results: ``bench/results/thoughts_<device>[_greedy].json`` (``--out`` overrides).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional, Sequence

from bench.common import command_line, describe_device, device_info, utc_now, versions, write_json

FACTORS = (1, 2, 3)
#: The default config's eval.generation: what the evaluate stage decodes.
MAX_LATENTS, MAX_COT_TOKENS, MAX_ANSWER_TOKENS = 32, 64, 16


def newest(root: Path, pattern: str) -> Optional[Path]:
    found = sorted(root.glob(pattern), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def find_inputs(runs: Path) -> tuple[Path, Path]:
    """The newest CoLaR model folder (after RL when it ran) and test split under a pipeline output_dir."""
    model = newest(runs, "rl-*/model") or newest(runs, "sft-colar-*/model")
    data = newest(runs, "prepare-*/data/test.jsonl")
    if model is None or data is None:
        raise SystemExit(f"no CoLaR model (rl-*/model, sft-colar-*/model) or test split (prepare-*/data/test.jsonl) "
                         f"under {runs}: run `colar run` there first, or pass --model DIR --data FILE")
    return model, data


def random_like(model, seed: int):
    """A ColarModel of ``model``'s shape with fresh weights: the backbone from its config (Hugging
    Face's initialisation), a new latent head, the embedding scale measured on the new table."""
    import torch
    from transformers import AutoModelForCausalLM

    from colar_core.latent_head import LatentHead
    from colar_core.model import ColarModel, measured_embedding_scale
    from colar_core.number_tokens import input_embedding_table

    torch.manual_seed(seed)
    lm = AutoModelForCausalLM.from_config(model.causal_lm.config)
    state = model.state
    head = LatentHead(state.hidden_size, state.latent_intermediate_size, state.deterministic_latents)
    fresh = replace(state, embedding_scale=measured_embedding_scale(input_embedding_table(lm)),
                    embedding_scale_source="measured", lora=None)
    return ColarModel(lm, head.to(lm.dtype), fresh).eval()


def derangement(n: int, seed: int) -> list[int]:
    """``perm[i] != i`` for every i (n >= 2): a random order, each element paired with the next in it."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    perm = [0] * n
    for j, i in enumerate(order):
        perm[i] = order[(j + 1) % n]
    return perm


def score(chains, compared: Sequence, top_k: int) -> dict:
    """Hit counts of latent chains (one per question) against the text chain at the same index of
    ``compared`` (module docstring): ``hits`` and ``reached`` places with a number, ``places`` in all."""
    from colar_core.latent_inspect import as_number, chain_place, number_hit

    hits = reached = places = 0
    hits_top1 = 0
    for chain, text in zip(chains, compared):
        c = int(chain.compression)
        n_groups = -(-len(text.tokens) // c)
        for k in range(n_groups):
            place = chain_place(text.tokens, c, k)
            if all(as_number(t) is None for t in place):
                continue
            places += 1
            if k >= chain.n_steps:
                continue
            reached += 1
            hits += bool(number_hit(chain.steps[k], place, top_k))
            hits_top1 += bool(number_hit(chain.steps[k], place, 1))
    return {"hits": hits, "hits_top1": hits_top1, "reached": reached, "places": places,
            "hit_rate": hits / reached if reached else None, "hit_rate_top1": hits_top1 / reached if reached else None,
            "reached_share": reached / places if places else None}


def measure(model, encoder, records, factors: Sequence[int], gen, seed: int, top_k: int,
            random_model=None) -> dict:
    """Hit rates of ``model`` (and of ``random_model`` when given) on ``records`` at each factor, against
    the data's chains and the model's own CoT text, with the shuffled pairing (module docstring)."""
    from colar_core.latent_inspect import cot_chains, latent_chains, reference_chain

    questions = [r.question for r in records]
    data = [reference_chain(encoder, r) for r in records]
    own_cot = cot_chains(model, encoder, questions, "CoT (same model)", gen, seed)
    perm = derangement(len(records), seed)
    compared = {"data": data, "cot": own_cot}
    out: dict = {"n_questions": len(records), "cot_chain_tokens": sum(len(c.tokens) for c in own_cot) / len(own_cot),
                 "by_c": {}}
    for c in factors:
        row: dict = {}
        chains = latent_chains(model, encoder, questions, c, gen, seed, top_k)
        row["mean_latents"] = sum(ch.n_steps for ch in chains) / len(chains)
        for name, texts in compared.items():
            row[f"trained/{name}"] = score(chains, texts, top_k)
            row[f"shuffled/{name}"] = score(chains, [texts[perm[i]] for i in range(len(texts))], top_k)
        if random_model is not None:
            rand = latent_chains(random_model, encoder, questions, c, gen, seed, top_k)
            row["random_init/mean_latents"] = sum(ch.n_steps for ch in rand) / len(rand)
            for name, texts in compared.items():
                row[f"random_init/{name}"] = score(rand, texts, top_k)
        out["by_c"][str(c)] = row
    return out


def table(result: dict) -> str:
    """The hit rates as a markdown table (one row per c and latent source)."""
    lines = ["| c | latents | #L | vs data chain @k (top-1) | reached | vs own CoT @k (top-1) | reached |",
             "| --- | --- | --- | --- | --- | --- | --- |"]

    def pct(x):
        return "n/a" if x is None else f"{100 * x:.1f}%"

    for c, row in result["by_c"].items():
        for source in ("trained", "shuffled", "random_init"):
            if f"{source}/data" not in row:
                continue
            n_lat = row["random_init/mean_latents"] if source == "random_init" else row["mean_latents"]
            d, o = row[f"{source}/data"], row[f"{source}/cot"]
            lines.append(f"| {c} | {source.replace('_', ' ')} | {n_lat:.1f} | {pct(d['hit_rate'])} "
                         f"({pct(d['hit_rate_top1'])}) | {pct(d['reached_share'])} | {pct(o['hit_rate'])} "
                         f"({pct(o['hit_rate_top1'])}) | {pct(o['reached_share'])} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.thoughts", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default="runs", help="a pipeline output_dir to take the model and test split from")
    parser.add_argument("--model", help="a CoLaR model folder (instead of --runs)")
    parser.add_argument("--data", help="a test split (.jsonl; instead of --runs)")
    parser.add_argument("--n", type=int, default=200, help="first N test questions (default 200)")
    parser.add_argument("--c", type=int, nargs="+", default=list(FACTORS))
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--greedy", action="store_true", help="latent means and argmax tokens")
    parser.add_argument("--out", help="result JSON (default bench/results/thoughts_<device>[_greedy].json)")
    args = parser.parse_args(argv)

    import torch

    from colar_core.config import GenerationConfig
    from colar_core.data.prepare import load_split
    from colar_core.model import ColarModel
    from colar_core.text import PromptEncoder

    torch.set_num_threads(1)
    if args.model or args.data:
        if not (args.model and args.data):
            parser.error("--model and --data go together")
        model_dir, data_file = Path(args.model), Path(args.data)
    else:
        model_dir, data_file = find_inputs(Path(args.runs))
    t0 = time.perf_counter()
    model, tokenizer = ColarModel.load_dir(model_dir, is_trainable=False)
    encoder = PromptEncoder(tokenizer)
    records = load_split(data_file)[: args.n]
    gen = GenerationConfig(max_latents=MAX_LATENTS, max_cot_tokens=MAX_COT_TOKENS, max_answer_tokens=MAX_ANSWER_TOKENS,
                           sample_latents=not args.greedy, do_sample=not args.greedy)
    result = measure(model, encoder, records, args.c, gen, args.seed, args.top_k, random_like(model, args.seed))
    info = device_info(torch.device("cpu"))
    report = {"benchmark": "thoughts", "command": command_line("bench.thoughts", argv), "utc": utc_now(),
              "device": info, "versions": versions(), "model": str(model_dir.resolve()),
              "data": str(data_file.resolve()), "top_k": args.top_k, "seed": args.seed, "greedy": args.greedy,
              "generation": gen.model_dump(), "wall_s": round(time.perf_counter() - t0, 1), **result}
    out = Path(args.out) if args.out else (Path(__file__).resolve().parent / "results"
                                           / f"thoughts_cpu{'_greedy' if args.greedy else ''}.json")
    write_json(out, report)
    print(f"{describe_device(info)}; {len(records)} questions of {data_file}; model {model_dir}; "
          f"{report['wall_s']} s")
    print(table(report))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
