"""The packed SFT layout (pads only at row ends, causal attention without a mask) computes exactly
what the padded layout with an attention mask computes."""

import pytest
import torch

from bench.tiny import PROBLEMS, encoder_for, tiny_model, tiny_tokenizer
from colar_core.collate import IGNORE, ColarBatch, collate
from colar_core.config import ObjectiveConfig
from colar_core.data.records import Record
from colar_core.losses import latent_loss, token_cross_entropy
from colar_core.merging import merge_groups
from colar_core.text import EncodedExample

# rows of clearly different question / chain / answer lengths, so every block carries padding
RECORDS = PROBLEMS + [
    Record("q4", "Dee has 2 cats and 3 dogs and 4 birds and 5 fish and 6 frogs and 7 mice and 8 ants in her big "
                 "old house near the river and the hill and the wood. How many cats and dogs?", ("2+3=5",), "5"),
    Record("q5", "Eve has 4 boxes of 6 eggs and 3 boxes of 6 eggs, gives 11 away. How many?",
           ("4*6=24", "3*6=18", "24+18=42", "42-11=31"), "31"),
]


def padded_reference_loss(model, batch: ColarBatch, objective: ObjectiveConfig, generator=None) -> dict:
    """The layout before packing: three padded blocks, padding mask, boolean-mask selections."""
    prompt = model.embed(batch.prompt_ids)
    groups = merge_groups(model.embed(batch.group_ids), batch.group_token_mask, model.state.pooling)
    answer = model.embed(batch.answer_ids)
    inputs = torch.cat([prompt, groups, answer], dim=1)
    mask = torch.cat([batch.prompt_mask, batch.group_mask, batch.answer_mask], dim=1)
    position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
    b, lp, g = batch.prompt_ids.shape[0], batch.prompt_ids.shape[1], groups.shape[1]
    labels = torch.cat([torch.full((b, lp), IGNORE), batch.group_labels,
                        batch.answer_ids.masked_fill(~batch.answer_mask, IGNORE)], dim=1)
    next_labels = torch.cat([labels[:, 1:], torch.full((b, 1), IGNORE)], 1)
    labelled = next_labels != IGNORE
    hidden, _ = model.run_decoder(inputs, mask, position_ids)
    # the opening '###' (its group is each row's first real group) is predicted by the last prompt column
    think_col = batch.group_mask.long().argmax(1)
    rows = torch.arange(b)
    think_ids = batch.group_ids[rows, think_col, 0]

    def ce_of(hid):
        logits, targets = model.token_logits(hid[labelled]), next_labels[labelled]
        if objective.opening_think_label:
            logits = torch.cat([logits, model.token_logits(hid[:, lp - 1])])
            targets = torch.cat([targets, think_ids])
        return token_cross_entropy(logits, targets)

    out = {"ce": ce_of(hidden)}
    predicts = torch.zeros_like(batch.step_group_mask)
    predicts[:, :-1] = batch.step_group_mask[:, 1:]
    scale = model.state.embedding_scale
    src = hidden[:, lp: lp + g][predicts]
    target = groups[:, 1:][predicts[:, :-1]]
    n_fed = src.shape[0]
    if objective.closing_think_latent:  # the last group column predicts the row's '###' group embedding
        src = torch.cat([src, hidden[:, lp + g - 1]])
        target = torch.cat([target, groups[rows, think_col]])
    mean, log_std = model.latent_head(src)
    out["latent"], out["entropy"], sample = latent_loss(mean, log_std, (target / scale).detach(),
                                                        objective.latent_loss, model.state.deterministic_latents,
                                                        generator)
    replaced = groups.clone()
    replaced[:, 1:][predicts[:, :-1]] = sample[:n_fed] * scale
    hidden2, _ = model.run_decoder(torch.cat([prompt, replaced, answer], 1), mask, position_ids)
    out["second_pass"] = ce_of(hidden2)
    out["n_positions"] = mask.sum()
    out["n_label_tokens"] = labelled.sum() + (b if objective.opening_think_label else 0)
    return out


