"""Shared pieces of the benchmarks: device and version info, CUDA-synchronised timing, model
shapes, FLOP counting (MFU) and result files.

FLOP convention (used by ``sft_throughput``; see docs/BENCHMARKS.md):

* dense training FLOPs = ``6 * N * T``: N parameters doing a matmul per token (forward 2, backward
  4), T tokens. With tied embeddings the table is counted once, as the LM-head matmul (the input
  lookup is not a matmul).
* attention training FLOPs = ``12 * L * d * n`` per token of a row of ``n`` tokens (QK^T and AV,
  2 FLOPs per MAC, x3 for forward + backward), with ``d = heads * head_dim``; the PaLM convention,
  which does not halve for the causal mask.
* LoRA (frozen backbone, small trained adapters): ``4 * N_frozen + 6 * N_trained`` per token
  (:func:`train_flops`): a frozen matmul still runs forward (2) and passes the gradient to its input
  (2), but computes no weight gradient (the 2 a trained weight adds). ``6 * (N_frozen + N_trained)``,
  the full fine-tune convention, is also reported (``mfu_6n``); it credits a LoRA step with ~1.5x the
  work it does.
* MFU = achieved model FLOP/s / the device's dense bf16 peak (:data:`PEAK_BF16_DENSE`, from NVIDIA's
  datasheets; about 80 % of it is reachable in practice, so 100 % MFU is not).
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

#: H100 SXM dense bf16 tensor-core peak from the spec sheet (FLOP/s); the reference peak of a device
#: not in :data:`PEAK_BF16_DENSE` (a CPU run's MFU is then only a smoke number).
H100_BF16_PEAK_FLOPS = 989e12
#: Dense bf16 tensor-core peaks (FLOP/s) by a substring of ``torch.cuda.get_device_name()``, most
#: specific first. NVIDIA's datasheets give the figures with 2:4 sparsity; dense is half of them:
#: H100 SXM 1,979 -> 989 and H100 PCIe 1,513 -> 756 (H100 datasheet), H200 SXM 1,979 -> 989 (H200
#: datasheet), A100 312 dense (A100 datasheet, 624 with sparsity).
PEAK_BF16_DENSE: tuple[tuple[str, float, str], ...] = (
    ("H100 PCIe", 756e12, "NVIDIA H100 datasheet, PCIe: 1,513 TFLOP/s bf16 with sparsity, dense half"),
    ("H200", 989e12, "NVIDIA H200 datasheet: 1,979 TFLOP/s bf16 with sparsity, dense half"),
    ("H100", 989e12, "NVIDIA H100 datasheet, SXM: 1,979 TFLOP/s bf16 with sparsity, dense half"),
    ("A100", 312e12, "NVIDIA A100 datasheet: 312 TFLOP/s bf16 dense"),
)
#: Where the architectures of the recipes' models are written (their public ``config.json`` values).
ARCHS_DIR = ROOT / "colar_core" / "archs"


def peak_bf16_flops(device_name: str) -> tuple[float, str]:
    """``(peak dense bf16 FLOP/s, where the figure comes from)`` for a device name; a device not in
    :data:`PEAK_BF16_DENSE` (a CPU, say) gets the H100 SXM figure, and the source says so."""
    for key, flops, source in PEAK_BF16_DENSE:
        if key.lower() in device_name.lower():
            return flops, source
    return H100_BF16_PEAK_FLOPS, f"{device_name!r} is not in the table: the H100 SXM figure as a reference"


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


def arch_shape(name: str) -> LlamaShape:
    """The :class:`LlamaShape` of ``colar_core/archs/<name>.json`` (a model's public config values)."""
    path = ARCHS_DIR / f"{name}.json"
    try:
        c = json.loads(path.read_text())
        rope = c.get("rope_scaling") or {}
        return LlamaShape(hidden_size=c["hidden_size"], num_layers=c["num_hidden_layers"],
                          num_heads=c["num_attention_heads"], num_kv_heads=c["num_key_value_heads"],
                          intermediate_size=c["intermediate_size"], vocab_size=c["vocab_size"],
                          tie_word_embeddings=c["tie_word_embeddings"], rope_theta=float(c["rope_theta"]),
                          llama3_rope_scaling=rope.get("rope_type") == "llama3",
                          max_position_embeddings=c["max_position_embeddings"], rms_norm_eps=c["rms_norm_eps"])
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"{path}: not a readable Llama architecture ({type(err).__name__}: {err})") from None


#: Llama-3.2-1B(-Instruct): hidden 2048, 16 layers, 32 query / 8 key-value heads, MLP 8192, vocab 128256, tied.
LLAMA_3_2_1B = arch_shape("llama-3.2-1b-instruct")
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


def train_flops(n_frozen: int, n_trained: int, tokens: float) -> float:
    """Training FLOPs of matmuls over ``tokens``: frozen weights 4 per token (forward and the input
    gradient), trained ones 6 (plus their weight gradient). ``n_frozen = 0`` is :func:`dense_train_flops`."""
    return (4.0 * n_frozen + 6.0 * n_trained) * tokens


def _lora_widths(shape: LlamaShape) -> dict[str, tuple[int, int]]:
    """Each LoRA target's (input, output) widths: its adapter adds ``r * (in + out)`` weights."""
    h, i = shape.hidden_size, shape.intermediate_size
    q, kv = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h), "gate_proj": (h, i),
            "up_proj": (h, i), "down_proj": (i, h)}


def lora_param_count(shape: LlamaShape, r: int, targets: Sequence[str]) -> int:
    """Weights LoRA of rank ``r`` adds on ``targets`` (peft's A and B matrices, no bias) in every layer."""
    widths = _lora_widths(shape)
    unknown = sorted(set(targets) - set(widths))
    if unknown:
        raise ValueError(f"LoRA targets {unknown} are not Llama projections ({', '.join(widths)})")
    return shape.num_layers * sum(r * sum(widths[t]) for t in targets)


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
    out: dict = {"python": platform.python_version()}
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
