"""``colar plan`` (colar_core.capacity): its memory figures against torch's measured peak, its FLOPs against
torch's FLOP counter, its parameter counts against built models, and the command's table and warnings.

How memory is measured: torch's own CPU allocator events (``torch.profiler`` with ``profile_memory``: every
allocation and free of torch's CPU allocator, in bytes, with its time), summed in time order from before
the model is built, through two training steps (forward, backward, AdamW). That counts tensors exactly,
without the process's other memory (RSS would add the Python heap, libraries and freed-but-kept pages,
which swamp a tiny model). Gradients are zeroed in place between steps (``set_to_none=False``), so the
second step runs with weights, gradients and AdamW state all alive, as the plan adds them (and as
DeepSpeed keeps its gradient buffers). Activations are measured as the highest rise above what was alive
when the second step's forward began, up to the end of its backward.

How FLOPs are counted: ``torch.utils.flop_counter.FlopCounterMode`` over one forward + backward of the SFT
loss, with eager attention (the counter has no formula for the CPU flash kernel). Both it and the plan count
matmuls only, 2 FLOPs per multiply-add, on the same shapes, so they must agree to rounding: the tolerance
is 0.1 %, and a wrong term (the LM head at every position instead of the labelled ones, LoRA's frozen
weights charged 6 N or 2 N instead of 4 N, attention's backward left out) moves them by several percent.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch.profiler import ProfilerActivity, profile, record_function
from torch.utils.flop_counter import FlopCounterMode

from colar_core import capacity as cap
from colar_core.collate import collate
from colar_core.config import ConfigError, LoraConfig, ModelConfig, ObjectiveConfig
from colar_core.data.synthetic import builtin_splits
from colar_core.latent_head import LatentHead
from colar_core.model import ColarModel, ColarState
from colar_core.text import PromptEncoder
from colar_core.tokenizer import build_tokenizer
from flows.cli import main
from flows.config import load_config

SMOLLM2 = cap.ARCHS_DIR / "smollm2-135m-instruct.json"
LLAMA_1B = cap.ARCHS_DIR / "llama-3.2-1b-instruct.json"
MEMORY_TOLERANCE = 0.20
NARROW = dict(hidden_size=64, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
FLOP_TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def data():
    splits = builtin_splits(300, 10, 10, seed=0, difficulty="tiny")
    tokenizer = build_tokenizer(splits["train"] + splits["val"])
    return splits["train"], tokenizer, PromptEncoder(tokenizer)


def tiny_config(
    lora: bool = False, dtype: str = "float32", layers: int = 3, kv=None, targets=("q_proj", "v_proj")
) -> ModelConfig:
    return ModelConfig(
        tiny=dict(arch="llama", hidden_size=128, num_layers=layers, num_heads=4, num_kv_heads=kv),
        lora=LoraConfig(r=8, target_modules=list(targets)) if lora else None,
        dtype=dtype,
    )


def smollm2_model(layers: int | None = None, lora: LoraConfig | None = None, **widths) -> tuple[ColarModel, cap.Arch]:
    """A SmolLM2-135M-shaped CoLaR model, randomly initialised from the architecture file (no weights);
    ``layers`` and ``widths`` (config.json keys) shrink it."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    conf = {k: v for k, v in json.loads(SMOLLM2.read_text()).items() if not k.startswith("_") and k != "torch_dtype"}
    if layers is not None:
        conf["num_hidden_layers"] = layers
    conf.update(widths)
    arch = cap.arch_from_hf_config(conf, "SmolLM2-135M-shaped")
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(LlamaConfig(**conf))
    if lora is not None:
        lm = get_peft_model(
            lm,
            PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, target_modules=lora.target_modules, task_type="CAUSAL_LM"),
        )
    state = ColarState(base_model="smollm2-shaped", hidden_size=arch.hidden, latent_intermediate_size=arch.hidden)
    return ColarModel(lm, LatentHead(arch.hidden), state), arch