@pytest.mark.parametrize("reference_terms", [True, False])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("r", [1, 2, 3])
def test_packed_loss_equals_the_padded_masked_layout(arch, r, reference_terms):
    tok = tiny_tokenizer(RECORDS)
    torch.manual_seed(0)
    model = tiny_model(tok, arch=arch).eval()  # eval: no dropout, so both passes see the same network
    enc = encoder_for(tok)
    batch = collate([enc.encode(x) for x in RECORDS], enc, r=r, generator=torch.Generator().manual_seed(1))
    assert (~batch.prompt_mask).any() and (~batch.group_mask).any()  # the padded layout really has gaps
    # reference_terms: the opening '###' label and the closing latent (the defaults) on or both off
    objective = ObjectiveConfig(second_pass_weight=0.5, entropy_weight=0.1, opening_think_label=reference_terms,
                                closing_think_latent=reference_terms)
    ours = model.sft_loss(batch, objective, generator=torch.Generator().manual_seed(2))
    ref = padded_reference_loss(model, batch, objective, generator=torch.Generator().manual_seed(2))
    for key in ("ce", "latent", "entropy", "second_pass"):
        assert torch.allclose(ours[key], ref[key], atol=1e-5, rtol=1e-5), key
    assert int(ours["n_positions"]) == int(ref["n_positions"])
    assert int(ours["n_label_tokens"]) == int(ref["n_label_tokens"])
    # packing removes the gaps: the batch is as wide as its longest row
    assert batch.packed_mask.shape[1] == int(batch.packed_mask.sum(1).max())
    assert batch.packed_mask.shape[1] < batch.prompt_ids.shape[1] + batch.group_ids.shape[1] + batch.answer_ids.shape[1]


def test_gradients_match_the_padded_layout():
    tok = tiny_tokenizer(RECORDS)
    torch.manual_seed(0)
    enc = encoder_for(tok)
    batch = collate([enc.encode(x) for x in RECORDS], enc, r=2, generator=torch.Generator().manual_seed(1))
    objective = ObjectiveConfig(entropy_weight=0.1)
    grads = []
    for fn in ("packed", "padded"):
        torch.manual_seed(0)
        model = tiny_model(tok).eval()
        parts = (model.sft_loss(batch, objective, torch.Generator().manual_seed(2)) if fn == "packed"
                 else padded_reference_loss(model, batch, objective, torch.Generator().manual_seed(2)))
        (parts["ce"] + parts["latent"] - 0.1 * parts["entropy"]).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-5, rtol=1e-4)


def test_packed_indices_on_a_hand_made_batch():
    class Enc:
        pad_id, think_id, eos_id = 0, 1, 2

        def speed_ids(self, r):
            return (90 + r,)

    def ex(q, steps, ans):
        return EncodedExample(tuple(q), tuple(steps), (1,) + tuple(ans) + (2,), "x")

    # row 0: prompt 10 91 | groups ### [20 21] [22] | answer ### 30 EOS   -> 8 real positions
    # row 1: prompt 11 12 91 | groups ### [23]     | answer ### 31 32 EOS -> 9 real positions
    batch = collate([ex([10], [20, 21, 22], [30]), ex([11, 12], [23], [31, 32])], Enc(), r=2)
    assert batch.packed_mask.tolist() == [[True] * 8 + [False], [True] * 9]
    lp, g, la = batch.prompt_ids.shape[1], batch.group_ids.shape[1], batch.answer_ids.shape[1]
    assert (lp, g, la) == (3, 3, 4)
    t = lp + g + la
    # row 0 skips its one prompt pad (slot 0); row 1 skips its pad group (padded position 3)
    assert batch.pack_index.view(2, 9)[0, :8].tolist() == [1, 2, 3, 4, 5, 6, 7, 8]
    assert batch.pack_index.view(2, 9)[1].tolist() == [t + i for i in (0, 1, 2, 4, 5, 6, 7, 8, 9)]
    # labels: row 0 predicts g1 from '###'-group slot 2, g2 from slot 3, answer from slot 4 on
    assert batch.latent_src.tolist() == [2, 3, 9 + 3]
    assert batch.latent_tgt.tolist() == [1, 2, g + 2]
    assert batch.label_index.tolist() == [2, 3, 4, 5, 6, 9 + 3, 9 + 4, 9 + 5, 9 + 6, 9 + 7]
    assert batch.label_targets[[3, 4]].tolist() == [30, 2]



@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_run_decoder_packed_equals_the_masked_decoder_at_real_positions(arch):
    """The RL update's forward: a padded layout with gaps anywhere, run packed."""
    tok = tiny_tokenizer(RECORDS)
    torch.manual_seed(0)
    model = tiny_model(tok, arch=arch).eval()
    mask = torch.tensor([[0, 0, 1, 1, 1, 0, 1, 1, 0, 0],
                         [1, 1, 1, 1, 0, 0, 0, 1, 1, 1],
                         [0, 1, 0, 1, 0, 1, 0, 1, 0, 1]], dtype=torch.bool)
    inputs = torch.randn(3, 10, 64)
    position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
    ref, _ = model.run_decoder(inputs, mask, position_ids)
    ours = model.run_decoder_packed(inputs, mask)
    assert ours.shape == ref.shape
    assert torch.allclose(ours[mask], ref[mask], atol=1e-5)
