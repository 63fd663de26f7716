"""What the reference's two extra SFT terms change in how latent chains stop (issue 25, item 1).

The terms (``ObjectiveConfig``): ``opening_think_label`` (a cross-entropy label on the ``###`` that opens
the steps block) and ``closing_think_latent`` (a latent-loss term at each row's last step group whose
target is the closing ``###``'s embedding). Both are on by default; ``off`` is colar's earlier objective.

For each variant the embedded default pipeline runs once (``colar run --json``), in a scratch copy of
this checkout's HEAD (``--overlay FILE`` copies files of the working tree over it, to measure uncommitted
changes), with its own ``COLAR_HOME`` (own MLflow + Prefect servers, stopped afterwards). Variants run
one after the other. Per compression factor c the script reports, from the evaluate stage's
``predictions.csv`` (the model after RL, as the default pipeline evaluates it) and, with ``--sft-eval``
(default), from the same evaluation of the sft-colar model before RL:

* accuracy (mean over seeds), mean #L, #L spread (standard deviation; 10/50/90th percentiles, max);
* the fraction of chains that hit the cap (``eval.generation.max_latents``, 32 in the default run);
* for the sft-colar model, the latent head's log-std before colar's clamp to [-10, 2] (range, share outside).

Usage::

    python -m bench.end_of_reasoning [--work DIR] [--overlay FILE ...] [--variants on,off] [--set KEY=V ...]
    python -m bench.end_of_reasoning --tiny [--seeds 11 --steps 200]   # seconds-scale check, four tiny problems
    python -m bench.end_of_reasoning --summarize DIR    # numbers from finished scratch copies (runs a missing
                                                        # sft-colar evaluation first, unless --no-sft-eval)

Writes ``bench/results/end_of_reasoning.json`` and prints a markdown table. Minutes per variant on a
2-core CPU: the default run (7-25) plus, with ``--sft-eval``, the extra evaluation (about the evaluate
stage's CoLaR part).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from statistics import mean, pstdev
from typing import Optional

from bench.common import RESULTS_DIR, ROOT

#: ``--set`` overrides of each variant; ``on`` is the embedded default, ``off`` colar's objective before
#: issue 25. ``colar-stage``: both terms in the CoLaR stage only (the CoT warm-up as before);
#: ``latent-only``: only the closing latent term.
VARIANTS: dict[str, list[str]] = {
    "on": [],
    "off": ["sft_cot.objective.opening_think_label=false", "sft_colar.objective.opening_think_label=false",
            "sft_colar.objective.closing_think_latent=false"],
    "colar-stage": ["sft_cot.objective.opening_think_label=false"],
    "latent-only": ["sft_cot.objective.opening_think_label=false", "sft_colar.objective.opening_think_label=false"],
}


def scratch_copy(dest: Path, overlay: list[str]) -> None:
    """HEAD of this checkout in ``dest`` (git archive), with the ``overlay`` files of the working tree on top."""
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "HEAD"], check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(dest, filter="data")
    for rel in overlay:
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, target)


def scratch_env(work: Path) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "RANK", "WORLD_SIZE", "LOCAL_RANK",
                        "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env.update(PYTHONPATH=str(work), COLAR_HOME=str(work / "home"), DO_NOT_TRACK="1", CI="1", PYTHONUNBUFFERED="1")
    return env


def run_variant(work: Path, overrides: list[str]) -> dict:
    """One ``colar run --json`` in ``work``; its wall time, exit code and JSON summary."""
    env = scratch_env(work)
    cmd = [sys.executable, "-m", "flows.cli", "run", "--json"]
    for o in overrides:
        cmd += ["--set", o]
    t0 = time.time()
    with open(work / "run.out", "w") as out, open(work / "run.err", "w") as err:
        rc = subprocess.run(cmd, cwd=work, env=env, stdout=out, stderr=err).returncode
    wall = time.time() - t0
    subprocess.run([sys.executable, "-m", "flows.cli", "servers", "stop"], cwd=work, env=env,
                   capture_output=True)
    text = (work / "run.out").read_text()
    try:  # the JSON object is the end of stdout (MLflow may print "View run" lines before it)
        summary = json.loads(text[text.index("\n{") + 1:] if not text.startswith("{") else text)
    except ValueError:
        summary = {}
    metrics = summary.get("metrics", {})
    return {"rc": rc, "wall_s": round(wall, 1), "command": " ".join(cmd[1:]), "summary": summary,
            "accuracy_ci95": {k.split("/")[-1]: v for k, v in metrics.items() if k.startswith("accuracy_ci95/test/")}}


def chain_stats(rows: list[dict], cap: int, data_groups: Optional[dict[str, int]] = None, c: int = 1) -> dict:
    """Accuracy, #L mean / spread and the share of chains at the cap, of one setting's prediction rows;
    with ``data_groups`` (question id -> the data chain's token count) also where chains stop against
    the data's own chain at this c (ceil(tokens / c) groups): the share exactly there, past it, short of it."""
    lengths = sorted(int(float(r["chain_length"])) for r in rows)
    seeds = sorted({r["seed"] for r in rows})
    acc = mean(mean(str(r["correct"]).lower() == "true" for r in rows if r["seed"] == s) for s in seeds)

    def q(p: float) -> int:
        return lengths[min(len(lengths) - 1, int(p * len(lengths)))]

    out = {"n": len(rows), "accuracy": round(acc, 4), "mean_L": round(mean(lengths), 2),
           "std_L": round(pstdev(lengths), 2), "p10_L": q(0.1), "p50_L": q(0.5), "p90_L": q(0.9),
           "max_L": lengths[-1], "at_cap": round(sum(n >= cap for n in lengths) / len(lengths), 4)}
    if data_groups:
        diff = [int(float(r["chain_length"])) - -(-data_groups[str(r["id"])] // c) for r in rows
                if str(r["id"]) in data_groups]
        if diff:
            out.update(stop_exact=round(sum(d == 0 for d in diff) / len(diff), 4),
                       stop_late=round(sum(d > 0 for d in diff) / len(diff), 4),
                       stop_early=round(sum(d < 0 for d in diff) / len(diff), 4))
    return out


def data_chain_tokens(work: Path) -> dict[str, int]:
    """Question id -> token count of its data chain (the steps as training encodes them), for the test
    split of the run in ``work``; empty when the run's prepared data or tokenizer is missing."""
    test, tok_dir = newest(work.glob("runs/prepare*/data/test.jsonl")), newest(work.glob("runs/prepare*/tokenizer"))
    if test is None or tok_dir is None:
        return {}
    from colar_core.data.readers import read_records
    from colar_core.text import PromptEncoder
    from colar_core.tokenizer import load_tokenizer

    encoder = PromptEncoder(load_tokenizer(str(tok_dir)))
    return {r.id: len(encoder.encode(r).step_ids) for r in read_records(str(test)).records}


def read_predictions(path: Path) -> dict[str, list[dict]]:
    """The rows of a ``predictions.csv`` (the primary set's, when it has a ``set`` column), by setting."""
    import pandas as pd  # the evaluate stage writes the file with pandas; read it back the same way

    raw = path.read_bytes().replace(b"\0", b"")  # a NUL byte in a decoded answer stops the parser
    frame = pd.read_csv(io.BytesIO(raw), lineterminator="\n",  # a bare \r inside an answer is not a row end
                        usecols=lambda c: c in ("setting", "seed", "id", "correct", "chain_length", "set"))
    if "set" in frame.columns:
        frame = frame[frame["set"] == frame["set"].iloc[0]]
    by_setting: dict[str, list[dict]] = {}
    for row in frame.to_dict("records"):
        by_setting.setdefault(str(row["setting"]), []).append(row)
    return by_setting


def newest(paths) -> Optional[Path]:
    paths = sorted(paths, key=lambda p: p.stat().st_mtime)
    return paths[-1] if paths else None


def evaluate_sft_model(work: Path, cap: int) -> Optional[Path]:
    """The default evaluation (c 1..3, seeds 0..2, first 200 test problems) of the sft-colar model, in a
    subprocess on the scratch copy's code; writes ``sft_predictions.csv`` in ``work``."""
    model = newest(work.glob("runs/sft-colar*/model/colar_config.json"))
    test = newest(work.glob("runs/prepare*/data/test.jsonl"))
    if model is None or test is None:
        return None
    out = work / "sft_predictions.csv"
    subprocess.run([sys.executable, "-m", "bench.end_of_reasoning", "--evaluate-model", str(model.parent),
                    "--data", str(test), "--cap", str(cap), "--csv", str(out)],
                   cwd=work, env=scratch_env(work), check=True)
    return out


def _evaluate_model(model_dir: str, data: str, cap: int, csv_path: str) -> None:
    import pandas as pd

    from colar_core.config import GenerationConfig
    from colar_core.data.readers import read_records
    from colar_core.evaluation import evaluate_latent
    from colar_core.model import ColarModel
    from colar_core.text import PromptEncoder

    records = read_records(data).records[:200]
    model, tok = ColarModel.load_dir(model_dir, is_trainable=False)
    gen = GenerationConfig(max_latents=cap, max_cot_tokens=64, batch_size=100)
    encoder = PromptEncoder(tok)
    _, rows = evaluate_latent(model, encoder, records, [1, 2, 3], [0, 1, 2], gen)
    pd.DataFrame(rows).to_csv(csv_path, index=False)
    Path(csv_path).with_suffix(".log_std.json").write_text(json.dumps(head_log_std(model, encoder, records)))


def head_log_std(model, encoder, records) -> dict:
    """The latent head's log-std before colar's clamp to [-10, 2], at every latent position of the
    records' training batches (r = 1, 2, 3): its range and the share outside the clamp."""
    import torch

    from colar_core.collate import collate

    values = []
    with torch.no_grad():
        for r in (1, 2, 3):
            batch = collate([encoder.encode(x) for x in records[:64]], encoder, r, generator=torch.Generator().manual_seed(0))
            inputs = model._packed(batch, model.embed(batch.prompt_ids),
                                   model.merger(model.embed(batch.group_ids), batch.group_token_mask),
                                   model.embed(batch.answer_ids))
            b, w, h = inputs.shape
            hidden, _ = model.run_decoder(inputs, None, torch.arange(w).unsqueeze(0).expand(b, -1))
            src = torch.cat([batch.latent_src, batch.end_latent_src])
            head = model.latent_head
            values.append(head.log_std(head.trunk(hidden.reshape(b * w, h)[src])).flatten())
    v = torch.cat(values)
    return {"min": float(v.min()), "max": float(v.max()), "mean": float(v.mean()),
            "outside_clamp": float(((v < -10) | (v > 2)).float().mean())}


def summarize(work_root: Path, variants: list[str], cap: int) -> dict:
    results: dict = {}
    for name in variants:
        work = work_root / name
        entry: dict = {}
        groups = data_chain_tokens(work)
        run = work / "variant.json"
        if run.exists():
            entry["run"] = json.loads(run.read_text())
        for label, csv_path in (("after_rl", newest(work.glob("runs/evaluate*/predictions.csv"))),
                                ("sft", work / "sft_predictions.csv")):
            if csv_path is None or not csv_path.exists():
                continue
            by_setting = read_predictions(csv_path)
            entry[label] = {setting: chain_stats(rows, cap, groups, int(setting[1:]))
                            for setting, rows in sorted(by_setting.items()) if re.fullmatch(r"c\d+", setting)}
            for baseline in ("cot", "nocot"):  # the text baselines of the evaluate stage: accuracy and tokens
                if baseline in by_setting and label == "after_rl":
                    st = chain_stats(by_setting[baseline], cap)
                    entry[baseline] = {"accuracy": st["accuracy"], "mean_tokens": st["mean_L"]}
        if (work / "sft_predictions.log_std.json").exists():
            entry["sft_head_log_std"] = json.loads((work / "sft_predictions.log_std.json").read_text())
        results[name] = entry
    return results


def markdown(results: dict) -> str:
    lines = ["| model | objective | c | accuracy | mean #L | std #L | #L p10/p50/p90 | max #L | at cap "
             "| stops at the data's length / later / earlier |",
             "|---|---|---|---|---|---|---|---|---|---|"]

    def pct(v) -> str:
        return "-" if v is None else f"{100 * v:.1f} %"

    for label in ("sft", "after_rl"):
        for name, entry in results.items():
            for c, s in entry.get(label, {}).items():
                lines.append(f"| {'sft-colar' if label == 'sft' else 'after RL'} | {name} | {c[1:]} | "
                             f"{pct(s['accuracy'])} | {s['mean_L']:.2f} | {s['std_L']:.2f} | "
                             f"{s['p10_L']}/{s['p50_L']}/{s['p90_L']} | {s['max_L']} | {pct(s['at_cap'])} | "
                             f"{pct(s.get('stop_exact'))} / {pct(s.get('stop_late'))} / {pct(s.get('stop_early'))} |")
    base = ["", "| objective | CoT accuracy | No-CoT accuracy |", "|---|---|---|"]
    for name, entry in results.items():
        if "cot" in entry:
            nocot = entry.get("nocot", {}).get("accuracy")
            base.append(f"| {name} | {100 * entry['cot']['accuracy']:.1f} % | "
                        f"{'-' if nocot is None else f'{100 * nocot:.1f} %'} |")
    return "\n".join(lines + (base if len(base) > 3 else []))


def tiny_overfit(seeds: int, steps: int, cap: int = 16, samples: int = 16) -> dict:
    """The seconds-scale version: the four tiny problems (bench/tiny.py), ``steps`` SFT steps alternating
    r = 1, 2, per training seed and variant; then ``samples`` sampled chains per problem at c = 1, 2 with
    ``cap`` latents at most. Returns per variant and c: accuracy, mean #L and chains at the cap, summed over seeds."""
    import torch

    from bench.tiny import PROBLEMS, encoder_for, tiny_model, tiny_tokenizer
    from colar_core.collate import collate
    from colar_core.config import GenerationConfig, ObjectiveConfig
    from colar_core.inference import generate

    tok = tiny_tokenizer()
    enc = encoder_for(tok)
    examples = [enc.encode(r) for r in PROBLEMS]
    questions = [p.question for p in PROBLEMS] * samples
    golds = [p.answer for p in PROBLEMS] * samples
    gen = GenerationConfig(max_latents=cap, max_answer_tokens=6)
    out: dict = {}
    for name in ("on", "off"):
        overrides = VARIANTS[name]
        flags = {o.split("=")[0].rsplit(".", 1)[1]: False for o in overrides if o.startswith("sft_colar.")}
        objective = ObjectiveConfig(compression_factors=[1, 2], **flags)
        stats = {c: {"chains": 0, "correct": 0, "latents": 0, "at_cap": 0} for c in (1, 2)}
        for seed in range(seeds):
            torch.manual_seed(seed)
            model = tiny_model(tok)
            opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
            rng = torch.Generator().manual_seed(seed)
            for step in range(steps):
                loss = model.sft_loss(collate(examples, enc, 1 + step % 2, generator=rng), objective, rng)["loss"]
                opt.zero_grad()
                loss.backward()
                opt.step()
            model.eval()
            for c in (1, 2):
                gens = generate(model, enc, questions, "latent", c, gen, seed=0)
                st = stats[c]
                st["chains"] += len(gens)
                st["correct"] += sum((g.answer or "").strip() == a for g, a in zip(gens, golds))
                st["latents"] += sum(g.n_latents for g in gens)
                st["at_cap"] += sum(g.n_latents >= cap for g in gens)
        out[name] = {f"c{c}": {"chains": st["chains"], "accuracy": round(st["correct"] / st["chains"], 4),
                               "mean_L": round(st["latents"] / st["chains"], 2), "at_cap": st["at_cap"]}
                     for c, st in stats.items()}
    return out


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="/tmp/colar-end-of-reasoning", help="scratch root; one folder per variant")
    ap.add_argument("--overlay", nargs="*", default=[], help="working-tree files copied over the HEAD archive")
    ap.add_argument("--variants", default="on,off")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="extra --set for every variant")
    ap.add_argument("--cap", type=int, default=32, help="eval.generation.max_latents of the runs (default run: 32)")
    ap.add_argument("--no-sft-eval", dest="sft_eval", action="store_false")
    ap.add_argument("--summarize", metavar="DIR", help="only read finished scratch copies under DIR")
    ap.add_argument("--out", default=str(RESULTS_DIR / "end_of_reasoning.json"))
    ap.add_argument("--tiny", action="store_true", help="only the seconds-scale check on the four tiny problems")
    ap.add_argument("--seeds", type=int, default=11, help="--tiny: training seeds per variant")
    ap.add_argument("--steps", type=int, default=200, help="--tiny: SFT steps per model")
    # internal: the sft-colar evaluation, run in the scratch copy's interpreter environment
    ap.add_argument("--evaluate-model", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--csv", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.evaluate_model:
        _evaluate_model(args.evaluate_model, args.data, args.cap, args.csv)
        return 0
    if args.tiny:
        tiny = tiny_overfit(args.seeds, args.steps)
        out = Path(args.out).with_name("end_of_reasoning_tiny.json")
        out.write_text(json.dumps(tiny, indent=2, sort_keys=True))
        print(json.dumps(tiny, indent=2, sort_keys=True))
        return 0
    variants = [v for v in args.variants.split(",") if v]
    root = Path(args.summarize or args.work)
    for name in variants:
        work = root / name
        if not args.summarize:
            if work.exists():
                shutil.rmtree(work)
            scratch_copy(work, args.overlay)
            print(f"[{name}] scratch copy {work}; running the default pipeline", flush=True)
            info = run_variant(work, VARIANTS[name] + args.overrides)
            (work / "variant.json").write_text(json.dumps({k: v for k, v in info.items() if k != "summary"}, indent=2))
            print(f"[{name}] exit {info['rc']} after {info['wall_s']} s", flush=True)
        if args.sft_eval and not (work / "sft_predictions.csv").exists():
            print(f"[{name}] evaluating the sft-colar model", flush=True)
            if evaluate_sft_model(work, args.cap) is None:
                print(f"[{name}] no finished sft-colar model under {work}/runs", flush=True)
    results = summarize(root, variants, args.cap)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2, sort_keys=True))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