def batch_of(encoder, records, mode: str, r: int, rows: int):
    examples = [encoder.encode(x, with_steps=mode != "nocot") for x in records[:rows]]
    return collate(examples, encoder, r, generator=torch.Generator().manual_seed(0))


def shape_of(batch, objective: ObjectiveConfig) -> cap.PassShape:
    """The plan's description of one real batch: rows x packed width, labels, latent positions."""
    b, w = batch.packed_mask.shape
    labels = batch.label_index.numel() + (batch.open_label_index.numel() if objective.opening_think_label else 0)
    latents = batch.latent_src.numel() + batch.end_latent_src.numel() if objective.mode == "colar" else 0
    return cap.PassShape(b * w, b * w * w, labels, latents)


def measure_training_step(build, batch, objective: ObjectiveConfig) -> tuple[float, float, ColarModel]:
    """(peak bytes of torch's CPU allocator over build + two AdamW steps, peak rise during the second step's
    forward + backward, the model)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model = build()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        for step in range(2):
            with record_function(f"capacity-step-{step}"):
                model.sft_loss(batch, objective, torch.Generator().manual_seed(step))["loss"].backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=False)
    events = prof.profiler.kineto_results.events()
    mark = next(e for e in events if e.name() == "capacity-step-1")
    memory = sorted(
        (e for e in events if e.name() == "[memory]" and e.device_type() == torch._C._autograd.DeviceType.CPU),
        key=lambda e: e.start_ns(),
    )
    live = peak = rise = 0.0
    start = None
    for e in memory:
        if start is None and e.start_ns() >= mark.start_ns():
            start = live
        live += e.nbytes()
        peak = max(peak, live)
        if start is not None and e.start_ns() <= mark.end_ns():
            rise = max(rise, live - start)
    return peak, rise, model


def plan_memory(model_cfg: ModelConfig, arch: cap.Arch, shape: cap.PassShape) -> cap.Memory:
    trained = cap.Trained.of(model_cfg, arch)
    nm = cap.numerics(model_cfg.dtype, "fp32", "torch", None)
    counts = cap.param_counts(arch, trained, arch.hidden)
    return cap.training_memory(arch, trained, nm, counts, shape, arch.hidden)


# ---------------------------------------------------------------------------------------------------------
# (1) memory against torch's measured peak


@pytest.mark.parametrize(
    "dtype,lora,mode,r,rows",
    [
        ("float32", False, "cot", 1, 16),  # activations dominate
        ("float32", False, "cot", 1, 2),  # weights + gradients + AdamW state dominate
        ("float32", False, "colar", 2, 16),  # latent head, compressed groups
        ("bfloat16", True, "colar", 3, 16),  # LoRA on a bf16 base: peft's fp32 adapters keep fp32 copies of inputs
    ],
)
def test_memory_matches_torchs_measured_peak_on_the_tiny_model(data, dtype, lora, mode, r, rows):
    records, tokenizer, encoder = data
    model_cfg = tiny_config(lora=lora, dtype=dtype)
    objective = ObjectiveConfig(mode=mode, compression_factors=[r])
    batch = batch_of(encoder, records, mode, r, rows)
    torch.manual_seed(0)
    peak, act, model = measure_training_step(lambda: ColarModel.build(model_cfg, tokenizer), batch, objective)
    arch = cap.arch_from_tiny(model_cfg.tiny, len(tokenizer))
    assert cap.param_counts(arch, cap.Trained.of(model_cfg, arch), arch.hidden).total == sum(
        p.numel() for p in model.parameters()
    )
    planned = plan_memory(model_cfg, arch, shape_of(batch, objective))
    assert planned.total == pytest.approx(peak, rel=MEMORY_TOLERANCE), (planned, peak)
    assert planned.activations == pytest.approx(act, rel=MEMORY_TOLERANCE), (planned.activations, act)


@pytest.mark.parametrize("lora,rows", [(False, 1), (True, 8)])
def test_memory_where_the_vocabulary_dominates_matches_the_measured_peak(data, lora, rows):
    """SmolLM2's vocabulary (49,152) on a narrow two-layer body. Full fine-tuning: the peak is the end of the
    backward, where the tied embedding's dense gradient, the LM head's (held until then) and their sum
    meet; LoRA: the cross-entropy's fp32 log-softmax and its gradients at the start of the backward."""
    records, _, encoder = data
    objective = ObjectiveConfig(mode="cot", compression_factors=[1])
    batch = batch_of(encoder, records, "cot", 1, rows)
    model_cfg = ModelConfig(lora=LoraConfig(r=8) if lora else None)
    arch_box: list[cap.Arch] = []

    def build():
        model, arch = smollm2_model(layers=2, lora=model_cfg.lora, **NARROW)
        arch_box.append(arch)
        return model

    peak, act, _ = measure_training_step(build, batch, objective)
    planned = plan_memory(model_cfg, arch_box[0], shape_of(batch, objective))
    assert planned.total == pytest.approx(peak, rel=MEMORY_TOLERANCE)
    assert planned.activations == pytest.approx(act, rel=MEMORY_TOLERANCE)


