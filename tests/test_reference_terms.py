"""Issue 25, item 1: the reference's two SFT terms that colar lacked, each switched by ObjectiveConfig.

* ``opening_think_label``: the reference labels every token after the question, so the ``###`` that
  opens the steps block is a cross-entropy label, predicted from the last prompt position
  (src/models/colar.py:159-164 keep the '###' group's label, 187-189 ignore only pads and the question).
* ``closing_think_latent``: the reference's latent loss covers every real steps position with the next
  input embedding as target (colar.py:201-211), so the last step group predicts the closing '###'.

Expected positions are written out by hand for a two-row batch (the packed layout of ``collate``), and
each term's value is recomputed independently: the prompt alone through the causal LM, one unpacked row
with its groups merged by hand.
"""

import math

import pytest
import torch

from bench.tiny import PROBLEMS, encoder_for, tiny_model, tiny_tokenizer
from colar_core.collate import collate
from colar_core.config import ObjectiveConfig
from colar_core.losses import gaussian_log_prob
from colar_core.text import EncodedExample

OFF = dict(opening_think_label=False, closing_think_latent=False)


class StubEncoder:
    pad_id, think_id, eos_id = 0, 1, 2

    def speed_ids(self, r):
        return (90 + r,)


def ex(q, steps, ans):
    return EncodedExample(tuple(q), tuple(steps), (1,) + tuple(ans) + (2,), "x")


def test_defaults_are_the_reference_terms():
    obj = ObjectiveConfig()
    assert obj.opening_think_label and obj.closing_think_latent


def test_positions_on_a_hand_made_batch():
    # row 0: prompt 10 91 | groups ###, [20 21], [22] | answer ### 30 EOS      packed slots 0..7
    # row 1: prompt 11 12 91 | groups (pad), ###, [23] | answer ### 31 32 EOS  packed slots 9..17 (W = 9)
    batch = collate([ex([10], [20, 21, 22], [30]), ex([11, 12], [23], [31, 32])], StubEncoder(), r=2)
    w, g = batch.packed_mask.shape[1], batch.group_ids.shape[1]
    assert (w, g) == (9, 3)
    # opening '###': predicted by the last prompt token (91): slot 1 of row 0, slot 2 of row 1
    assert batch.open_label_index.tolist() == [1, w + 2]
    assert batch.open_label_targets.tolist() == [1, 1]
    # the packed slot after each of those holds the '###' group
    assert int(batch.pack_index.view(2, w)[0, 2]) == 3 + 0  # row 0: prompt block width 3, group column 0
    # closing latent: the last step group ([22]: slot 4; [23]: slot 9 + 4) predicts the row's '###' group
    # (row 0: column 0 -> flat 0; row 1: column 1 -> flat 3 + 1)
    assert batch.end_latent_src.tolist() == [4, w + 4]
    assert batch.end_latent_tgt.tolist() == [0, g + 1]
    assert batch.group_ids.view(-1, 2)[batch.end_latent_tgt, 0].tolist() == [1, 1]
    # the ordinary latents are unchanged: '###' group -> g1, g1 -> g2 (row 0); '###' group -> [23] (row 1)
    assert batch.latent_src.tolist() == [2, 3, w + 3]
    assert batch.latent_tgt.tolist() == [1, 2, g + 2]


