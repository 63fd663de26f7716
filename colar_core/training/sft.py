"""Supervised fine-tuning: explicit CoT, no-CoT and CoLaR, on the shared training loop.

Modes (``TrainConfig.objective.mode``):

* ``cot``   - the explicit chain, compression factor 1 (the paper's CoT baseline and CoLaR's start point);
* ``nocot`` - question -> answer, steps dropped (baseline);
* ``colar`` - compressed latents: one factor ``r`` drawn per optimizer step from
  ``compression_factors`` and shared by the whole global batch (every micro-batch and process),
  the prompt saying ``auto`` instead of ``r`` with probability ``auto_prob``.

A fresh CoLaR run whose embedding scale was *measured* re-measures it first (the CoT warm-up has
trained the embeddings); the scale is then part of the run's checkpoints, so a resumed run keeps it.

Data order: each epoch is a seeded permutation of the training set; one micro-step consumes
``batch_size * world_size`` consecutive entries and process ``k`` takes the ``k``-th slice. The
data position (epoch, index) and every random stream are checkpointed, so a resumed run sees the
same batches, factors and labels as an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from pydantic import Field

from colar_core.collate import collate
from colar_core.config import ModelConfig, StrictModel
from colar_core.inference import generate
from colar_core.scoring import accuracy
from colar_core.text import AUTO_SPEED, PromptEncoder
from colar_core.training.callbacks import stage_callbacks
from colar_core.training.checkpoint import CheckpointManager, export_model
from colar_core.training.result import StageResultMixin
from colar_core.training.config import TrainConfig
from colar_core.training.engine import StepBatch, build_engine, dist_env, train_loop

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "train_config.json"
MODEL_DIR = "model"


# ----------------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------------
def example_length(ex, r: float = 1) -> float:
    """Sort key for length grouping: packed positions of the example at compression factor ``r``.

    The step's r is drawn later, so the grouping uses the median trained factor: an example long at
    one r is long at every r. On the benchmark's data shape that leaves 2.2 % padding on average over
    r = 1..5, against 12.9 % without grouping (``python -m bench.padding``).
    """
    return len(ex.question_ids) + 1 + len(ex.step_ids) / r + len(ex.answer_ids)


def group_by_length(order: list[int], lengths: Sequence[float], micro: int, pool_batches: int,
                    generator: torch.Generator) -> list[int]:
    """Reorder ``order`` so that each run of ``micro`` indices holds examples of similar length.

    Pools of ``pool_batches * micro`` consecutive indices are sorted by length (longest first) and cut
    into micro-batches whose order inside the pool is then shuffled with ``generator``. The ragged
    tail (fewer than one micro-batch) stays at the end, where the loop drops it.
    """
    pool = micro * pool_batches
    out: list[int] = []
    usable = len(order) - len(order) % micro
    for lo in range(0, usable, pool):
        chunk = sorted(order[lo: min(lo + pool, usable)], key=lambda i: -lengths[i])
        batches = [chunk[i: i + micro] for i in range(0, len(chunk), micro)]
        for j in torch.randperm(len(batches), generator=generator).tolist():
            out.extend(batches[j])
    return out + order[usable:]


class SFTBatches:
    """Micro-batches of each optimizer step, with the step's compression factor (stateful).

    State: epoch and index into the epoch's seeded permutation, the r-sampling generator (same on
    every process), the label-sampling generator and the latent-noise generator (per process).
    """

    def __init__(self, examples: Sequence, encoder: PromptEncoder, cfg: TrainConfig, rank: int = 0,
                 world_size: int = 1, device: Optional[torch.device] = None):
        self.examples, self.encoder, self.cfg = list(examples), encoder, cfg
        self.rank, self.world_size = rank, world_size
        self.global_micro = cfg.batch_size * world_size
        if len(self.examples) < self.global_micro:
            raise ValueError(f"{len(self.examples)} training examples cannot fill one micro-step of "
                             f"batch_size {cfg.batch_size} x {world_size} process(es)")
        self.epoch, self.index = 0, 0
        self._perm: Optional[list[int]] = None
        self._perm_epoch = -1
        self.r_rng = random.Random(cfg.seed)
        self.label_gen = torch.Generator().manual_seed(cfg.seed * 7919 + 104729 * (rank + 1))
        device = device or torch.device("cpu")
        self.loss_gen = torch.Generator(device=device).manual_seed(cfg.seed * 6151 + 15485863 * (rank + 1))

    def _permutation(self) -> list[int]:
        if self._perm_epoch != self.epoch:
            g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + self.epoch)
            self._perm = torch.randperm(len(self.examples), generator=g).tolist()
            if self.cfg.length_grouping:
                factors = sorted(self.cfg.objective.compression_factors) if self.cfg.objective.mode == "colar" else [1]
                r_mid = factors[len(factors) // 2]
                self._perm = group_by_length(self._perm, [example_length(ex, r_mid) for ex in self.examples],
                                             self.global_micro, self.cfg.length_grouping, g)
            self._perm_epoch = self.epoch
        return self._perm

    def _next_indices(self) -> list[int]:
        if self.index + self.global_micro > len(self.examples):  # drop the ragged tail of an epoch
            self.epoch, self.index = self.epoch + 1, 0
        perm = self._permutation()
        lo = self.index + self.rank * self.cfg.batch_size
        self.index += self.global_micro
        return perm[lo: lo + self.cfg.batch_size]

    def draw_factor(self) -> tuple[int, Union[int, str]]:
        """The step's compression factor and what the prompt says (the factor, or 'auto')."""
        obj = self.cfg.objective
        if obj.mode != "colar":
            return 1, 1
        r = self.r_rng.choice(obj.compression_factors)
        speed: Union[int, str] = r
        if obj.auto_prob > 0 and self.r_rng.random() < obj.auto_prob:
            speed = AUTO_SPEED
        return r, speed

    def __call__(self, step: int) -> StepBatch:
        r, speed = self.draw_factor()
        micro = []
        for _ in range(self.cfg.grad_accum):
            rows = [self.examples[i] for i in self._next_indices()]
            micro.append(collate(rows, self.encoder, r, speed, generator=self.label_gen))
        return StepBatch(micro, {"r": r, "auto_prompt": int(speed == AUTO_SPEED), "epoch": self.epoch})

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "global_micro": self.global_micro,
                "r_rng": self.r_rng.getstate(), "label_gen": self.label_gen.get_state(),
                "loss_gen": self.loss_gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        if int(state.get("global_micro", self.global_micro)) != self.global_micro:
            log.warning("global micro-batch changed (%s -> %s): data order continues from the same index",
                        state.get("global_micro"), self.global_micro)
        self.r_rng.setstate(_as_tuple(state["r_rng"]))
        self.label_gen.set_state(state["label_gen"])
        self.loss_gen.set_state(state["loss_gen"])


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


