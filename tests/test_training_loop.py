"""The training loop, engines, checkpoints and SFT modes, in one process on tiny models (CPU).

Sizes are shrunk so the whole file runs in well under a minute once DeepSpeed's one-time CPU op
build (``deepspeed_shm_comm``, cached in ~/.cache/torch_extensions) is done: a 2-layer Llama of
hidden size 64 on 48 built-in problems, micro-batches of 8.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch

from bench.pipeline_run import LAUNCH_VARS
from colar_core.collate import IGNORE
from colar_core.config import GenerationConfig, ModelConfig, ObjectiveConfig
from colar_core.data import builtin_splits
from colar_core.model import ColarModel
from colar_core.text import PromptEncoder
from colar_core.tokenizer import build_tokenizer
from colar_core.training.callbacks import ConsoleLogger, JsonlLogger, read_metrics
from colar_core.training.checkpoint import COMPLETE, CheckpointManager, complete_checkpoints, latest_checkpoint
from colar_core.training.config import LauncherConfig, TrainConfig
from colar_core.training.deepspeed_config import deepspeed_config
from colar_core.training.engines import TorchEngine
from colar_core.training.launch import build_launch_command
from colar_core.training.loop import LoopPlan, StepBatch, Validation, train_loop
from colar_core.training.schedule import lr_factor
from colar_core.training.sft import SFTBatches, SFTJob, SFTResult, run_sft_stage, train_sft
from tests.helpers import Crash, CrashAt, Toy

TINY = dict(arch="llama", hidden_size=64, num_layers=2, num_heads=4)

pytestmark = pytest.mark.one_torch_thread  # see tests/conftest.py


@pytest.fixture(scope="module")
def data():
    splits = builtin_splits(48, 8, 0, seed=0)
    tokenizer = build_tokenizer(splits["train"] + splits["val"])
    return splits["train"], splits["val"], tokenizer


def tiny_model(tokenizer, seed: int = 0) -> ColarModel:
    torch.manual_seed(seed)
    return ColarModel.build(ModelConfig(tiny=TINY), tokenizer)


def cfg(**kw) -> TrainConfig:
    base = dict(max_steps=20, batch_size=8, lr=3e-3, checkpoint_every=10, zero_stage=2,
                generation=GenerationConfig(do_sample=False, sample_latents=False, max_latents=8, max_cot_tokens=40))
    base.update(kw)
    return TrainConfig(**base)


def step_losses(path) -> list[float]:
    return [r["loss"] for r in read_metrics(path, "step")]


# ----------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------
def test_unknown_zero_stage_is_an_error_naming_the_field():
    with pytest.raises(ValueError, match="zero_stage"):
        TrainConfig(zero_stage=4)
    with pytest.raises(ValueError, match="lr_scheduel"):
        TrainConfig(lr_scheduel="cosine")


def test_reference_defaults():
    c = TrainConfig()
    assert (c.lr, c.weight_decay, c.grad_clip, c.keep_checkpoints, c.keep_best) == (1e-4, 0.01, 1.0, 2, 1)
    assert c.early_stopping_patience is None


def test_lr_schedules_warm_up_then_decay():
    assert [lr_factor(s, 4, 20, "constant") for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert lr_factor(19, 4, 20, "constant") == 1.0
    lin = [lr_factor(s, 0, 10, "linear") for s in range(11)]
    assert lin[0] == 1.0 and lin[5] == pytest.approx(0.5) and lin[10] == 0.0
    cos = [lr_factor(s, 2, 12, "cosine", min_ratio=0.1) for s in range(13)]
    assert cos[2] == 1.0 and cos[7] == pytest.approx(0.55) and cos[12] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(cos[2:], cos[3:]))


def test_deepspeed_config_merges_user_file_under_trainconfig(tmp_path, caplog):
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"stage": 3, "overlap_comm": True},
                                "train_micro_batch_size_per_gpu": "auto", "gradient_clipping": 5.0}))
    with caplog.at_level(logging.WARNING):
        ds = deepspeed_config(cfg(zero_stage=2, grad_accum=3, deepspeed_config=str(user)), world_size=4)
    assert ds["zero_optimization"] == {"stage": 2, "overlap_comm": True}
    assert ds["train_micro_batch_size_per_gpu"] == 8 and ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 8 * 3 * 4 and ds["gradient_clipping"] == 1.0
    assert ds["bf16"] == {"enabled": False}
    assert "zero_optimization.stage" in caplog.text and "gradient_clipping" in caplog.text
    with pytest.raises(FileNotFoundError, match="deepspeed_config"):
        deepspeed_config(cfg(deepspeed_config=str(tmp_path / "missing.json")), 1)


def test_shipped_deepspeed_configs_are_valid_json():
    root = Path(__file__).resolve().parents[1] / "deployments" / "deepspeed"
    for name, stage in (("zero2.json", 2), ("zero3.json", 3), ("cpu.json", 2)):
        ds = deepspeed_config(cfg(zero_stage=None, deepspeed_config=str(root / name)), world_size=2)
        assert ds["zero_optimization"]["stage"] == stage and ds["train_batch_size"] == 16


def test_launch_commands():
    ds = build_launch_command("job.json", LauncherConfig(num_gpus=8, launcher="deepspeed", master_port=29511))
    assert ds[ds.index("--master_port") + 1] == "29511"
    assert "--num_gpus" in ds and ds[ds.index("--num_gpus") + 1] == "8"
    assert ds[-4:] == ["--module", "colar_core.training.sft_main", "--config", "job.json"]
    multi = build_launch_command("job.json", LauncherConfig(num_gpus=8, num_nodes=2, hostfile="hosts", launcher="deepspeed"))
    assert multi[multi.index("--hostfile") + 1] == "hosts" and multi[multi.index("--num_nodes") + 1] == "2"
    tr = build_launch_command("job.json", LauncherConfig(num_gpus=2, launcher="torchrun"))
    assert tr[1:3] == ["-m", "torch.distributed.run"] and tr[tr.index("--nproc_per_node") + 1] == "2"
    assert tr[-4:] == ["-m", "colar_core.training.sft_main", "--config", "job.json"]
    with pytest.raises(ValueError, match="master_addr"):
        build_launch_command("job.json", LauncherConfig(num_nodes=2, launcher="torchrun"))
    assert not LauncherConfig().multi_process and LauncherConfig(num_gpus=2).multi_process


def test_torch_backend_refuses_several_processes():
    with pytest.raises(ValueError, match="one process"):
        TrainConfig(backend="torch", launcher=LauncherConfig(num_gpus=2))


# ----------------------------------------------------------------------------------------------
# the generic loop (what RL reuses): a toy regression on the torch engine
# ----------------------------------------------------------------------------------------------
def _toy_run(out, evaluate=None, **loop_kw):
    torch.manual_seed(0)
    model = Toy()
    engine = TorchEngine(model, cfg(backend="torch", lr=0.1, grad_clip=0.0, max_steps=30, grad_accum=2))
    x, w = torch.randn(64, 4), torch.tensor([[1.0], [-2.0], [0.5], [3.0]])

    def batches(step):
        idx = [(step * 16 + i) % 64 for i in range(16)]
        return StepBatch([(x[idx[:8]], x[idx[:8]] @ w), (x[idx[8:]], x[idx[8:]] @ w)], {"r": 1})

    def loss_fn(m, b):
        return {"loss": ((m.lin(b[0]) - b[1]) ** 2).mean(), "n_tokens": torch.tensor(8)}

    records = []

    class Rec:
        def on_step(self, step, metrics):
            records.append(("step", step, metrics))

        def on_eval(self, step, metrics):
            records.append(("eval", step, metrics))

    manager = CheckpointManager(out, keep=2)
    exported = []

    def save_best(step):
        p = manager.best_path(step)
        p.mkdir(parents=True)
        exported.append(p)
        return p

    validation = Validation(evaluate, save_best) if evaluate else None
    state = train_loop(engine, batches, loss_fn, LoopPlan(max_steps=30, **loop_kw), checkpoints=manager,
                       validation=validation, callbacks=[Rec()])
    return state, records, manager


def test_generic_loop_trains_logs_and_keeps_best_k(tmp_path):
    scores = iter([0.1, 0.5, 0.3, 0.7, 0.2, 0.6])
    state, records, manager = _toy_run(tmp_path, evaluate=lambda step: {"score": next(scores)}, eval_every=5,
                                       keep_best=2, checkpoint_every=10)
    steps = [m for kind, _, m in records if kind == "step"]
    assert len(steps) == 30 and steps[-1]["loss"] < 0.1 * steps[0]["loss"]
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "r"} <= set(steps[0])
    assert steps[0]["n_tokens"] == 16  # summed over the two micro-batches
    assert [b["step"] for b in state.best] == [20, 30] and state.best_score == 0.7
    assert sorted(p.name for p in manager.best_root.iterdir()) == ["step_00000020", "step_00000030"]
    assert [s for s, _ in complete_checkpoints(manager.root)] == [20, 30]  # keep_checkpoints=2
    assert state.finished and not state.stopped_early


def test_early_stopping_after_patience_evals(tmp_path):
    scores = iter([0.5, 0.4, 0.5, 0.3, 0.9])
    state, records, _ = _toy_run(tmp_path, evaluate=lambda step: {"score": next(scores)}, eval_every=5,
                                 early_stopping_patience=3)
    assert state.stopped_early and state.step == 20 and state.best_step == 5
    assert latest_checkpoint(tmp_path).name == "step_00000020"  # the stopping step is checkpointed


def test_half_written_checkpoints_are_never_picked(tmp_path):
    _toy_run(tmp_path, checkpoint_every=10)
    root = tmp_path / "checkpoints"
    (root / ".tmp-step_00000040").mkdir()  # killed while writing
    (root / "step_00000050").mkdir()  # no COMPLETE marker
    assert latest_checkpoint(tmp_path).name == "step_00000030"
    assert (root / "step_00000030" / COMPLETE).is_file()


# ----------------------------------------------------------------------------------------------
# SFT on DeepSpeed, one process, no launcher
# ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_zero2_single_process_without_launcher_vars_loss_falls(data, tmp_path, monkeypatch):
    train, val, tok = data
    for var in LAUNCH_VARS:
        monkeypatch.delenv(var, raising=False)
    c = cfg(objective=ObjectiveConfig(mode="cot"), max_steps=60, checkpoint_every=30, eval_every=30, eval_size=8)
    res = train_sft(tiny_model(tok), tok, train, val, c, tmp_path)
    assert os.environ["WORLD_SIZE"] == "1" and os.environ["RANK"] == "0" and int(os.environ["MASTER_PORT"]) > 0
    losses = step_losses(res.metrics_path)
    assert len(losses) == 60
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    steps = read_metrics(res.metrics_path, "step")
    assert {"ce", "latent", "entropy", "second_pass", "lr", "grad_norm", "tokens_per_s", "r"} <= set(steps[0])
    assert all(s["r"] == 1 for s in steps)
    evals = read_metrics(res.metrics_path, "eval")
    assert [e["step"] for e in evals] == [30, 60] and {"acc", "mean_chain_tokens", "score"} <= set(evals[0])
    assert res.final_step == 60 and res.best_val_accuracy is not None
    loaded = ColarModel.from_pretrained(res.model_dir)
    assert (res.model_dir / "tokenizer").is_dir() and loaded.state.hidden_size == 64
    assert SFTResult.load(tmp_path).final_step == 60


def test_finished_stage_rerun_returns_without_training(data, tmp_path):
    train, val, tok = data
    c = cfg(backend="torch", objective=ObjectiveConfig(mode="cot"), max_steps=5, checkpoint_every=0)
    train_sft(tiny_model(tok), tok, train, val, c, tmp_path)
    again = train_sft(tiny_model(tok), tok, train, val, c, tmp_path)
    assert again.final_step == 5 and again.resumed_from == 5
    assert len(step_losses(again.metrics_path)) == 5


def test_job_files_chain_cot_into_colar_in_process(tmp_path):
    """The pipeline's path: a CoT job, then a CoLaR job starting from its model (one process each)."""
    common = {"model": {"tiny": TINY}, "data": {"builtin_train": 32, "builtin_val": 4}}
    train = {"backend": "torch", "max_steps": 4, "batch_size": 8, "checkpoint_every": 0}
    cot = SFTJob.model_validate({**common, "output_dir": str(tmp_path / "cot"),
                                 "train": {**train, "objective": {"mode": "cot"}}})
    first = run_sft_stage(cot)
    assert first.final_step == 4 and (first.model_dir / "tokenizer").is_dir()
    colar = SFTJob.model_validate({**common, "output_dir": str(tmp_path / "colar"), "init_from": str(first.model_dir),
                                   "train": {**train, "objective": {"mode": "colar", "compression_factors": [2]}}})
    second = run_sft_stage(colar)
    state = ColarModel.from_pretrained(second.model_dir).state
    assert state.trained_compression_factors == [2] and state.embedding_scale_source == "measured"
    assert {r["r"] for r in read_metrics(second.metrics_path, "step")} == {2}