def test_memory_with_gradient_checkpointing_matches_the_measured_peak(data):
    records, tokenizer, encoder = data
    model_cfg = tiny_config(layers=6)
    objective = ObjectiveConfig(mode="cot", compression_factors=[1])
    batch = batch_of(encoder, records, "cot", 1, 32)

    def build():
        model = ColarModel.build(model_cfg, tokenizer)
        model.causal_lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model

    _, act, _ = measure_training_step(build, batch, objective)
    planned = plan_memory(model_cfg, cap.arch_from_tiny(model_cfg.tiny, len(tokenizer)), shape_of(batch, objective))
    assert planned.activations_ckpt == pytest.approx(act, rel=MEMORY_TOLERANCE)
    assert planned.activations > 1.5 * act  # what checkpointing saves is visible in the plan


@pytest.mark.slow
def test_memory_matches_torchs_measured_peak_at_smollm2_size(data):
    """SmolLM2-135M's architecture, randomly initialised (135 M fp32 parameters: ~2.2 GB of weights, gradients
    and AdamW state; ~30 s on two cores)."""
    records, _, encoder = data
    objective = ObjectiveConfig(mode="colar", compression_factors=[2])
    batch = batch_of(encoder, records, "colar", 2, 4)
    arch_box: list[cap.Arch] = []

    def build():
        model, arch = smollm2_model()
        arch_box.append(arch)
        return model

    peak, act, _ = measure_training_step(build, batch, objective)
    arch = arch_box[0]
    planned = plan_memory(ModelConfig(), arch, shape_of(batch, objective))
    assert planned.total == pytest.approx(peak, rel=MEMORY_TOLERANCE)
    assert planned.activations == pytest.approx(act, rel=MEMORY_TOLERANCE)


# ---------------------------------------------------------------------------------------------------------
# (2) FLOPs against torch's FLOP counter


def counted_flops(model: ColarModel, batch, objective: ObjectiveConfig, backward: bool = True) -> int:
    model.causal_lm.set_attn_implementation("eager")  # the counter has no formula for CPU flash attention
    with FlopCounterMode(display=False) as counter:
        if backward:
            model.sft_loss(batch, objective, torch.Generator().manual_seed(0))["loss"].backward()
        else:
            with torch.no_grad():
                model.sft_loss(batch, objective, torch.Generator().manual_seed(0))
    return counter.get_total_flops()