class ModelStateKeeper:
    """Checkpoints ``model.state`` (embedding scale, trained factors): it is not in the weights."""

    def __init__(self, model):
        self.model = model

    def state_dict(self) -> dict:
        return {"json": json.dumps(asdict(self.model.state))}

    def load_state_dict(self, state: dict) -> None:
        for k, v in json.loads(state["json"]).items():
            if hasattr(self.model.state, k):
                setattr(self.model.state, k, v)


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------
def make_evaluator(engine, encoder: PromptEncoder, val_records: Sequence, cfg: TrainConfig):
    """``evaluate(step) -> metrics`` run by every process on its share of the validation set.

    colar mode: latent generation at each of ``cfg.eval_factors()``, giving ``acc_c{c}`` and
    ``mean_latents_c{c}``; cot / nocot: text generation, ``acc`` and ``mean_chain_tokens``.
    ``score`` is the mean accuracy (what best-k and early stopping use).
    """
    records = list(val_records)[: cfg.eval_size] if cfg.eval_size else list(val_records)
    shard = records[engine.rank::engine.world_size]
    questions, golds = [r.question for r in shard], [r.answer for r in shard]
    mode = cfg.objective.mode
    factors: list[Optional[int]] = list(cfg.eval_factors()) if mode == "colar" else [None]

    def evaluate(step: int) -> dict:
        vals = []
        with engine.full_model() as model:
            for c in factors:
                if questions:
                    gens = generate(model, encoder, questions, "latent" if c is not None else mode,
                                    c or 1, cfg.generation, seed=cfg.eval_seed + 1009 * engine.rank)
                    correct = accuracy([g.answer for g in gens], golds) * len(golds)
                    length = float(sum(g.chain_length for g in gens))
                else:
                    correct = length = 0.0
                vals += [correct, length, float(len(questions))]
        tot = engine.all_reduce_sum(torch.tensor(vals, dtype=torch.float64)).tolist()
        metrics: dict = {"n_eval": int(tot[2]) if tot else 0}
        accs = []
        for i, c in enumerate(factors):
            correct, length, n = tot[3 * i: 3 * i + 3]
            acc, mean_len = (correct / n, length / n) if n else (0.0, 0.0)
            accs.append(acc)
            if c is None:
                metrics.update({"acc": acc, "mean_chain_tokens": mean_len})
            else:
                metrics.update({f"acc_c{c}": acc, f"mean_latents_c{c}": mean_len})
        metrics["score"] = sum(accs) / len(accs) if accs else 0.0
        return metrics

    return evaluate