@pytest.mark.parametrize("r", [1, 3])
def test_positions_at_r1_and_for_a_row_without_steps(r):
    # row 0: prompt 10 91 | ###, steps 20 21 22 | answer ### 30 EOS; row 1 has no steps: its '###' group
    # is its last group, so it predicts the closing '###' itself
    batch = collate([ex([10], [20, 21, 22], [30]), ex([11, 12], [], [31])], StubEncoder(), r=r)
    w, g = batch.packed_mask.shape[1], batch.group_ids.shape[1]
    n0 = math.ceil(3 / r)  # step groups of row 0
    assert g == 1 + n0
    assert batch.open_label_index.tolist() == [1, w + 2]
    assert batch.end_latent_src.tolist() == [2 + n0, w + 3]
    assert batch.end_latent_tgt.tolist() == [0, g + g - 1]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_opening_label_is_minus_log_p_of_think_after_the_prompt(tok):
    """The CE with the label = the CE without it, plus one term per row: -log p('###' | prompt), which is
    computed here from the prompt alone through the plain causal LM."""
    torch.manual_seed(0)
    model = tiny_model(tok).eval()
    enc = encoder_for(tok)
    examples = [enc.encode(p) for p in PROBLEMS]
    batch = collate(examples, enc, r=2, generator=torch.Generator().manual_seed(0))
    on = model.sft_loss(batch, ObjectiveConfig(closing_think_latent=False))
    off = model.sft_loss(batch, ObjectiveConfig(**OFF))
    n = int(off["n_label_tokens"])
    assert int(on["n_label_tokens"]) == n + len(examples)
    extra = torch.zeros(())
    for e in examples:
        logits = model.causal_lm(input_ids=torch.tensor([list(e.question_ids + enc.speed_ids(2))])).logits[0, -1]
        extra = extra - torch.log_softmax(logits, -1)[enc.think_id]
    assert torch.allclose(on["ce"] * (n + len(examples)), off["ce"] * n + extra, atol=1e-4)
    # the latent loss does not depend on the label
    nll_on = model.sft_loss(batch, ObjectiveConfig(closing_think_latent=False, latent_loss="nll"))
    nll_off = model.sft_loss(batch, ObjectiveConfig(**OFF, latent_loss="nll"))
    assert torch.allclose(nll_on["latent"], nll_off["latent"])


def _row_last_group_nll(model, enc, e, r):
    """NLL of the closing '###' embedding under the head at the last step group, for one unpacked row
    whose groups are merged here by hand (sum / sqrt(n))."""
    emb = model.embed
    prompt = emb(torch.tensor(list(e.question_ids + enc.speed_ids(r))))
    think = emb(torch.tensor([enc.think_id]))
    steps = list(e.step_ids)
    groups = [emb(torch.tensor(steps[i:i + r])).sum(0) / math.sqrt(len(steps[i:i + r]))
              for i in range(0, len(steps), r)]
    inputs = torch.cat([prompt, think, torch.stack(groups)]).unsqueeze(0)
    hidden, _ = model.run_decoder(inputs, None, torch.arange(inputs.shape[1]).unsqueeze(0))
    mean, log_std = model.latent_head(hidden[0, -1])
    scale = model.state.embedding_scale
    return -gaussian_log_prob(mean, log_std, think[0] / scale)


@pytest.mark.parametrize("r", [1, 2, 3])
def test_closing_latent_is_the_nll_of_the_think_embedding_at_the_last_group(tok, r):
    torch.manual_seed(0)
    model = tiny_model(tok).eval()
    enc = encoder_for(tok)
    examples = [enc.encode(p) for p in PROBLEMS]
    batch = collate(examples, enc, r=r, generator=torch.Generator().manual_seed(0))
    obj = dict(latent_loss="nll", opening_think_label=False)
    on = model.sft_loss(batch, ObjectiveConfig(**obj))
    off = model.sft_loss(batch, ObjectiveConfig(**{**obj, "closing_think_latent": False}))
    m = batch.latent_src.numel()
    extra = sum(_row_last_group_nll(model, enc, e, r) for e in examples)
    assert torch.allclose(on["latent"] * (m + len(examples)), off["latent"] * m + extra, atol=1e-3)
    assert torch.allclose(on["ce"], off["ce"])  # the latent term leaves the CE alone