# ----------------------------------------------------------------------------------------------
# modes
# ----------------------------------------------------------------------------------------------
def test_colar_mode_draws_one_factor_per_step_and_remeasures_scale(data, tmp_path):
    train, val, tok = data
    model = tiny_model(tok)
    with torch.no_grad():  # stand-in for a CoT warm-up that changed the embeddings
        model.causal_lm.get_input_embeddings().weight.mul_(3.0)
    stale = model.state.embedding_scale
    c = cfg(backend="torch", objective=ObjectiveConfig(mode="colar", compression_factors=[1, 2, 3], auto_prob=0.3),
            max_steps=12, checkpoint_every=6, eval_every=6, eval_size=6, keep_best=2, grad_accum=2)
    res = train_sft(model, tok, train, val, c, tmp_path)
    assert model.state.embedding_scale == pytest.approx(3 * stale, rel=0.05)
    saved = ColarModel.from_pretrained(res.model_dir).state
    assert saved.trained_compression_factors == [1, 2, 3]
    assert saved.embedding_scale == pytest.approx(model.state.embedding_scale)
    steps = read_metrics(res.metrics_path, "step")
    assert {s["r"] for s in steps} <= {1, 2, 3} and len({s["r"] for s in steps}) > 1
    assert any(s["auto_prompt"] for s in steps) and any(s["latent"] > 0 for s in steps)
    ev = read_metrics(res.metrics_path, "eval")[-1]
    for k in (1, 2, 3):
        assert 0 <= ev[f"acc_c{k}"] <= 1 and 1 <= ev[f"mean_latents_c{k}"] <= 8
    assert ev["score"] == pytest.approx(sum(ev[f"acc_c{k}"] for k in (1, 2, 3)) / 3)
    assert len(list((tmp_path / "best").iterdir())) == 2


