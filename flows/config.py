"""The one configuration of a pipeline run: data -> CoT SFT -> CoLaR SFT -> (RL) -> evaluation.

Loaded from YAML plus ``key.path=value`` overrides and validated in full before any stage starts;
an error names the field (``sft_colar.lr``) and the reason. The defaults are the embedded default
run: a tiny Llama-shaped model built from scratch on the built-in arithmetic problems, sized to
finish on 2 CPU cores in a few minutes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Literal, Optional

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from colar_core.baselines.config import CoconutConfig, DistillConfig, ICoTConfig
from colar_core.config import (
    TEST_SPLIT,
    ConfigError,
    EvalConfig,
    GenerationConfig,
    ModelConfig,
    ObjectiveConfig,
    StrictModel,
)
from colar_core.data.bundled import BUNDLED, resolve_bundled
from colar_core.data.readers import known_format
from colar_core.hub import DATA_SUFFIXES, RepoType, is_cached, is_saved_dataset, looks_like_path
from colar_core.rl.config import RLConfig
from colar_core.training.config import TrainConfig


class BuiltinDataConfig(StrictModel):
    n_train: int = Field(8000, gt=0)
    n_val: int = Field(100, gt=0)
    n_test: int = Field(200, gt=0)
    seed: int = 0
    difficulty: str = Field("tiny", description="tiny (the CPU demo) | easy | medium | hard, or an int = max steps.")


class DataConfig(StrictModel):
    source: str = Field("builtin", description="'builtin', a bundled set (gsm8k-train, gsm8k-test, gsm8k-aug-valid, "
                        "gsm8k-aug-test, gsm-hard, svamp, multiarith; an existing path of that name wins), a file, a "
                        "directory of split files, or a HF dataset id / saved path.")
    format: str = Field("auto", description="Reader format: auto (recognises every bundled set) or one of "
                        "colar_core.data.readers.FORMATS / ALIASES (one table entry per format).")
    policy: Literal["fail", "skip"] = Field("fail", description="Bad records: fail (default) or skip and count.")
    val_fraction: float = Field(0.1, ge=0, lt=1)
    test_fraction: float = Field(0.1, ge=0, lt=1)
    seed: int = 0
    builtin: BuiltinDataConfig = Field(default_factory=BuiltinDataConfig)

    @field_validator("format")
    @classmethod
    def _known_format(cls, v: str) -> str:
        return known_format(v)

    @model_validator(mode="after")
    def _fractions_leave_training_data(self):
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError(f"data.val_fraction ({self.val_fraction}) + data.test_fraction ({self.test_fraction}) "
                             "must be below 1: nothing would be left to train on")
        return self


class PromotionConfig(StrictModel):
    """When a run's registered model takes the alias 'candidate' (tasks.promotion)."""

    rule: Literal["better", "always"] = Field(
        "better", description="'better': only when `metric`, measured on the same evaluation set (same digest), "
        "beats the current candidate's by more than its 95% interval over questions and seeds "
        "(accuracy_qci95) with a chain no longer (or there is no candidate yet); 'always': every run takes it.")
    metric: Optional[str] = Field(None, pattern=r"^accuracy/(c\d+|cot|nocot)$", description="The accuracy compared "
                                  "(primary test set): accuracy/c{c} for a factor of eval.compression_factors, or "
                                  "accuracy/cot. None: accuracy/c2 when c=2 is evaluated, else the smallest factor's.")

    def metric_for(self, factors: list[int]) -> str:
        """The metric compared, for an evaluation at ``factors`` (``metric``, or its default)."""
        return self.metric or ("accuracy/c2" if 2 in factors else f"accuracy/c{min(factors)}")


class TrackingConfig(StrictModel):
    experiment: str = Field("colar", min_length=1, description="MLflow experiment of the parent run.")
    registered_model_name: Optional[str] = Field(
        "colar-tiny", description="Register every run's final model as a version of this name; the alias "
        "'candidate' moves to it by `promotion` (None = register nothing)."
    )
    promotion: PromotionConfig = Field(default_factory=PromotionConfig)


