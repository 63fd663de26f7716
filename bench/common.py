"""Shared pieces of the benchmarks: device and version info, CUDA-synchronised timing, model
shapes, FLOP counting (MFU) and result files.

FLOP convention (used by ``sft_throughput``; see docs/BENCHMARKS.md):

* dense training FLOPs = ``6 * N * T``: N parameters doing a matmul per token (forward 2, backward
  4), T tokens. With tied embeddings the table is counted once, as the LM-head matmul (the input
  lookup is not a matmul).
* attention training FLOPs = ``12 * L * d * n`` per token of a row of ``n`` tokens (QK^T and AV,
  2 FLOPs per MAC, x3 for forward + backward), with ``d = heads * head_dim``; the PaLM convention,
  which does not halve for the causal mask.
* MFU = achieved model FLOP/s / peak; peak = 989 TFLOP/s, the H100 SXM dense bf16 spec figure
  (about 800 is reachable in practice, so 100 % MFU is not).
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

#: The repository root: where the benchmarks and the tests start `python -m ...` subprocesses.
ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "bench" / "results"

#: H100 SXM dense bf16 tensor-core peak from the spec sheet (FLOP/s). Used for every MFU figure.
H100_BF16_PEAK_FLOPS = 989e12


# ----------------------------------------------------------------------------------------------
# Model shapes
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LlamaShape:
    """The few numbers that define a Llama-style backbone for the benchmarks."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool = True
    rope_theta: float = 500000.0
    llama3_rope_scaling: bool = True
    max_position_embeddings: int = 131072
    rms_norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def hf_config(self, bos_id: int = 0, eos_id: int = 1, pad_id: Optional[int] = None):
        from transformers import LlamaConfig

        rope = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.llama3_rope_scaling:  # what Llama-3.2 ships with; changes no FLOPs
            rope = {"rope_type": "llama3", "rope_theta": self.rope_theta, "factor": 32.0, "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        return LlamaConfig(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads, head_dim=self.head_dim,
            max_position_embeddings=self.max_position_embeddings, rms_norm_eps=self.rms_norm_eps,
            tie_word_embeddings=self.tie_word_embeddings, rope_parameters=rope,
            bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id,
        )

    def param_count(self) -> int:
        """Parameters of the causal LM (tied embedding counted once); equals ``numel`` of the HF model."""
        h, i, v, hd = self.hidden_size, self.intermediate_size, self.vocab_size, self.head_dim
        attn = h * (self.num_heads * hd) + 2 * h * (self.num_kv_heads * hd) + (self.num_heads * hd) * h
        mlp = 3 * h * i
        per_layer = attn + mlp + 2 * h  # two RMSNorm weights
        emb = v * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + emb + h  # + final norm

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__} | {"head_dim": self.head_dim,
                                                                          "params": self.param_count()}


#: Llama-3.2-1B: hidden 2048, 16 layers, 32 query / 8 key-value heads, MLP 8192, vocab 128256, tied.
LLAMA_3_2_1B = LlamaShape(hidden_size=2048, num_layers=16, num_heads=32, num_kv_heads=8, intermediate_size=8192,
                          vocab_size=128256)
#: What ``--tiny`` runs: small enough for a CPU smoke run of every code path.
# CPU proxy: small enough for one core, proportioned like the 1B shape where it matters for the
# CoLaR-vs-plain comparison: the tied LM head is ~21 % of the parameters (1B: 262.7 M of 1,235.8 M)
# and the data keeps the full-size lengths (256-token rows).
PROXY = LlamaShape(hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=2, intermediate_size=1024,
                   vocab_size=4096, llama3_rope_scaling=False, max_position_embeddings=4096)
TINY = LlamaShape(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=256, vocab_size=2000,
                  llama3_rope_scaling=False, max_position_embeddings=4096)


def latent_head_param_count(hidden: int, inter: Optional[int] = None) -> int:
    """Parameters of colar_core.latent_head.LatentHead(hidden, inter)."""
    i = inter or hidden
    return (hidden * i + i) + (i * i + i) + 2 * i + 2 * (i * hidden + hidden)


# ----------------------------------------------------------------------------------------------
# FLOPs
# ----------------------------------------------------------------------------------------------
def attention_train_flops(shape: LlamaShape, row_lengths: Sequence[int]) -> float:
    """Training FLOPs of the attention score/value matmuls: ``12 * L * d * n^2`` per row of n tokens."""
    d = shape.num_heads * shape.head_dim
    return 12.0 * shape.num_layers * d * float(sum(int(n) * int(n) for n in row_lengths))


def dense_train_flops(n_params: int, tokens: float) -> float:
    return 6.0 * n_params * tokens


def tflops(flops: float, seconds: float) -> float:
    return flops / seconds / 1e12 if seconds > 0 else 0.0


def mfu(tflops_value: float, peak_flops: float = H100_BF16_PEAK_FLOPS) -> float:
    return tflops_value * 1e12 / peak_flops


