"""The GPU session: every GPU benchmark in one command of at most ``GPU_SESSION_BUDGET_S`` seconds.

``bash bench/gpu_session.sh`` (the device entry: wheels, environment) runs this. Four parts, in order,
each a subprocess under its own time limit, each recorded in one summary JSON that is rewritten after
every part, so a part that runs past its budget (killed, ``timed_out``) or fails leaves the others'
numbers in place:

* ``sft_deepspeed``, ``sft_torch``: ``bench.sft_throughput`` on the Llama-3.2-1B architecture (random
  weights, ``colar_core/archs/llama-3.2-1b-instruct.json``), LoRA r=128 / alpha 32 on q_proj, v_proj as
  the GPU recipe, the CoT SFT step against the CoLaR SFT step, tokens/s and MFU; under DeepSpeed ZeRO-2
  bf16, then the plain torch engine (bf16 autocast).
* ``inference``: ``bench.inference_speed`` at batch 1 and 64: the latent step against the token step,
  and CoLaR chains against a CoT chain end to end.
* ``smollm2``: ``bench.smollm2_gsm8k``: SmolLM2-135M-Instruct (its GGUF, carried: see
  ``bench/gpu_session.sh``) on real GSM8K through the pipeline's stages (data, CoT SFT, CoLaR SFT,
  evaluation), timed.

Budgets: the parts' shares of the budget (:data:`SHARES`); a part may also use what the parts before it
left unused, never the reserve kept for the summary. ``GPU_SESSION_BUDGET_<PART>_S`` fixes one part's
budget (e.g. ``GPU_SESSION_BUDGET_SMOLLM2_S=60``).

    python -m bench.gpu_session                 # full size: bench/results/gpu_session_<device>.json
    python -m bench.gpu_session --tiny          # CPU size, a few minutes: gpu_session_<device>_tiny.json
    python -m bench.gpu_session --prepare-carry # here, before the device calls: split SmolLM2's GGUF to carry
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from bench import common

MODULE = "bench.gpu_session"
PARTS = ("sft_deepspeed", "sft_torch", "inference", "smollm2")
#: Each part's share of the budget; the rest is the reserve for writing the summary.
SHARES = {"sft_deepspeed": 0.25, "sft_torch": 0.20, "inference": 0.20, "smollm2": 0.30}
DEFAULT_BUDGET_S = 540.0  # a device call runs at most 600 s; the wheels' install and the copy need the rest
MIN_START_S = 5.0  # with less of the session's time than this left, a part is skipped, not started

#: Where ``--prepare-carry`` leaves SmolLM2's GGUF in two parts, and where the device finds them: ignored by
#: git (``build/``), each carried by its own device call (the whole GGUF is over one call's 64 MiB).
CARRY_DIR = Path("build") / "gpu-session"
SMOLLM2_PARTS = ("smollm2-a", "smollm2-b")

#: The recipe's LoRA (configs/gsm8k.yaml): r=128, alpha 32 on q_proj, v_proj; at the tiny size (hidden 64) r=8.
_LORA = "--lora-alpha 32 --lora-targets q_proj,v_proj"
_SFT_TINY = "--tiny --isolate none --steps 2 --warmup 1 --micro-batch 2 --seq-len 16 --question-tokens 10 "
_SFT_TINY += f"--step-tokens 12 --answer-tokens 4 --lora-r 8 {_LORA}"
_INFERENCE_TINY = "--tiny --batch-sizes 1,4 --factors 2,4 --reps 3 --warmup 1 --probe-start 2 --probe-steps 8 "
_INFERENCE_TINY += "--cot-tokens 8 --question-tokens 20"
#: part -> (module, arguments at full size, arguments at the tiny size); each also gets ``--out``.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "sft_deepspeed": (
        "bench.sft_throughput",
        f"--backend deepspeed --phases cot,colar --lora-r 128 {_LORA}",
        f"--backend deepspeed --phases cot,colar {_SFT_TINY}",
    ),
    "sft_torch": (
        "bench.sft_throughput",
        f"--backend torch --phases cot,colar --lora-r 128 {_LORA}",
        f"--backend torch --phases cot,colar {_SFT_TINY}",
    ),
    "inference": ("bench.inference_speed", "--batch-sizes 1,64", _INFERENCE_TINY),
    "smollm2": ("bench.smollm2_gsm8k", "", "--tiny"),
}


# ----------------------------------------------------------------------------------------------
# Budgets
# ----------------------------------------------------------------------------------------------
def part_budgets(total: float, parts: Sequence[str], env: Optional[dict] = None) -> dict[str, float]:
    """Seconds each part may run: its share of ``total`` (shares of the parts not run are not handed
    on), or ``GPU_SESSION_BUDGET_<PART>_S`` from ``env``."""
    values = os.environ if env is None else env
    out = {}
    for part in parts:
        key = f"GPU_SESSION_BUDGET_{part.upper()}_S"
        out[part] = float(values[key]) if values.get(key) else SHARES[part] * total
    return out


def reserve_s(total: float) -> float:
    return total * (1 - sum(SHARES.values()))


# ----------------------------------------------------------------------------------------------
# Running a part
# ----------------------------------------------------------------------------------------------
def run_part(cmd: list[str], timeout: float, log: Path, env: dict) -> tuple[str, Optional[int], float]:
    """Run ``cmd`` in a process group of its own, output to ``log``; past ``timeout`` seconds the group
    gets SIGTERM, then SIGKILL 10 s later. Returns (status ok | failed | timed_out, exit code, seconds)."""
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            cmd, cwd=common.ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            rc = proc.wait(timeout=max(timeout, 0.1))
        except subprocess.TimeoutExpired:
            _stop_group(proc)
            return "timed_out", proc.returncode, time.perf_counter() - t0
    return ("ok" if rc == 0 else "failed"), rc, time.perf_counter() - t0


def _stop_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# ----------------------------------------------------------------------------------------------
# The numbers each part reports (the summary's headline; the part's whole JSON is kept beside them)
# ----------------------------------------------------------------------------------------------
def sft_numbers(r: dict) -> dict:
    out: dict = {}
    for phase in ("cot", "colar"):
        if phase in r:
            p = r[phase]
            out.update(
                {
                    f"{phase}_tokens_per_s": p["tokens_per_s"],
                    f"{phase}_mfu": p["mfu"],
                    f"{phase}_mfu_6n": p["mfu_6n"],
                    f"{phase}_tflops": p["tflops"],
                    f"{phase}_step_ms": p["step_time_ms"],
                }
            )
    if "colar_over_cot_tokens_per_s" in r:
        out["colar_over_cot_tokens_per_s"] = r["colar_over_cot_tokens_per_s"]
    return out


def inference_numbers(r: dict) -> dict:
    out: dict = {}
    for b, v in r.get("batches", {}).items():
        out.update(
            {
                f"b{b}_token_step_ms": v["token_step_ms"],
                f"b{b}_latent_step_ms": v["latent_step_ms"],
                f"b{b}_latent_over_token_step": v["latent_step_over_token_step"],
                f"b{b}_cot_questions_per_s": v["questions_per_s"]["cot"],
            }
        )
        for k, ratio in v["over_cot"].items():
            out[f"b{b}_{k}_over_cot"] = ratio
    return out


def smollm2_numbers(r: dict) -> dict:
    out: dict = {}
    stages = r.get("stages", {})
    for name, s in stages.items():
        out[f"{name}_s"] = s["seconds"]
        if "tokens_per_s" in s:
            out[f"{name}_tokens_per_s"] = s["tokens_per_s"]
    for key, v in stages.get("eval", {}).items():
        if isinstance(v, dict) and "questions_per_s" in v:
            out[f"eval_{key}_questions_per_s"] = v["questions_per_s"]
    return out


def smollm2_quality(r: dict) -> dict:
    """Accuracy and chain length per setting (not in ``numbers``: an accuracy of 0 is a result)."""
    ev = r.get("stages", {}).get("eval", {})
    return {
        k: {"accuracy": v["accuracy"], "mean_length": v["mean_length"]}
        for k, v in ev.items()
        if isinstance(v, dict) and "accuracy" in v
    }


NUMBERS: dict[str, Callable[[dict], dict]] = {
    "sft_deepspeed": sft_numbers,
    "sft_torch": sft_numbers,
    "inference": inference_numbers,
    "smollm2": smollm2_numbers,
}


def is_good_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


# ----------------------------------------------------------------------------------------------
# SmolLM2's GGUF: carried in two parts, joined and checked on the device
# ----------------------------------------------------------------------------------------------
def smollm2_meta() -> dict:
    from colar_core.gguf_import import SMOLLM2

    return SMOLLM2


def find_smollm2_gguf(work: Path, root: Path = common.ROOT) -> tuple[Optional[Path], str]:
    """(the GGUF, how it was found) or (None, why not): ``$GPU_SESSION_GGUF``; else the carried parts
    under ``build/gpu-session/smollm2-*/``, joined into ``work`` and checked against the wheel's sha256;
    else the file ``colar model fetch-smollm2`` left in the cache."""
    meta = smollm2_meta()
    name = Path(meta["member"]).name
    if os.environ.get("GPU_SESSION_GGUF"):
        path = Path(os.environ["GPU_SESSION_GGUF"]).expanduser()
        return (path, "$GPU_SESSION_GGUF") if path.is_file() else (None, f"$GPU_SESSION_GGUF={path}: no such file")
    parts = [root / CARRY_DIR / d / f"{name}.part{i + 1}" for i, d in enumerate(SMOLLM2_PARTS)]
    present = [p for p in parts if p.is_file()]
    if present:
        missing = [str(p.relative_to(root)) for p in parts if not p.is_file()]
        if missing:
            return None, (
                f"carried part(s) missing: {', '.join(missing)} (each part travels in its own device "
                "call; the machine went back between them?)"
            )
        joined = work / name
        digest = hashlib.sha256()
        with open(joined, "wb") as out:
            for p in parts:
                with open(p, "rb") as fh:
                    while chunk := fh.read(1 << 20):
                        digest.update(chunk)
                        out.write(chunk)
        if digest.hexdigest() != meta["sha256"]:
            return None, f"the carried parts join to sha256 {digest.hexdigest()}, expected {meta['sha256']}"
        return joined, f"joined from {', '.join(str(p.relative_to(root)) for p in parts)}"
    from colar_core.gguf_import import cache_root

    cached = cache_root() / "smollm2" / name
    if cached.is_file():
        return cached, f"the fetch-smollm2 cache ({cached})"
    return None, (
        f"no SmolLM2 GGUF: carry {CARRY_DIR}/{SMOLLM2_PARTS[0]} and {CARRY_DIR}/{SMOLLM2_PARTS[1]} "
        f"(python -m {MODULE} --prepare-carry), set $GPU_SESSION_GGUF, or run `colar model fetch-smollm2`"
    )


def prepare_carry(root: Path = common.ROOT) -> int:
    """Here, before the device calls: fetch SmolLM2's GGUF if needed and split it in two under
    ``build/gpu-session/``, then say what each device call carries and whether it fits 64 MiB."""
    from colar_core.gguf_import import fetch_smollm2

    gguf = fetch_smollm2()
    size = gguf.stat().st_size
    cut = min(size, 50 * 2**20)  # part 1 travels with the tree alone; part 2 with the tree and the wheels
    name = gguf.name
    with open(gguf, "rb") as fh:
        for i, (d, n) in enumerate(zip(SMOLLM2_PARTS, (cut, size - cut))):
            folder = root / CARRY_DIR / d
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{name}.part{i + 1}").write_bytes(fh.read(n))
    tree = _tree_bytes(root)
    wheels = sum(p.stat().st_size for p in (root / ".whl").glob("*.whl")) if (root / ".whl").is_dir() else 0
    limit = 64 * 2**20
    mib = 2**20
    print(
        f"SmolLM2 GGUF {size / mib:.1f} MiB split into {CARRY_DIR}/{SMOLLM2_PARTS[0]} ({cut / mib:.1f} MiB) "
        f"and {CARRY_DIR}/{SMOLLM2_PARTS[1]} ({(size - cut) / mib:.1f} MiB); the working tree is {tree / mib:.1f} "
        f"MiB, .whl {wheels / mib:.1f} MiB"
    )
    calls = (
        (cut + tree, f'carry ["{CARRY_DIR}/{SMOLLM2_PARTS[0]}"]'),
        (size - cut + tree + wheels, f'carry [".whl", "{CARRY_DIR}/{SMOLLM2_PARTS[1]}"]'),
    )
    for i, (n, what) in enumerate(calls, 1):
        print(
            f"device call {i}: {what}: {n / mib:.1f} MiB of the 64 MiB a call may carry"
            + ("" if n < limit else "  <-- OVER THE LIMIT")
        )
    missing = [
        w for w in ("deepspeed", "pydantic", "pydantic_core", "gguf") if not list((root / ".whl").glob(f"{w}-*"))
    ]
    if missing:
        print(f"missing from .whl: {', '.join(missing)}: run `bash ../shared/gpu/make-wheels.sh gguf==0.19.0`")
    return 0 if not missing and all(n < limit for n, _ in calls) else 1


def _tree_bytes(root: Path) -> int:
    """Bytes of what a device call sends besides carried paths: tracked and untracked-not-ignored files."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=root,
        capture_output=True,
        check=True,
    ).stdout
    return sum((root / f).stat().st_size for f in out.decode().split("\0") if f and (root / f).is_file())