# ----------------------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------------------
@dataclass
class SFTResult(StageResultMixin):
    """What a finished SFT stage hands on (also written to ``output_dir/result.json``)."""

    model_dir: Path
    final_step: int
    best_val_accuracy: Optional[float]
    metrics_path: Path
    best_model_dir: Optional[Path] = None
    best_step: Optional[int] = None
    stopped_early: bool = False
    resumed_from: Optional[int] = None
    output_dir: Optional[Path] = None



def run_stage_loop(engine, batches, loss_fn, cfg: TrainConfig, *, model, encoder: PromptEncoder, tokenizer,
                   val_records: Sequence, manager: CheckpointManager, out: Path, callbacks: Sequence = ()):
    """The part of a training stage that SFT and RL share: validation with best-k exports,
    :func:`train_loop` with checkpoints and resume, then ``out/model`` (the best validated model or
    the last weights, per ``cfg.final_model``). Returns ``(loop state, model dir, best dir or None)``."""
    evaluate_fn = save_best = None
    if cfg.eval_every and len(val_records):
        evaluate = make_evaluator(engine, encoder, val_records, cfg)
        last_eval: dict = {}

        def evaluate_fn(step: int) -> dict:
            last_eval.clear()
            last_eval.update(evaluate(step))
            return last_eval

        def save_best(step: int) -> Path:
            return export_model(engine, manager.best_path(step), tokenizer,
                                {"val_metrics.json": {"step": step, **last_eval}})

    cbs = stage_callbacks(out / METRICS_FILE, callbacks) if engine.is_main else []
    state = train_loop(
        engine, batches, loss_fn,
        max_steps=cfg.max_steps, checkpoints=manager, checkpoint_every=cfg.checkpoint_every,
        stateful={"data": batches, "model_state": ModelStateKeeper(model)}, callbacks=cbs,
        evaluate=evaluate_fn, eval_every=cfg.eval_every, save_best=save_best, keep_best=cfg.keep_best,
        early_stopping_patience=cfg.early_stopping_patience, log_every=cfg.log_every,
    )

    best_dir = Path(state.best[0]["path"]) if state.best and state.best[0].get("path") else None
    model_dir = out / MODEL_DIR
    if cfg.final_model == "best" and best_dir is not None and best_dir.is_dir():
        if engine.is_main:
            copy_dir_atomic(best_dir, model_dir)
        engine.barrier()
    else:
        export_model(engine, model_dir, tokenizer)
    return state, model_dir, best_dir

def train_sft(
    model,
    tokenizer,
    train_records: Sequence,
    val_records: Sequence = (),
    cfg: Optional[TrainConfig] = None,
    output_dir: Union[str, Path] = "runs/sft",
    callbacks: Sequence = (),
    device: Optional[torch.device] = None,
) -> SFTResult:
    """Train ``model`` (a :class:`~colar_core.model.ColarModel`) on ``train_records``.

    Resumes from the newest complete checkpoint in ``output_dir`` if there is one (a finished
    stage returns at once). Writes ``metrics.jsonl``, ``checkpoints/``, ``best/`` and the final
    ``model/`` (loadable with ``ColarModel.from_pretrained``). Every process of a multi-process job
    calls this with the same arguments; only rank 0 writes files and calls ``callbacks``.

    Under ZeRO-3 the ``model`` object passed in is left partitioned by DeepSpeed afterwards: load
    ``result.model_dir`` to use the trained model.
    """
    cfg = cfg or TrainConfig()
    out = Path(output_dir)
    env = dist_env(set_defaults=cfg.backend == "deepspeed")
    obj = cfg.objective
    manager = CheckpointManager(out, keep=cfg.keep_checkpoints)
    fresh = manager.latest() is None

    encoder = PromptEncoder(tokenizer)
    with_steps = obj.mode != "nocot"
    examples = [encoder.encode(r, with_steps=with_steps) for r in train_records]
    if obj.mode == "colar":
        if fresh and model.state.embedding_scale_source == "measured":
            before = model.state.embedding_scale
            model.remeasure_embedding_scale()
            log.info("re-measured embedding scale %.5f -> %.5f", before, model.state.embedding_scale)
        model.state.trained_compression_factors = sorted(set(obj.compression_factors))

    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / CONFIG_FILE).write_text(cfg.model_dump_json(indent=2))

    model.zero_grad(set_to_none=True)  # leftover .grad on a model passed in memory would join the first update
    engine = build_engine(model, cfg, device)
    batches = SFTBatches(examples, encoder, cfg, engine.rank, engine.world_size, engine.device)

    def loss_fn(m, batch):
        return m.sft_loss(batch.to(engine.device), obj, generator=batches.loss_gen)

    state, model_dir, best_dir = run_stage_loop(engine, batches, loss_fn, cfg, model=model, encoder=encoder,
                                                tokenizer=tokenizer, val_records=val_records, manager=manager,
                                                out=out, callbacks=callbacks)
    result = SFTResult(model_dir=model_dir, final_step=state.step, best_val_accuracy=state.best_score,
                       metrics_path=out / METRICS_FILE, best_model_dir=best_dir, best_step=state.best_step,
                       stopped_early=state.stopped_early, resumed_from=state.resumed_from, output_dir=out)
    if engine.is_main:
        result.save(out)
    engine.barrier()
    return result