def test_colar_batches_share_r_and_nocot_drops_steps(data):
    train, _, tok = data
    enc = PromptEncoder(tok)
    c = cfg(objective=ObjectiveConfig(mode="colar", compression_factors=[2, 4]), grad_accum=3)
    batches = SFTBatches([enc.encode(r) for r in train], enc, c)
    sb = batches(0)
    assert len(sb.micro_batches) == 3 and {b.r for b in sb.micro_batches} == {sb.info["r"]} <= {2, 4}
    nocot = cfg(objective=ObjectiveConfig(mode="nocot"))
    b = SFTBatches([enc.encode(r, with_steps=False) for r in train], enc, nocot)(0).micro_batches[0]
    assert b.r == 1 and b.group_ids.shape[1] == 1 and bool((b.group_labels == IGNORE).all())


def test_data_order_is_a_seeded_permutation_per_epoch_split_across_ranks(data):
    train, _, tok = data
    enc = PromptEncoder(tok)
    ex = [enc.encode(r) for r in train]
    c = cfg(batch_size=8)
    r0, r1 = SFTBatches(ex, enc, c, rank=0, world_size=2), SFTBatches(ex, enc, c, rank=1, world_size=2)
    seen = []
    for _ in range(3):  # 48 examples, 16 per micro-step: exactly one epoch
        seen += r0.order.next_indices() + r1.order.next_indices()
    assert sorted(seen) == list(range(48)) and r0.order.epoch == 0
    r0.order.next_indices()
    assert r0.order.epoch == 1 and r0.order.index == 16


