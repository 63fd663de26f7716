"""What a training stage leaves behind: in its process, no DeepSpeed engine once it ends (finished or failed);
on disk, checkpoints without the frozen base weights of a LoRA model (resumed exactly), and one copy of the
weights its best export and its final model share.

Found by the rehearsal of the GPU recipes (``colar rehearse``, issue 24): stages run one after another in the
flow's process, and each finished stage's engine (optimizer state, fp32 master weights) stayed alive, held
by ZeRO's gradient hooks on the model's parameters; a DeepSpeed checkpoint of the 1B recipe cut to 2 layers
was 0.81 GB of frozen weights out of 1.03 GB; at full size each stage folder held its 2.5 GB model twice
(``best/`` and ``model/``).
"""

from __future__ import annotations

import gc
import threading

import psutil
import pytest
import torch
from torch import nn

from colar_core.config import GenerationConfig, LoraConfig, ModelConfig, ObjectiveConfig
from colar_core.data import builtin_splits
from colar_core.devices import _malloc_trim, release_memory
from colar_core.model import ColarModel
from colar_core.tokenizer import build_tokenizer
from colar_core.training.checkpoint import latest_checkpoint
from colar_core.training.config import TrainConfig
from colar_core.training.engines import load_trained_state
from colar_core.training.sft import train_sft
from tests.helpers import Crash, CrashAt

TINY = dict(arch="llama", hidden_size=64, num_layers=2, num_heads=4)

pytestmark = pytest.mark.one_torch_thread  # see tests/conftest.py


@pytest.fixture(scope="module")
def data():
    splits = builtin_splits(48, 8, 0, seed=0)
    return splits["train"], splits["val"], build_tokenizer(splits["train"] + splits["val"])


def lora_model(tokenizer, seed: int = 0) -> ColarModel:
    torch.manual_seed(seed)
    return ColarModel.build(ModelConfig(tiny=TINY, lora=LoraConfig(r=4, alpha=8)), tokenizer)


def sft_cfg(**kw) -> TrainConfig:
    base = dict(backend="deepspeed", zero_stage=2, max_steps=8, batch_size=8, lr=3e-3, checkpoint_every=4,
                objective=ObjectiveConfig(mode="colar", compression_factors=[1, 2]),
                generation=GenerationConfig(do_sample=False, sample_latents=False, max_latents=8, max_cot_tokens=40))
    base.update(kw)
    return TrainConfig(**base)


def live_deepspeed_engines() -> int:
    from deepspeed.runtime.engine import DeepSpeedEngine

    gc.collect()
    return sum(isinstance(o, DeepSpeedEngine) for o in gc.get_objects())


# ----------------------------------------------------------------------------------------------
# the engine goes when the stage ends
# ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_no_deepspeed_engine_outlives_its_stage_finished_or_failed(data, tmp_path):
    train, val, tok = data
    before = live_deepspeed_engines()
    model = lora_model(tok)
    result = train_sft(model, tok, train, val, sft_cfg(max_steps=2, checkpoint_every=0), tmp_path / "ok")
    assert result.final_step == 2
    assert live_deepspeed_engines() == before  # the model is still referenced here: its hooks are gone
    with pytest.raises(Crash):
        train_sft(lora_model(tok), tok, train, val, sft_cfg(max_steps=4, checkpoint_every=0), tmp_path / "crash",
                  callbacks=[CrashAt(1)])
    assert live_deepspeed_engines() == before
    # the model a stage trained can still be used in this process (the next stage may take it in memory)
    logits = model.lm(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits).all()