@pytest.mark.parametrize(
    "lora,targets,mode,r,kv",
    [
        (False, (), "cot", 1, None),  # full fine-tuning: 6 N per position (+ attention, LM head at labels)
        (False, (), "colar", 3, 2),  # grouped-query attention, latent head
        (True, ("q_proj", "v_proj"), "colar", 2, None),  # the recipes' LoRA: 4 N frozen + 6 N adapters
        (True, ("o_proj", "down_proj"), "cot", 1, None),  # adapters later in the layer: less of layer 0 in the backward
    ],
)
def test_flops_match_the_flop_counter_on_the_tiny_model(data, lora, targets, mode, r, kv):
    records, tokenizer, encoder = data
    model_cfg = tiny_config(lora=lora, kv=kv, targets=targets or ("q_proj",))
    torch.manual_seed(0)
    model = ColarModel.build(model_cfg, tokenizer)
    objective = ObjectiveConfig(mode=mode, compression_factors=[r])
    batch = batch_of(encoder, records, mode, r, 16)
    arch = cap.arch_from_tiny(model_cfg.tiny, len(tokenizer))
    trained = cap.Trained.of(model_cfg, arch)
    nm = cap.numerics("float32", "fp32", "torch", None)
    planned = cap.decoder_flops(arch, trained, nm, shape_of(batch, objective), arch.hidden)
    assert planned == pytest.approx(counted_flops(model, batch, objective), rel=FLOP_TOLERANCE)
    forward = cap.decoder_flops(arch, trained, nm, shape_of(batch, objective), arch.hidden, backward=False)
    assert forward == pytest.approx(counted_flops(model, batch, objective, backward=False), rel=FLOP_TOLERANCE)


@pytest.mark.parametrize("layers", [2, pytest.param(None, marks=pytest.mark.slow)])
def test_flops_match_the_flop_counter_at_smollm2_shape(data, layers):
    """SmolLM2-135M's widths (9 heads, 3 kv heads, MLP 1536, vocab 49152); two layers by default, all 30 in
    the slow run (~30 s: the counter's forward + backward of 135 M parameters on two cores)."""
    records, _, encoder = data
    model, arch = smollm2_model(layers)
    objective = ObjectiveConfig(mode="colar", compression_factors=[2])
    batch = batch_of(encoder, records, "colar", 2, 4)
    full = cap.Trained(full=True, embeddings=True, lm_head=True)
    planned = cap.decoder_flops(
        arch, full, cap.numerics("float32", "fp32", "torch", None), shape_of(batch, objective), arch.hidden
    )
    assert planned == pytest.approx(counted_flops(model, batch, objective), rel=FLOP_TOLERANCE)