def test_each_term_is_present_or_absent_per_config_and_carries_gradient(tok):
    """Rows without steps have no ordinary latent: the latent loss there is the closing term alone."""
    torch.manual_seed(0)
    model = tiny_model(tok)
    enc = encoder_for(tok)
    batch = collate([enc.encode(p, with_steps=False) for p in PROBLEMS], enc, r=2)
    assert batch.latent_src.numel() == 0
    off = model.sft_loss(batch, ObjectiveConfig(**OFF))
    assert float(off["latent"]) == 0.0
    on = model.sft_loss(batch, ObjectiveConfig(opening_think_label=False))
    assert float(on["latent"].detach()) > 0
    on["latent"].backward()
    head_grad = model.latent_head.mean.weight.grad
    body_grad = model.causal_lm.get_input_embeddings().weight.grad
    assert head_grad is not None and head_grad.abs().sum() > 0
    assert body_grad is not None and body_grad.abs().sum() > 0  # through the backbone, not only the head
    # the opening label: its own gradient reaches the LM head row of '###'
    model.zero_grad(set_to_none=True)
    on = model.sft_loss(batch, ObjectiveConfig(closing_think_latent=False))
    n = int(off["n_label_tokens"])
    extra = on["ce"] * (n + len(PROBLEMS)) - off["ce"].detach() * n
    extra.backward()
    lm_head = model.causal_lm.get_output_embeddings().weight.grad
    assert lm_head is not None and lm_head[enc.think_id].abs().sum() > 0
    # cot mode: the label applies, the latent term does not
    cot_on = model.sft_loss(batch, ObjectiveConfig(mode="cot"))
    cot_off = model.sft_loss(batch, ObjectiveConfig(mode="cot", **OFF))
    assert int(cot_on["n_label_tokens"]) == int(cot_off["n_label_tokens"]) + len(PROBLEMS)
    assert float(cot_on["latent"]) == 0.0


def test_the_second_pass_does_not_feed_the_closing_prediction(tok):
    """The second pass replaces each step group by its prediction; the closing latent's prediction would
    replace the row's '###' group, which the second pass must keep. With a deterministic head (sample =
    mean) the second pass is the same with and without the closing term."""
    torch.manual_seed(0)
    model = tiny_model(tok, deterministic_latents=True).eval()
    enc = encoder_for(tok)
    batch = collate([enc.encode(p) for p in PROBLEMS], enc, r=2, generator=torch.Generator().manual_seed(0))
    on = model.sft_loss(batch, ObjectiveConfig(second_pass_weight=1.0, opening_think_label=False))
    off = model.sft_loss(batch, ObjectiveConfig(second_pass_weight=1.0, **OFF))
    assert torch.allclose(on["second_pass"], off["second_pass"], atol=1e-6)
    assert not torch.allclose(on["latent"], off["latent"])


def test_bench_reads_predictions_and_counts_where_chains_stop(tmp_path):
    """bench/end_of_reasoning.py's numbers from an evaluate-stage predictions file: decoded answers may
    hold a NUL byte or a bare carriage return; #L quantiles, chains at the cap, stops against the data."""
    import pandas as pd

    from bench.end_of_reasoning import chain_stats, read_predictions

    rows = [dict(setting="c2", seed=s, id=f"q{i}", question="?", gold="1", prediction="1", correct=ok,
                 chain_length=n, text=t, set="test")
            for s, (i, n, ok, t) in enumerate([(0, 3, True, "a\x00b"), (1, 8, False, "x\ry"), (0, 2, True, "ok"),
                                               (1, 4, True, "ok")])]
    rows.append(dict(rows[0], setting="cot", chain_length=5))
    path = tmp_path / "predictions.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    by_setting = read_predictions(path)
    assert sorted(by_setting) == ["c2", "cot"] and len(by_setting["c2"]) == 4
    # data chains: q0 has 5 step tokens (3 groups at c = 2), q1 has 8 (4 groups)
    st = chain_stats(by_setting["c2"], cap=8, data_groups={"q0": 5, "q1": 8}, c=2)
    assert (st["max_L"], st["p50_L"], st["at_cap"]) == (8, 4, 0.25)
    assert st["accuracy"] == 0.75  # the mean over seeds of each seed's accuracy (one row per seed here)
    assert (st["stop_exact"], st["stop_late"], st["stop_early"]) == (0.5, 0.25, 0.25)
