"""The baselines' curricula as named options (issue 25, item 3): 'reference' (xiaomi-research/colar's
``ceil(epoch + 1 / n_epochs_per_stage)``, coconut.py:23-26, icot.py:19-22), 'colar' (one stage per
``epochs_per_stage`` epochs) and 'coconut' (facebookresearch/coconut's run.py and dataset.py:254-266),
each against stage sequences computed by hand; and the Table-1 configs choose 'reference'."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from bench.tiny import encoder_for, tiny_tokenizer
from colar_core.baselines.batches import (
    CurriculumBatches,
    curriculum_stage,
    last_stage_epochs,
    remaining_steps,
    thoughts_at,
)
from colar_core.baselines.config import CoconutConfig, ICoTConfig
from colar_core.baselines.stage import _steps_to_last_stage
from colar_core.data.records import Record
from colar_core.training.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]
CHAINS = [
    Record(
        f"c{i}",
        f"Al has {i} cats and gets 2 more, then 3 more.",
        (f"{i}+2={i + 2}", f"{i + 2}+3={i + 5}", f"{i + 5}*1={i + 5}"),
        str(i + 5),
    )
    for i in range(8)
]


def _stages(cfg, epochs) -> list[int]:
    return [curriculum_stage(e, cfg) for e in epochs]


def test_reference_curriculum_is_one_stage_per_epoch_by_operator_precedence():
    # ceil(epoch + 1/2): 1, 2, 3, 3, ... on whole epochs, whatever happens inside an epoch
    cfg = ICoTConfig(curriculum="reference", epochs_per_stage=2, max_stage=3)
    assert _stages(cfg, (0, 0.5, 0.99, 1, 1.5, 2, 3, 49)) == [1, 1, 1, 2, 2, 3, 3, 3]
    assert _stages(cfg.model_copy(update={"epochs_per_stage": 1}), (0, 1, 2, 5)) == [1, 2, 3, 3]
    # the expression as written: 1 / 0.5 = 2 starts at stage 2
    assert _stages(cfg.model_copy(update={"epochs_per_stage": 0.5}), (0, 0.9, 1)) == [2, 2, 3]


def test_colar_curriculum_is_one_stage_per_epochs_per_stage_and_stays_the_default():
    cfg = ICoTConfig(epochs_per_stage=2, max_stage=3)
    assert cfg.curriculum == "colar"
    assert _stages(cfg, (0, 1, 1.99, 2, 3.5, 4, 50)) == [1, 1, 1, 2, 2, 3, 3]


def test_coconut_curriculum_has_epochs_per_stage_per_stage_and_a_last_phase_without_steps():
    cfg = CoconutConfig(curriculum="coconut", epochs_per_stage=3, max_stage=3, thoughts_per_step=2)
    # from the CoT model: stage 1 at once (its GSM run resumes the CoT model at epoch 3), stage 4 = all dropped
    assert _stages(cfg, (0, 2.9, 3, 5.9, 6, 9, 12, 24)) == [1, 1, 2, 2, 3, 4, 4, 4]
    scratch = cfg.model_copy(update={"init_from_cot": False})
    assert _stages(scratch, (0, 2.9, 3, 9, 12)) == [0, 0, 1, 3, 4]  # stage 0: plain CoT
    steps = ("a", "b", "c", "d", "e")
    assert [remaining_steps(steps, k, 3, "coconut") for k in (0, 1, 3, 4)] == [steps, steps[1:], ("d", "e"), ()]
    assert remaining_steps(steps, 3, 3, "colar") == remaining_steps(steps, 3, 3, "reference") == ()
    assert [thoughts_at(k, cfg) for k in (0, 1, 3, 4)] == [0, 2, 6, 6]  # k * c, then max_stage * c


def test_each_curriculum_knows_when_its_last_stage_starts():
    icot = ICoTConfig(epochs_per_stage=2, max_stage=3)
    coconut = CoconutConfig(curriculum="coconut", epochs_per_stage=3, max_stage=3)
    assert last_stage_epochs(icot.model_copy(update={"curriculum": "reference"})) == 2.0
    assert last_stage_epochs(icot) == 4.0
    assert last_stage_epochs(coconut) == 9.0
    assert last_stage_epochs(coconut.model_copy(update={"init_from_cot": False})) == 12.0
    # the stage's check against max_steps: 100 problems, 10 per step
    assert _steps_to_last_stage(icot.model_copy(update={"curriculum": "reference"}), 100, 10) == 20
    assert _steps_to_last_stage(icot, 100, 10) == 40
    assert _steps_to_last_stage(coconut, 100, 10) == 90


@pytest.mark.parametrize(
    "curriculum, stages, thoughts, kept",
    [
        ("reference", [1] * 4 + [2] * 4 + [2] * 2, [1] * 4 + [2] * 4 + [2] * 2, [2] * 4 + [0] * 6),
        ("colar", [1] * 8 + [2] * 2, [1] * 8 + [2] * 2, [2] * 8 + [0] * 2),
        ("coconut", [1] * 4 + [2] * 4 + [3] * 2, [1] * 4 + [2] * 4 + [2] * 2, [2] * 4 + [1] * 4 + [0] * 2),
    ],
)
def test_curriculum_batches_follow_the_named_schedule(curriculum, stages, thoughts, kept):
    """8 three-step chains, 2 a batch: 4 steps an epoch; max_stage 2, c = 1, epochs_per_stage 2 (1 for
    'coconut'); ``kept``: steps left in the block (each row the same)."""
    tok = tiny_tokenizer(CHAINS)
    enc = encoder_for(tok)
    method = CoconutConfig(
        curriculum=curriculum, epochs_per_stage=1 if curriculum == "coconut" else 2, max_stage=2, thoughts_per_step=1
    )
    batches = CurriculumBatches(CHAINS, enc, method, TrainConfig(batch_size=2, seed=0))
    seen = [batches(step) for step in range(10)]
    assert [sb.info["stage"] for sb in seen] == stages
    assert [sb.info["n_thoughts"] for sb in seen] == thoughts
    step_tokens = {n: len(enc.encode(Record("x", "q", CHAINS[0].steps[3 - n :], "5")).step_ids) for n in (0, 1, 2)}
    assert [int(sb.micro_batches[0].steps_len[0]) for sb in seen] == [step_tokens[n] for n in kept]


def test_a_bad_curriculum_is_named_by_its_field_with_the_choices():
    assert [ICoTConfig(curriculum=c).curriculum for c in ("reference", "colar", "coconut")] == [
        "reference",
        "colar",
        "coconut",
    ]
    with pytest.raises(ValidationError, match=r"curriculum[\s\S]*'reference', 'colar' or 'coconut'"):
        ICoTConfig(curriculum="fast")
    from flows.config import ConfigError, load_config

    coconut = load_config(None, ["baselines.coconut={curriculum: coconut}"]).baselines.coconut
    assert coconut is not None and coconut.curriculum == "coconut"
    with pytest.raises(ConfigError, match=r"baselines\.coconut\.curriculum[\s\S]*'reference'"):
        load_config(None, ["baselines.coconut={curriculum: fast}"])


def test_the_table1_configs_use_the_reference_curriculum_and_table1_both_protocols():
    from flows.config import load_config

    for name in ("table1.yaml", "table1-gpu.yaml"):
        baselines = load_config(str(REPO / "configs" / name)).baselines
        assert baselines.icot is not None and baselines.coconut is not None, name
        assert (baselines.icot.curriculum, baselines.coconut.curriculum) == ("reference", "reference"), name
    assert load_config(str(REPO / "configs" / "table1.yaml")).eval.protocol == "both"