def copy_dir_atomic(src: Path, dst: Path) -> None:
    """Replace ``dst`` with a copy of ``src`` (copied to a temp name first, then renamed)."""
    tmp = dst.with_name(f".tmp-{dst.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    if dst.exists():
        shutil.rmtree(dst)
    tmp.rename(dst)


# ----------------------------------------------------------------------------------------------
# A whole job from one config file (what the launchers run)
# ----------------------------------------------------------------------------------------------
class DataConfig(StrictModel):
    """Where the stage's examples come from: split files written by ``colar_core.data.prepare_data``
    (JSONL, read with ``load_split``), or the built-in synthetic task when ``train`` is None."""

    train: Optional[str] = Field(None, description="train.jsonl from prepare_data; None = built-in problems.")
    val: Optional[str] = Field(None, description="val.jsonl from prepare_data (validation).")
    builtin_train: int = Field(2000, gt=0, description="Built-in task: training problems.")
    builtin_val: int = Field(200, ge=0, description="Built-in task: validation problems.")
    builtin_seed: int = Field(0, description="Built-in task: generator seed.")
    builtin_difficulty: Union[int, str] = Field("easy", description="Built-in task: easy / medium / hard or max steps.")

    def load(self) -> tuple[list, list]:
        from colar_core.data import builtin_splits, load_split

        if self.train is None:
            splits = builtin_splits(self.builtin_train, self.builtin_val, 0, seed=self.builtin_seed,
                                    difficulty=self.builtin_difficulty)
            return splits["train"], splits["val"]
        return load_split(self.train), (load_split(self.val) if self.val else [])


class SFTJob(StrictModel):
    """One SFT stage as a file: what ``python -m colar_core.training.sft_main --config job.json`` runs."""

    output_dir: str = Field(..., description="Run directory (checkpoints, metrics.jsonl, model/); reused = resumed.")
    train: TrainConfig = Field(default_factory=TrainConfig)
    model: ModelConfig = Field(default_factory=ModelConfig, description="Backbone to build when init_from is None.")
    init_from: Optional[str] = Field(None, description="A saved ColarModel directory to start from "
                                     "(e.g. the CoT stage's output_dir/model); its tokenizer is used.")
    data: DataConfig = Field(default_factory=DataConfig)

    @classmethod
    def from_file(cls, path) -> "SFTJob":
        text = Path(path).read_text()
        if str(path).endswith((".yaml", ".yml")):
            import yaml

            return cls.model_validate(yaml.safe_load(text))
        return cls.model_validate_json(text)


def load_model_and_tokenizer(job: SFTJob, train_records: Sequence, val_records: Sequence):
    """The model and tokenizer a job starts from (identical on every process: seeded build)."""
    from colar_core.model import ColarModel
    from colar_core.tokenizer import build_tokenizer, load_tokenizer

    if job.init_from:
        root = Path(job.init_from)
        model = ColarModel.from_pretrained(root)
        tokenizer = load_tokenizer(str(root / "tokenizer"))
        return model, tokenizer
    if job.model.tokenizer:
        tokenizer = load_tokenizer(job.model.tokenizer, trust_remote_code=job.model.trust_remote_code)
    elif job.model.name_or_path == "tiny":
        tokenizer = build_tokenizer(list(train_records) + list(val_records))
    else:
        tokenizer = load_tokenizer(job.model.name_or_path, trust_remote_code=job.model.trust_remote_code)
    torch.manual_seed(job.train.seed)
    model = ColarModel.build(job.model, tokenizer)
    return model, tokenizer


def run_sft_job(job: SFTJob, callbacks: Sequence = ()) -> SFTResult:
    """Load data, tokenizer and model for ``job`` and train in this process (one of a launched job's
    processes, or the only one)."""
    train_records, val_records = job.data.load()
    model, tokenizer = load_model_and_tokenizer(job, train_records, val_records)
    return train_sft(model, tokenizer, train_records, val_records, job.train, job.output_dir, callbacks)