class BaselinesConfig(StrictModel):
    """The paper's latent-reasoning baselines (colar_core.baselines), each run as its own stage
    (``sft-icot``, ``sft-coconut``, ``sft-distill``) and evaluated beside CoLaR as ``accuracy/{method}``.
    A section left null (the default) skips its method; ``{}`` runs it with the reference's defaults."""

    icot: Optional[ICoTConfig] = Field(None, description="iCoT: steps removed from the text stage by stage.")
    coconut: Optional[CoconutConfig] = Field(None, description="Coconut: removed steps become continuous thoughts.")
    distill: Optional[DistillConfig] = Field(None, description="Distill: teacher chain vs student thoughts "
                                             "(CODI-style self-distillation).")

    def selected(self) -> list:
        """The configured methods, in Table-1 order: ``[(name, config), ...]``."""
        return [(name, cfg) for name in ("icot", "coconut", "distill") if (cfg := getattr(self, name)) is not None]


def _default_cot() -> TrainConfig:
    return TrainConfig(objective=ObjectiveConfig(mode="cot", compression_factors=[1]), max_steps=600, batch_size=32,
                       lr=3e-3, warmup_steps=20, lr_schedule="cosine", min_lr_ratio=0.1, checkpoint_every=200,
                       eval_every=0, zero_stage=2)


def _default_rl() -> RLConfig:
    """The embedded default's GRPO stage: sized to show the stage in a CPU run of a few minutes."""
    return RLConfig(max_steps=30, questions_per_step=8, group_size=8, compression_factor=2, lr=1e-4,
                    checkpoint_every=10, generation=GenerationConfig(max_latents=32))


def _default_colar() -> TrainConfig:
    return TrainConfig(objective=ObjectiveConfig(mode="colar", compression_factors=[1, 2, 3]), max_steps=900,
                       batch_size=32, lr=3e-3, warmup_steps=20, lr_schedule="cosine", min_lr_ratio=0.1,
                       checkpoint_every=200, eval_every=0, zero_stage=2)


class PipelineConfig(StrictModel):
    name: str = Field("colar-tiny", min_length=1, description="Run name shown in Prefect and MLflow.")
    output_dir: str = Field("runs", description="Where stage outputs and checkpoints go (one folder per stage key).")
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=lambda: ModelConfig(
        tiny=dict(arch="llama", hidden_size=128, num_layers=3, num_heads=4)))
    sft_cot: Optional[TrainConfig] = Field(default_factory=_default_cot, description="CoT warm-up (None = skip).")
    sft_colar: TrainConfig = Field(default_factory=_default_colar)
    rl: Optional[RLConfig] = Field(default_factory=_default_rl, description="GRPO over the latents after CoLaR "
                                   "SFT (None = skip). Evaluation and the registered model then use the RL model.")
    baselines: BaselinesConfig = Field(default_factory=BaselinesConfig, description="iCoT / Coconut / Distill "
                                       "stages (none by default).")
    eval: EvalConfig = Field(default_factory=lambda: EvalConfig(
        compression_factors=[1, 2, 3], seeds=[0, 1, 2], n_examples=200, nocot_baseline=True,
        generation=GenerationConfig(max_latents=32, max_cot_tokens=64, batch_size=100)))
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    training_retries: int = Field(
        1, ge=0, description="Prefect retries of a failed training stage (sft-*, rl); each retry resumes from the "
        "stage's newest checkpoint. A stage that still fails is re-triggered later with `colar retry`.")
    training_retry_delay_s: float = Field(
        5.0, ge=0, description="Seconds before a failed training stage's retry starts: time for what failed it "
        "(a node's link, a full disk) to come back. A multi-node stage fails within its "
        "`launcher.collective_timeout_s` of a node going away.")
    stage_lock_timeout_s: float = Field(
        6 * 3600.0, gt=0, description="How long a stage waits for another pipeline that holds its folder's lock "
        "(same stage key) before failing with a message naming the holder (host:pid). Default 6 h.")

    @model_validator(mode="after")
    def _stages_agree(self):
        if self.sft_cot is not None and self.sft_cot.objective.mode != "cot":
            raise ValueError("sft_cot.objective.mode: must be 'cot'")
        if self.sft_colar.objective.mode != "colar":
            raise ValueError("sft_colar.objective.mode: must be 'colar'")
        trained = self.sft_colar.objective.compression_factors
        too_big = [c for c in self.eval.compression_factors if c > max(trained)]
        if too_big:
            raise ValueError(f"eval.compression_factors: {too_big} above the trained maximum {max(trained)} "
                             f"(sft_colar.objective.compression_factors = {trained})")
        if self.rl is not None and self.rl.compression_factor > max(trained):
            raise ValueError(f"rl.compression_factor: {self.rl.compression_factor} is above the trained maximum "
                             f"{max(trained)}")
        for name, method in self.baselines.selected():
            if method.init_from_cot and self.sft_cot is None:
                raise ValueError(f"baselines.{name}.init_from_cot: starts from the CoT model, but sft_cot is null "
                                 "(set init_from_cot: false, or keep sft_cot)")
        gate = self.tracking.promotion.metric
        if gate and gate.startswith("accuracy/c") and int(gate.removeprefix("accuracy/c")) not in self.eval.compression_factors:
            raise ValueError(f"tracking.promotion.metric: {gate} is not evaluated "
                             f"(eval.compression_factors {self.eval.compression_factors})")
        return self

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()

    def for_run(self) -> PipelineConfig:
        """This config as a run holds it: ``output_dir`` made absolute against the current directory
        (``~`` expanded). The flow starts from it and logs it as ``config.json``, so ``colar retry``
        from another directory finds the same stage folders. The defaults keep the relative "runs"."""
        return self.model_copy(update={"output_dir": os.path.abspath(os.path.expanduser(self.output_dir))})


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        nxt = node.get(k)
        if nxt is None:
            nxt = node[k] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {dotted}: '{k}' is not a section")
        node = nxt
    node[keys[-1]] = value