def test_length_grouping_cuts_padding_and_stays_a_seeded_resumable_permutation(data):
    train, _, tok = data
    enc = PromptEncoder(tok)
    ex = [enc.encode(r) for r in train]
    obj = ObjectiveConfig(mode="colar", compression_factors=[1, 2, 3])

    def padding(batches, steps):
        slots = real = 0
        for step in range(steps):
            b = batches(step).micro_batches[0]
            slots, real = slots + b.packed_mask.numel(), real + int(b.packed_mask.sum())
        return 1 - real / slots

    plain = padding(SFTBatches(ex, enc, cfg(batch_size=4, objective=obj)), 12)
    grouped = padding(SFTBatches(ex, enc, cfg(batch_size=4, objective=obj, length_grouping=12)), 12)
    assert grouped < 0.5 * plain, (grouped, plain)

    c = cfg(batch_size=4, objective=obj, length_grouping=4)
    a = SFTBatches(ex, enc, c)
    first_epoch = [i for _ in range(12) for i in a.order.next_indices()]
    assert sorted(first_epoch) == list(range(48))  # still every example once per epoch
    assert first_epoch != SFTBatches(ex, enc, cfg(batch_size=4, objective=obj)).order.permutation()
    for _ in range(3):
        a(0)
    b = SFTBatches(ex, enc, c)
    b.load_state_dict(a.state_dict())
    assert [x.tolist() for x in (a(0).micro_batches[0].packed_mask, a(1).micro_batches[0].group_ids)] == \
        [x.tolist() for x in (b(0).micro_batches[0].packed_mask, b(1).micro_batches[0].group_ids)]