def test_parameter_counts_match_the_models_the_architecture_files_build():
    """Built on the meta device (no memory, no weights): Llama-3.2-1B has 1,235,814,400 parameters."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    for path, expected in ((LLAMA_1B, 1_235_814_400), (SMOLLM2, 134_515_008)):
        conf = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}
        with torch.device("meta"):
            lm = AutoModelForCausalLM.from_config(LlamaConfig(**conf))
        arch = cap.arch_from_hf_config(conf, str(path))
        counts = cap.param_counts(arch, cap.Trained(full=True, embeddings=True, lm_head=True))
        assert counts.backbone == sum(p.numel() for p in lm.parameters()) == expected


# ---------------------------------------------------------------------------------------------------------
# (3), (4) the command


def test_plan_prints_each_stage_of_gsm8k_with_its_assumptions(capsys):
    assert main(["plan", "--config", "configs/gsm8k.yaml", "--gpu", "h100"]) == 0
    out = capsys.readouterr().out
    cfg = load_config("configs/gsm8k.yaml")
    expected = (
        ["sft-cot", "sft-colar"] + (["rl"] if cfg.rl else []) + (["sft-nocot"] if cfg.eval.nocot_baseline else [])
    )
    lines = out.splitlines()
    for column in ("trained", "numerics"):  # the compute table, then the memory table
        start = next(i for i, line in enumerate(lines) if line.split()[:2] == ["stage", column]) + 2
        names = [line.split()[0] for line in lines[start : start + len(expected)]]
        assert names == expected, (column, names)
    assert "NVIDIA H100" in out and "Llama-3.2-1B-Instruct" in out and "Assumptions:" in out
    assert "ESTIMATED" in out or "the tokenizer of" in out  # says where the token counts come from
    assert "WARNING" not in out  # LoRA on a 1B model fits an H100


def test_plan_json_hours_follow_flops_gpus_and_mfu(capsys):
    def plan(*extra: str) -> dict:
        assert main(["plan", "--config", "configs/gsm8k.yaml", "--json", *extra]) == 0
        return json.loads(capsys.readouterr().out)

    one, two, slow = plan(), plan("--gpus", "2"), plan("--mfu", "0.2")
    for stage in one["stages"]:
        if stage["name"] != "rl":  # decoding hours may sit on the weight-streaming floor
            compute = stage["flops_parts"]["train"] / (cap.GPUS["h100"].bf16_tflops * 1e12 * 0.4) / 3600
            assert stage["hours"] == pytest.approx(compute, rel=0.05)
    assert two["hours"] == pytest.approx(one["hours"] / 2, rel=0.02)
    assert two["gpu_hours"] == pytest.approx(one["gpu_hours"], rel=0.02)
    assert slow["hours"] == pytest.approx(2 * one["hours"], rel=0.02)
    assert one["hours"] == pytest.approx(sum(s["hours"] for s in one["stages"]))


def test_plan_warns_when_a_stage_will_not_fit_the_gpu(capsys):
    crafted = [
        "--config",
        "configs/gsm8k.yaml",
        "--set",
        "model.lora=null",
        "--set",
        "sft_cot.batch_size=64",
        "--set",
        "sft_cot.grad_accum=4",
    ]  # full fine-tuning of the 1B model, 64 sequences per micro-batch
    assert main(["plan", *crafted, "--gpu", "l40s"]) == 0
    out = capsys.readouterr().out
    warned = {line.split()[1] for line in out.splitlines() if line.startswith("WARNING")}
    assert warned == {"sft-cot", "sft-nocot"}  # sft-nocot trains with sft_cot's section; sft-colar keeps 32
    usable = cap.GPUS["l40s"].memory_bytes * cap.USABLE_MEMORY / 2**30
    assert f"more than {usable:.1f} GiB usable on a NVIDIA L40S" in out
    assert main(["plan", *crafted, "--gpu", "h200"]) == 0
    assert "WARNING" not in capsys.readouterr().out


def test_a_bad_gpu_names_the_choices(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["plan", "--config", "configs/gsm8k.yaml", "--gpu", "v100"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "v100" in err and all(name in err for name in cap.GPUS)
    with pytest.raises(ConfigError, match="--gpu.*h100, h200, a100-80gb, l40s"):
        cap.build_plan(load_config(None), gpu="v100")


def test_a_model_without_an_architecture_file_is_named(capsys):
    assert main(["plan", "--set", "model.name_or_path=someone/unknown-model"]) == 2
    err = capsys.readouterr().err
    assert "model.name_or_path" in err and "someone/unknown-model" in err and "unknown-model.json" in err


def test_lengths_follow_the_collated_batches(data):
    """The plan's per-record positions and labels are what colar_core.collate builds for one record."""
    records, tokenizer, encoder = data
    counter, _ = cap.make_counter(ModelConfig(), records)
    lengths = cap.Lengths.of(records[:8], counter, [1, 3])
    for mode, r in (("cot", 1), ("colar", 3), ("nocot", 1)):
        objective = ObjectiveConfig(mode=mode, compression_factors=[r])
        for i, (pos, labels, latents) in enumerate(lengths.rows(mode, r)):
            batch = batch_of(encoder, records[i:], mode, r, 1)
            shape = shape_of(batch, objective)
            assert (pos, labels, latents) == (shape.positions, shape.labels, shape.latents)