def parse_overrides(pairs: Iterable[str]) -> list[tuple[str, Any]]:
    out = []
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set {pair!r}: expected key.path=value")
        key, raw = pair.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {key.strip()}: value {raw!r} is not valid YAML "
                              f"({str(err).splitlines()[0]})") from None
        out.append((key.strip(), value))
    return out


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        named = re.match(r"([A-Za-z_][\w.]*): (.*)", msg, re.S)
        if not loc and named:  # a cross-field check names its field first: "eval.compression_factors: ..."
            loc, msg = named.groups()
        loc = loc or "(config)"
        lines.append(f"field '{loc}': {msg}")
    return "invalid config: " + "; ".join(lines)


def load_config(path: Optional[str] = None, overrides: Iterable[str] = (), base: Optional[dict] = None) -> PipelineConfig:
    """Defaults, then the YAML file, then ``--set`` overrides; validated in full."""
    tree: dict = dict(base or {})
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as err:
            raise ConfigError(f"{p}: not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start})") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{p}: not valid YAML: {' '.join(str(err).split())}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: top level must be a mapping of sections")
        tree = _deep_merge(tree, loaded)
    for key, value in parse_overrides(overrides):
        _set_path(tree, key, value)
    try:
        return PipelineConfig.model_validate(_deep_merge(PipelineConfig().model_dump(mode="json"), tree))
    except ValidationError as err:
        raise ConfigError(_format_errors(err)) from None


HUB_CHECK_TIMEOUT_S = 5.0


def _hub_problem(repo_id: str, repo_type: RepoType) -> Optional[str]:
    """None when ``repo_id`` can be resolved (local cache, or one quick Hub query), else why not.

    Offline (``HF_HUB_OFFLINE``) only the cache counts. Online, one metadata request with a short
    timeout and no retries: a dead network or a 404 answers in well under a second.
    """
    try:
        from huggingface_hub import HfApi, constants
        from huggingface_hub.utils import validate_repo_id
    except ImportError:  # pragma: no cover
        return "huggingface_hub is not installed"
    try:
        validate_repo_id(repo_id)
    except ValueError as err:  # HFValidationError
        return f"not a valid Hugging Face {repo_type} id ({err})"
    if is_cached(repo_id, repo_type):
        return None
    offline = constants.HF_HUB_OFFLINE or os.environ.get(
        "HF_DATASETS_OFFLINE" if repo_type == "dataset" else "TRANSFORMERS_OFFLINE", "") in ("1", "true", "TRUE")
    if offline:
        return f"not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and HF offline mode is on"
    try:
        HfApi().repo_info(repo_id, repo_type=repo_type, timeout=HUB_CHECK_TIMEOUT_S)
        return None
    except Exception as err:  # noqa: BLE001 - not found, gated without token, no network: all say why
        name = type(err).__name__
        if name == "GatedRepoError":  # exists; access is checked when it is downloaded
            return None
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        return (f"not in the local Hugging Face cache and the Hub could not resolve it "
                f"({name}: {first[:200]})")


def _bundled_path(source: str) -> str:
    """The file of a bundled set named ``source`` (``gsm8k-train``, ...); any other source as it is."""
    bundled = resolve_bundled(source)
    return bundled[0] if bundled else source