# ----------------------------------------------------------------------------------------------
# resume exactness
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", pytest.param("deepspeed", marks=pytest.mark.slow)])
def test_interrupted_and_resumed_run_matches_uninterrupted(data, tmp_path, backend):
    """Same seed, same final loss: tolerance 1e-6 relative (CPU runs are bit-identical here)."""
    train, val, tok = data
    c = cfg(backend=backend, objective=ObjectiveConfig(mode="colar", compression_factors=[1, 2, 3], auto_prob=0.2),
            max_steps=16, checkpoint_every=6, grad_accum=2, warmup_steps=3, lr_schedule="cosine")
    a = train_sft(tiny_model(tok), tok, train, val, c, tmp_path / "a")
    with pytest.raises(Crash):
        train_sft(tiny_model(tok), tok, train, val, c, tmp_path / "b", callbacks=[CrashAt(9)])
    assert latest_checkpoint(tmp_path / "b").name == "step_00000006"
    b = train_sft(tiny_model(tok, seed=123), tok, train, val, c, tmp_path / "b")  # init is overwritten by the resume
    assert b.resumed_from == 6 and b.final_step == 16
    la, lb = step_losses(a.metrics_path), step_losses(b.metrics_path)
    assert len(lb) == 16  # steps 7..9 of the dead run were dropped and redone
    assert lb[-1] == pytest.approx(la[-1], rel=1e-6)
    assert lb == pytest.approx(la, rel=1e-6)
    wa = ColarModel.from_pretrained(a.model_dir).state_dict()
    wb = ColarModel.from_pretrained(b.model_dir).state_dict()
    assert all(torch.allclose(wa[k], wb[k], rtol=1e-5, atol=1e-7) for k in wa)


# ----------------------------------------------------------------------------------------------
# callbacks
# ----------------------------------------------------------------------------------------------
def test_jsonl_logger_drops_records_the_resumed_run_redoes(tmp_path):
    log = JsonlLogger(tmp_path / "metrics.jsonl")
    log.on_train_start({"step": 0, "resumed_from": None})
    for s in range(1, 8):
        log.on_step(s, {"loss": 1.0 / s})
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write('{"event": "step", "st')  # cut by a kill
    log = JsonlLogger(tmp_path / "metrics.jsonl")
    log.on_train_start({"step": 5, "resumed_from": 5})
    recs = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in recs if r["event"] == "step"] == [1, 2, 3, 4, 5]
    assert [r["resumed_from"] for r in recs if r["event"] == "start"] == [None, 5]


def test_console_logger_prints_about_twenty_lines_with_eta_to_a_sink_and_replaces_the_default(monkeypatch):
    from colar_core.training.callbacks import stage_callbacks

    lines: list[str] = []
    log = ConsoleLogger(sink=lines.append)
    log.on_train_start({"step": 0, "max_steps": 200, "resumed_from": None})
    for step in range(1, 201):
        log.on_step(step, {"loss": 1.0, "lr": 1e-4})
    log.on_train_end({"step": 200})
    steps = [line for line in lines if line.startswith("[train] step")]
    assert len(steps) == 20 and steps[0].startswith("[train] step 10/200") and "ETA" in steps[0]
    assert "ETA" not in steps[-1] and lines[-1].startswith("[train] done at step 200")

    mine = ConsoleLogger(sink=lines.append)
    built = stage_callbacks(Path("m.jsonl"), [mine])
    assert [c for c in built if isinstance(c, ConsoleLogger)] == [mine]  # the caller's replaces the default
    assert sum(isinstance(c, ConsoleLogger) for c in stage_callbacks(Path("m.jsonl"))) == 1

    import io

    monkeypatch.setenv("CI", "true")
    monkeypatch.setenv("COLAR_PROGRESS", "1")  # forced on, e.g. a launched job whose output is a pipe
    buf = io.StringIO()
    ConsoleLogger(stream=buf, every=1).on_step(1, {"loss": 1.0})
    assert "step 1" in buf.getvalue()


def test_console_logger_is_quiet_under_ci(monkeypatch, capsys):
    monkeypatch.setenv("CI", "true")
    ConsoleLogger().on_step(10, {"loss": 1.0})
    assert capsys.readouterr().err == ""
    monkeypatch.delenv("CI")
    import io

    buf = io.StringIO()
    ConsoleLogger(quiet=False, stream=buf, every=1).on_step(3, {"loss": 1.5, "r": 2, "lr": 1e-4})
    assert "step 3" in buf.getvalue() and "loss 1.5000" in buf.getvalue()