# ----------------------------------------------------------------------------------------------
# Devices, versions, threads
# ----------------------------------------------------------------------------------------------
def pick_device(requested: Optional[str] = None):
    import torch

    if requested:
        return torch.device(requested)
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def write_report(name: str, report: dict, args, device) -> Path:
    """Write a benchmark's report to ``--out`` or its default file (see :func:`default_out`; CPU
    sizes ``tiny`` / ``proxy``) and say where."""
    out = Path(args.out) if args.out else default_out(name, device, args.tiny, "proxy" if args.proxy else "")
    write_json(out, report)
    print(f"[{name}] wrote {out}", flush=True)
    return out


def add_run_options(parser, name: str) -> None:
    """The options every speed benchmark takes: --threads, --clock, --seed, --device, --out."""
    parser.add_argument("--threads", type=int,
                        help="torch.set_num_threads (default 1 on CPU: measured faster on a busy 2-core box)")
    parser.add_argument("--clock", choices=("wall", "process"),
                        help="wall: elapsed time (default on CUDA); process: this process's CPU time (default on "
                             "CPU, where other jobs share the cores; meaningful with one thread)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--out", help=f"result JSON (default bench/results/{name}.json on CUDA, "
                                      f"{name}_<device>_tiny.json for tiny runs)")


def resolve_size(args, full: dict, tiny: dict, proxy: dict):
    """Shared by the benchmark scripts: pick the device, the size (``--proxy`` implies the CPU-size
    path, as does a machine without CUDA), fill unset options from that size's preset, and default
    ``--threads`` (1 on the CPU) and ``--clock`` (wall on CUDA, process CPU time elsewhere).
    Returns the device."""
    device = pick_device(args.device)
    args.tiny = bool(args.tiny or args.proxy or device.type != "cuda")
    for key, value in (proxy if args.proxy else tiny if args.tiny else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.threads is None and device.type == "cpu":
        args.threads = 1
    if args.clock is None:
        args.clock = "wall" if device.type == "cuda" else "process"
    return device


def apply_threads(threads: Optional[int]) -> None:
    """``torch.set_num_threads(threads)`` when given (CPU runs; measured in docs/BENCHMARKS.md)."""
    if threads:
        import torch

        torch.set_num_threads(int(threads))


def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "deepspeed"):
        try:
            mod = __import__(name)
            out[name] = getattr(mod, "__version__", "?")
        except Exception:  # noqa: BLE001 - reported as None, not fatal
            out[name] = None
    try:
        import torch

        out["cuda"] = torch.version.cuda
        out["cudnn"] = torch.backends.cudnn.version() if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001 - versions are informative only
        pass
    return out


def device_info(device=None) -> dict:
    """What ran the benchmark: GPU name and memory, or the CPU, plus core and thread counts."""
    import torch

    device = device or pick_device()
    info = {"type": device.type, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(), "processor": platform.processor() or platform.machine()}
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(idx)
        info.update({"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                     "capability": f"{props.major}.{props.minor}", "count": torch.cuda.device_count()})
    else:
        info["name"] = _cpu_name()
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_device(info: dict) -> str:
    if info["type"] == "cuda":
        return f"{info['name']} ({info['memory_gib']} GiB)"
    return f"CPU: {info['name']}, {info['cpu_count']} cores, torch threads {info['torch_threads']}"


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------
def sync(device=None) -> None:
    """Wait for queued GPU work (a no-op on the CPU)."""
    import torch

    if torch.cuda.is_available() and (device is None or getattr(device, "type", str(device)) == "cuda"):
        torch.cuda.synchronize()


class Timer:
    """``with Timer(device) as t: ...`` -> ``t.seconds``, synchronised on CUDA at both ends.

    ``clock="wall"`` (default) measures elapsed time; ``clock="process"`` measures this process's
    CPU time, which on a shared, busy CPU box with one torch thread leaves out the time other jobs
    held the cores (a CPU smoke-run choice; never meaningful for CUDA). Both are kept
    (``wall_s``, ``cpu_s``).
    """

    def __init__(self, device=None, clock: str = "wall"):
        if clock not in ("wall", "process"):
            raise ValueError(f"clock must be 'wall' or 'process', got {clock!r}")
        self.device, self.clock = device, clock
        self.seconds = self.wall_s = self.cpu_s = float("nan")

    def __enter__(self) -> "Timer":
        sync(self.device)
        self._w0, self._c0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        sync(self.device)
        self.wall_s = time.perf_counter() - self._w0
        self.cpu_s = time.process_time() - self._c0
        self.seconds = self.wall_s if self.clock == "wall" else self.cpu_s


def reset_peak_memory(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device) -> Optional[float]:
    import torch

    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return None


# ----------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------
def command_line(module: str, argv: Optional[Sequence[str]] = None) -> str:
    """The command that reproduces this run."""
    args = list(sys.argv[1:] if argv is None else argv)
    return " ".join(["python", "-m", module, *map(shlex.quote, args)])


def default_out(name: str, device, tiny: bool, size: str = "") -> Path:
    """``bench/results/<name>.json`` for a full-size CUDA run; ``<name>_<device>_<size>.json`` otherwise
    (size ``tiny`` unless named, e.g. ``proxy``).

    The GPU result files are never written by a CPU or tiny run.
    """
    if device.type == "cuda" and not tiny:
        return RESULTS_DIR / f"{name}.json"
    return RESULTS_DIR / f"{name}_{device.type}_{size or 'tiny'}.json"


def write_json(path, data: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)
    return path


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