def _needs_test_split(source: Path) -> bool:
    """True when the test split must be carved out of ``source`` (by ``data.test_fraction``): one
    file, or a directory of split files without a ``test.*`` one. (A hub dataset's splits are only
    known once loaded: the prepare stage checks those.)"""
    if source.is_file():
        return True
    if not source.is_dir() or is_saved_dataset(source):
        return False
    return not any(p.is_file() and p.name.split(".", 1)[0].lower() == "test" for p in source.iterdir())


def preflight(cfg: PipelineConfig) -> None:
    """Checks that need the outside world (files, the Hugging Face cache/Hub), run before any server
    or stage starts; cheap (no model or data is loaded). Raises :class:`ConfigError` naming the field.

    - ``model.name_or_path``: 'tiny', an existing directory, an architecture ``.json`` file (random weights:
      ``colar rehearse``), or a hub model id that resolves (local cache, else one quick Hub query unless offline);
    - ``model.tokenizer``: the same, when set;
    - ``model.gguf_file``: an existing GGUF file (magic bytes), when set (it is converted later, by the
      first stage that loads it);
    - ``data.source``: 'builtin', an existing file or directory, a bundled set's name, or a hub
      dataset id that resolves;
    - ``data.test_fraction``: above 0 when the test split is carved out of the source.
    """
    problems = []
    if (gguf := cfg.model.gguf_file) is not None:  # checked here, then not again as name_or_path
        from colar_core.gguf_import import is_gguf_file

        if not Path(gguf).expanduser().is_file():
            problems.append(f"field 'model.gguf_file': file {gguf!r} does not exist (SmolLM2's: colar model "
                            "fetch-smollm2)")
        elif not is_gguf_file(gguf):
            problems.append(f"field 'model.gguf_file': {gguf!r} is not a GGUF file (no GGUF magic bytes)")
    for field, name in (("model.name_or_path", cfg.model.name_or_path), ("model.tokenizer", cfg.model.tokenizer)):
        if name is None or name == "tiny" or Path(name).is_dir() or (field == "model.name_or_path" and name == gguf):
            continue
        if field == "model.name_or_path" and Path(name).suffix.lower() == ".json" and Path(name).is_file():
            continue  # an architecture file: random weights in that architecture (colar_core.model, flows.rehearsal)
        if Path(name).exists():
            problems.append(f"field '{field}': {name!r} is a file; expected 'tiny', a model directory or a hub id")
        elif looks_like_path(name):
            problems.append(f"field '{field}': directory {name!r} does not exist")
        elif (why := _hub_problem(name, "model")) is not None:
            problems.append(f"field '{field}': {name!r} is not 'tiny', an existing directory or a known hub "
                            f"model: {why}")
    source = cfg.data.source
    evaluates_test_split = any(s.source == TEST_SPLIT for s in cfg.eval.sets())
    if cfg.data.test_fraction == 0 and evaluates_test_split and _needs_test_split(Path(_bundled_path(source))):
        problems.append(f"field 'data.test_fraction': 0 leaves no test split for the evaluate stage "
                        f"(data.source {source!r} has none of its own); set it above 0, or evaluate "
                        f"other sets (eval.datasets)")
    for i, spec in enumerate(cfg.eval.datasets):
        if spec.source == TEST_SPLIT or resolve_bundled(spec.source) is not None or Path(spec.source).exists():
            continue
        field = f"eval.datasets[{i}].source"
        if looks_like_path(spec.source, DATA_SUFFIXES):
            problems.append(f"field '{field}': file or directory {spec.source!r} does not exist")
        elif (why := _hub_problem(spec.source, "dataset")) is not None:
            problems.append(f"field '{field}': {spec.source!r} is not 'test', a bundled set ({', '.join(BUNDLED)}), "
                            f"an existing path or a known Hugging Face dataset: {why}")
    if source != "builtin" and resolve_bundled(source) is None and not Path(source).exists():
        if looks_like_path(source, DATA_SUFFIXES):
            problems.append(f"field 'data.source': file or directory {source!r} does not exist")
        elif (why := _hub_problem(source, "dataset")) is not None:
            problems.append(f"field 'data.source': {source!r} is not 'builtin', an existing path, a bundled set "
                            f"({', '.join(BUNDLED)}) or a known Hugging Face dataset: {why}")
    if problems:
        raise ConfigError("invalid config: " + "; ".join(problems))


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out