# ----------------------------------------------------------------------------------------------
# The session
# ----------------------------------------------------------------------------------------------
def device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="CPU size (each script's smoke size; automatic without CUDA)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument(
        "--budget-s",
        type=float,
        help=f"seconds for the whole session (default $GPU_SESSION_BUDGET_S or {DEFAULT_BUDGET_S:.0f})",
    )
    p.add_argument("--out", help="summary JSON (default bench/results/gpu_session_<device>[_tiny].json)")
    p.add_argument("--work", help="folder for the parts' files and logs (default: a fresh temporary one)")
    p.add_argument(
        "--prepare-carry",
        action="store_true",
        help="here, before the device calls: split SmolLM2's GGUF into the two carried parts",
    )
    args = p.parse_args(argv)
    args.part_list = [x.strip() for x in args.parts.split(",") if x.strip()]
    bad = [x for x in args.part_list if x not in PARTS]
    if bad or not args.part_list:
        p.error(f"--parts: unknown {bad}; choose from {','.join(PARTS)}")
    if args.budget_s is None:
        args.budget_s = float(os.environ.get("GPU_SESSION_BUDGET_S") or DEFAULT_BUDGET_S)
    return args


def main(argv: Optional[Sequence[str]] = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.prepare_carry:
        raise SystemExit(prepare_carry())
    t0 = time.perf_counter()
    name = device_name()
    tiny = args.tiny or name == "cpu"
    out = Path(args.out) if args.out else common.RESULTS_DIR / f"gpu_session_{slug(name)}{'_tiny' if tiny else ''}.json"
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="colar-gpu-session-"))
    work.mkdir(parents=True, exist_ok=True)
    budgets = part_budgets(args.budget_s, args.part_list)
    deadline = t0 + args.budget_s - reserve_s(args.budget_s)
    peak, source = common.peak_bf16_flops(name)
    summary: dict = {
        "benchmark": "gpu_session",
        "device_name": name,
        "device_slug": slug(name),
        "tiny": tiny,
        "budget_s": args.budget_s,
        "part_budgets_s": budgets,
        "peak_bf16_tflops": peak / 1e12,
        "peak_source": source,
        "parts": {},
        "command": common.command_line(MODULE, argv),
        "timestamp": common.utc_now(),
        "versions": common.versions(),
    }
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(common.ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("PYTHONUNBUFFERED", "1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):  # each part is a job of its own
        env.pop(var, None)
    if tiny:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the tiny size runs on the CPU, as the scripts' smoke runs do

    unused = 0.0
    for part in args.part_list:
        module, full, small = COMMANDS[part]
        extra = (small if tiny else full).split()
        rec: dict = {"budget_s": budgets[part]}
        summary["parts"][part] = rec
        if part == "smollm2":
            gguf, how = find_smollm2_gguf(work) if not tiny or os.environ.get("GPU_SESSION_GGUF") else (None, "")
            if gguf is not None:
                extra += ["--gguf", str(gguf)]
                rec["gguf"] = how
            elif not tiny:
                rec.update(status="skipped", reason=how, numbers={})
                print(f"[gpu_session] {part}: skipped: {how}", flush=True)
                _write(out, summary, t0)
                continue
        left = deadline - time.perf_counter()
        if left < MIN_START_S:
            rec.update(status="skipped", reason=f"{max(left, 0):.0f} s left of the session's budget", numbers={})
            print(f"[gpu_session] {part}: skipped ({max(left, 0):.0f} s left)", flush=True)
            _write(out, summary, t0)
            continue
        timeout = min(budgets[part] + unused, left)
        result_file = work / f"{part}.json"
        cmd = [sys.executable, "-m", module, *extra, "--out", str(result_file)]
        rec.update(command="python " + " ".join(cmd[1:]), timeout_s=round(timeout, 1))
        print(f"[gpu_session] {part}: {module} (limit {timeout:.0f} s)", flush=True)
        log = work / f"{part}.log"
        status, rc, secs = run_part(cmd, timeout, log, env)
        _bring_back(log, f"gpu_session_{part}.log")
        unused = max(0.0, budgets[part] + unused - secs)
        rec.update(status=status, exit_code=rc, elapsed_s=round(secs, 1))
        result = json.loads(result_file.read_text()) if result_file.is_file() else None
        rec["numbers"] = NUMBERS[part](result) if result else {}
        if part == "smollm2" and result:
            rec["quality"] = smollm2_quality(result)
        if status != "ok":
            rec["log_tail"] = _tail(work / f"{part}.log")
        rec["result"] = result
        print(
            f"[gpu_session] {part}: {status} after {secs:.0f} s: "
            + ", ".join(f"{k} {v:.4g}" for k, v in rec["numbers"].items() if is_good_number(v)),
            flush=True,
        )
        _write(out, summary, t0)
    summary["complete"] = True
    path = _write(out, summary, t0)
    print(f"[gpu_session] wrote {path} ({time.perf_counter() - t0:.0f} s)", flush=True)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return summary


def _write(out: Path, summary: dict, t0: float) -> Path:
    """Write the summary, and a copy into ``$OUT`` when set (what the device tool brings back, also when
    the call is stopped at its limit)."""
    summary["wall_s"] = round(time.perf_counter() - t0, 1)
    path = common.write_json(out, summary)
    _bring_back(path, path.name)
    return path


def _bring_back(path: Path, name: str) -> None:
    if os.environ.get("OUT") and path.is_file():
        dest = Path(os.environ["OUT"])
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dest / name)


if __name__ == "__main__":
    main()