# ----------------------------------------------------------------------------------------------
# checkpoints hold what training changes
# ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_lora_checkpoint_leaves_out_the_frozen_base_and_resumes_exactly(data, tmp_path):
    train, val, tok = data
    c = sft_cfg()
    a = train_sft(lora_model(tok), tok, train, val, c, tmp_path / "a")
    with pytest.raises(Crash):
        train_sft(lora_model(tok), tok, train, val, c, tmp_path / "b", callbacks=[CrashAt(6)])
    ckpt = latest_checkpoint(tmp_path / "b")
    assert ckpt.name == "step_00000004"
    states = [p for p in ckpt.rglob("*model_states.pt")]
    assert states, sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*"))
    saved = torch.load(states[0], map_location="cpu", weights_only=False)["module"]
    model = lora_model(tok)
    # every name of a frozen tensor: a tied LM head is the frozen embedding under a second name
    frozen = {n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert frozen and trained
    names = {k.removeprefix("model.") for k in saved}
    assert not names & frozen  # no base weight in the checkpoint
    assert trained <= names  # every adapter and head weight is

    # the stage rebuilds the same base (a seeded build, or the same pretrained weights); its trained weights
    # are moved away here, so only the checkpoint can bring them back
    resumed = lora_model(tok)
    with torch.no_grad():
        for p in resumed.parameters():
            if p.requires_grad:
                p.add_(0.5)
    b = train_sft(resumed, tok, train, val, c, tmp_path / "b")
    assert b.resumed_from == 4 and b.final_step == 8
    wa = ColarModel.from_pretrained(a.model_dir).state_dict()
    wb = ColarModel.from_pretrained(b.model_dir).state_dict()
    assert wa.keys() == wb.keys()
    assert all(torch.allclose(wa[k], wb[k], rtol=1e-5, atol=1e-7) for k in wa)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.base = nn.Linear(3, 3)
        self.head = nn.Linear(3, 1)
        self.base.requires_grad_(False)


def test_loading_a_checkpoint_without_frozen_weights_is_strict_for_the_trained_ones():
    src, dst = _Net(), _Net()
    trained_only = {k: v for k, v in src.state_dict().items() if k.startswith("head.")}
    base_before = dst.base.weight.clone()
    load_trained_state(trained_only, dst)
    assert torch.equal(dst.head.weight, src.head.weight) and torch.equal(dst.base.weight, base_before)

    with pytest.raises(RuntimeError, match=r"head\.bias"):
        load_trained_state({"head.weight": src.head.weight}, _Net())
    with pytest.raises(RuntimeError, match="tail.weight"):
        load_trained_state({**trained_only, "tail.weight": torch.zeros(1)}, _Net())


def test_the_final_model_taken_from_the_best_export_shares_its_files(data, tmp_path):
    train, val, tok = data
    c = sft_cfg(backend="torch", max_steps=2, checkpoint_every=0, eval_every=2, eval_size=2, keep_best=1,
                final_model="best")
    result = train_sft(lora_model(tok), tok, train, val, c, tmp_path / "run")
    assert result.best_model_dir is not None and result.best_model_dir.is_dir()
    files = [p.relative_to(result.model_dir) for p in result.model_dir.rglob("*") if p.is_file()]
    assert files and any(p.suffix == ".safetensors" for p in files)
    for rel in files:  # the same inode: the weights are on disk once
        assert (result.model_dir / rel).stat().st_ino == (result.best_model_dir / rel).stat().st_ino, rel
    ColarModel.from_pretrained(result.model_dir)


@pytest.mark.skipif(_malloc_trim() is None, reason="glibc only")
def test_release_memory_gives_back_what_a_stage_freed_but_the_allocator_kept():
    """What the flow's process showed between stages (in a Prefect worker thread, model-sized tensors freed
    between small ones that stay): no tensor alive, yet the memory still resident until trimmed."""
    me = psutil.Process()
    freed = torch.ones(4 * 2**20)  # 16 MB, mmapped: freeing it raises glibc's mmap threshold to 16 MB
    del freed
    kept: list[torch.Tensor] = []

    def stage():
        weights = []
        for _ in range(200):  # 800 MB of 4 MB tensors from the heap, each followed by one that stays
            weights.append(torch.ones(2**20))
            kept.append(torch.ones(8))
        del weights

    before = me.memory_info().rss
    worker = threading.Thread(target=stage)
    worker.start()
    worker.join()
    held = me.memory_info().rss - before
    assert held > 500e6  # freed, still resident: what each stage of the 1B rehearsal left
    assert release_memory()
    assert me.memory_info().rss - before < 100e6
