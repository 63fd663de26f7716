"""Latent chains read step by step (colar_core.latent_inspect), its renderers, the evaluation suite's
thoughts, ``colar inspect`` and bench/thoughts.py, on tiny models built here (nothing downloaded)."""

from __future__ import annotations

import json
import re

import pytest
import torch

from bench.tiny import PROBLEMS, encoder_for, tiny_model, tiny_tokenizer
from colar_core.config import EvalConfig, GenerationConfig
from colar_core.inference import generate_latent
from colar_core.latent_inspect import (
    LatentChain,
    LatentStep,
    QuestionThoughts,
    Scored,
    TextChain,
    as_number,
    chain_place,
    inspect_questions,
    latent_chains,
    number_hit,
    place_hits,
    render_html,
    render_markdown,
    render_text,
)

GREEDY = GenerationConfig(do_sample=False, sample_latents=False, max_latents=5, max_answer_tokens=4, max_cot_tokens=8)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    return tiny_model(tok, hidden=32, layers=1, heads=2).eval()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tok, model):
    root = tmp_path_factory.mktemp("inspect-model") / "model"
    model.state.trained_compression_factors = [1, 2]
    model.save_pretrained(root, tok)
    return root


# ---- the trace ----------------------------------------------------------------------------------

def test_the_trace_keeps_the_hidden_state_each_latent_and_each_stop_check_read(tok, model):
    """hidden[:, k] is what the head read to draw latent k (greedy: the latent is its mean), and
    hidden[:, k + 1] what the stop check after latent k read (greedy: '###' exactly where a row stopped)."""
    enc = encoder_for(tok)
    gens, trace = generate_latent(model, enc, [p.question for p in PROBLEMS], 2, GREEDY, return_trace=True)
    b, k, h = trace.latents.shape
    assert trace.hidden.shape == (b, k + 1, h)
    with torch.no_grad():
        mean, _ = model.latent_head(trace.hidden[:, :k])
        stops = model.token_logits(trace.hidden[:, 1:]).argmax(-1) == enc.think_id
    for i, g in enumerate(gens):
        n = g.n_latents
        assert torch.allclose(mean[i, :n], trace.latents[i, :n], atol=1e-5)
        assert not stops[i, : n - 1].any()
        assert bool(stops[i, n - 1]) or n == GREEDY.max_latents


def test_each_step_reads_the_latent_against_the_embeddings_after_undoing_the_scale(tok, model, monkeypatch):
    """A head that always draws the embedding of '20' divided by the scale: every step's nearest token
    is '20' at cosine 1, and its norm is that row's over the mean row's."""
    enc = encoder_for(tok)
    twenty = tok.encode("20", add_special_tokens=False)
    assert len(twenty) == 1
    table = model.causal_lm.get_input_embeddings().weight.detach()
    target = table[twenty[0]] / model.state.embedding_scale

    def draw(hidden, sample=True, generator=None):
        z = target.expand(hidden.shape[0], -1)
        return z, z, torch.zeros_like(z)

    monkeypatch.setattr(model.latent_head, "sample", draw)
    chains = latent_chains(model, enc, [PROBLEMS[0].question], 1, GREEDY, top_k=3)
    steps = chains[0].steps
    assert steps and len(steps) == chains[0].n_steps <= GREEDY.max_latents
    expected_norm = float(table[twenty[0]].norm() / table[: len(tok)].norm(dim=-1).mean())
    for k, step in enumerate(steps):
        assert step.index == k and len(step.nearest) == 3 and len(step.predicted) == 3
        assert step.nearest[0].token == "20" and step.nearest[0].score == pytest.approx(1.0, abs=1e-5)
        assert step.norm == pytest.approx(expected_norm, rel=1e-4)
        assert step.sigma > 0 and all(0 <= s.score <= 1 for s in step.predicted)


def test_latent_chains_are_the_generation_evaluation_decodes(tok, model):
    """Same seed, same questions: the chains' lengths and answers are those of generate_latent."""
    enc = encoder_for(tok)
    gen = GenerationConfig(max_latents=6, max_answer_tokens=4)
    qs = [p.question for p in PROBLEMS]
    plain = generate_latent(model, enc, qs, 2, gen, torch.Generator().manual_seed(5))
    chains = latent_chains(model, enc, qs, 2, gen, seed=5)
    assert [(c.n_steps, c.text) for c in chains] == [(g.n_latents, g.text) for g in plain]


# ---- alignment ----------------------------------------------------------------------------------

def test_a_latent_stands_for_c_chain_tokens_and_a_hit_is_a_number_of_its_place():
    tokens = ("4", "*", "5", "=", "20", "\n", "3", "+", "20", "=", "23")
    assert chain_place(tokens, 1, 4) == ("20",)
    assert chain_place(tokens, 3, 1) == ("=", "20", "\n")
    assert chain_place(tokens, 3, 3) == ("=", "23") and chain_place(tokens, 3, 4) == ()
    assert chain_place(tokens, "auto", 0) == ()
    assert as_number(" 20") == "20" and as_number("007") == "7" and as_number("2.5") == "2.5"
    assert as_number("=") is None and as_number("<eos>") is None
    step = LatentStep(0, (Scored("=", 0.9), Scored(" 20", 0.5), Scored("7", 0.1)), (), 0.1, 1.0)
    assert number_hit(step, ("=", "20", "\n")) is True
    assert number_hit(step, ("=", "20", "\n"), top_k=1) is False
    assert number_hit(step, ("4", "*")) is False
    assert number_hit(step, ("*", "=")) is None  # no number at this place: not counted


# ---- renderers ----------------------------------------------------------------------------------

def _thoughts(question: str) -> list[QuestionThoughts]:
    steps = (LatentStep(0, (Scored("4", 0.99), Scored("<eos>", 0.2)), (Scored("*", 0.8), Scored("###", 0.1)), 0.02, 0.6),
             LatentStep(1, (Scored("|x|", 0.7), Scored("7", 0.3)), (Scored("###", 0.9),), 0.01, 0.5))
    ref = TextChain("data", "4*5=20", ("4", "*", "5", "=", "20"), "", "20")
    cot = TextChain("CoT <b>model</b>", "4*5=20", ("4", "*", "5", "=", "20"), "4*5=20###Answer:20", "20")
    return [QuestionThoughts(question, (LatentChain(1, steps, "Answer:<20>", "<20>"),), (cot,), ref, "20")]


def test_the_page_is_self_contained_and_escapes_every_text():
    question = "Is <script>alert('x')</script> & \"4 < 5\" true?"
    page = render_html(_thoughts(question), title="t <i>", subtitle="run <1>")
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert "<script" not in page.lower() and "alert('x')" not in page
    assert html_unescaped_text(page).count(question) == 1
    for raw in ("<eos>", "<b>model</b>", "<20>", "t <i>", "run <1>"):
        assert raw not in page and raw.replace("<", "&lt;").replace(">", "&gt;") in page
    assert not re.search(r"https?://|src=|<link|@import|url\(", page)  # nothing to fetch
    assert "numbers at their place: 1/1" in page  # step 1 ('4') at place '4'; step 2's place '*' has no number
    assert 'class="tok hit"' in page


def html_unescaped_text(page: str) -> str:
    import html

    return html.unescape(re.sub(r"<[^>]+>", "", page))


def test_the_text_and_markdown_show_each_step_and_the_cot():
    text = render_text(_thoughts("How many?"))
    assert "Question 1: How many?" in text and "c=1: 2 latent steps -> answer '<20>'" in text
    assert "*4 0.99" in text and "CoT <b>model</b>: '4*5=20'" in text
    assert "numbers at their place: 1/1" in text
    md = render_markdown(_thoughts("a | b"))
    assert "a \\| b" in md and "\\|x\\|" in md and "&lt;eos&gt;" in md
    assert "| c=1 | 2 latents |" in md


def test_place_hits_compare_with_the_cot_when_the_data_has_no_chain():
    q = _thoughts("q")[0]
    no_ref = QuestionThoughts(q.question, q.latent, q.cot)
    assert place_hits(no_ref, q.latent[0]) == (1, 1)
    assert place_hits(QuestionThoughts("q", q.latent), q.latent[0]) == (0, 0)


# ---- one model, several factors; the evaluation suite ----------------------------------------

def test_inspect_questions_gives_each_question_a_chain_per_factor_and_its_cot(tok, model):
    enc = encoder_for(tok)
    thoughts = inspect_questions(model, enc, [p.question for p in PROBLEMS[:2]], [1, 2], GREEDY, records=PROBLEMS[:2])
    assert [len(q.latent) for q in thoughts] == [2, 2]
    assert [c.compression for c in thoughts[0].latent] == [1, 2]
    assert thoughts[0].cot[0].label == "CoT (same model)" and thoughts[0].gold == "23"
    assert thoughts[1].reference is not None and thoughts[1].reference.chain == "2*9=18\n7+18=25"
    assert thoughts[1].reference.tokens[:3] == ("2", "*", "9")


def test_the_evaluation_suite_reads_the_first_questions_with_the_cot_models_text(tmp_path, tok):
    from colar_core.evaluation import without_timings
    from colar_core.evaluation_suite import SuiteModels, evaluate_suite

    folders = {}
    for seed, name in enumerate(("colar", "cot")):
        torch.manual_seed(seed)
        m = tiny_model(tok, hidden=32, layers=1, heads=2)
        m.state.trained_compression_factors = [1, 2]
        folders[name] = str(m.save_pretrained(tmp_path / name, tok))
    gen = {"max_latents": 3, "max_cot_tokens": 5, "max_answer_tokens": 3}
    models = SuiteModels(colar=folders["colar"], cot=folders["cot"])
    cfg = EvalConfig(compression_factors=[1, 2], seeds=[4], generation=gen, thoughts_questions=2)
    suite = evaluate_suite(models, {"test": PROBLEMS[:3]}, cfg)
    assert [q.question for q in suite.thoughts] == [p.question for p in PROBLEMS[:2]]
    assert [[c.compression for c in q.latent] for q in suite.thoughts] == [[1, 2], [1, 2]]
    assert [[c.label for c in q.cot] for q in suite.thoughts] == [["CoT (same model)", "CoT model"]] * 2
    off = evaluate_suite(models, {"test": PROBLEMS[:3]}, cfg.model_copy(update={"thoughts_questions": 0}))
    assert off.thoughts == [] and without_timings(off.metrics) == without_timings(suite.metrics)  # no effect on them
    assert EvalConfig().thoughts_questions == 3


# ---- colar inspect ------------------------------------------------------------------------------

def test_colar_inspect_prints_each_step_and_writes_the_page(model_dir, tmp_path, capsys):
    from flows import cli

    page = tmp_path / "thoughts.html"
    code = cli.main(["inspect", str(model_dir), "--question", PROBLEMS[0].question, "--question", "Is 1 < 2?",
                     "--c", "1", "2", "--top-k", "3", "--max-latents", "4", "--greedy", "--html", str(page)])
    out = capsys.readouterr().out
    assert code == 0
    assert "Question 1: " + PROBLEMS[0].question in out and "Question 2: Is 1 < 2?" in out
    assert re.search(r"c=1: \d latent steps -> answer", out) and re.search(r"c=2: \d latent steps", out)
    assert "CoT (same model):" in out and f"page: {page}" in out
    text = page.read_text()
    assert "Is 1 &lt; 2?" in text and "c = 2" in text


def test_colar_inspect_defaults_to_the_trained_factors_and_refuses_a_bad_source(model_dir, tmp_path, capsys):
    from flows import cli

    assert cli.main(["inspect", str(model_dir), "--question", "q?", "--max-latents", "2", "--no-cot"]) == 0
    out = capsys.readouterr().out
    assert "c=1:" in out and "c=2:" in out and "c=3:" not in out and "CoT (same model)" not in out
    assert cli.main(["inspect", "--question", "q?"]) == 2
    assert cli.main(["inspect", str(model_dir), "--model", "models:/x@y", "--question", "q?"]) == 2
    assert cli.main(["inspect", str(tmp_path / "missing"), "--question", "q?"]) == 2
    err = capsys.readouterr().err
    assert "give one model" in err and "cannot load the model folder" in err


@pytest.mark.slow
def test_colar_inspect_reads_a_registered_model_and_a_runs_logged_model(model_dir, tmp_path, mlflow_server, capsys):
    """``--model models:/NAME@ALIAS`` and ``--run RUN_ID`` load the folder the report stage logs
    (tasks.report.log_colar_model: the pyfunc's ``colar_model`` artifact)."""
    from mlflow import MlflowClient

    from flows import cli
    from tasks.report import log_colar_model

    client = MlflowClient()
    experiment = client.get_experiment_by_name("colar-inspect-test")
    experiment_id = experiment.experiment_id if experiment else client.create_experiment("colar-inspect-test")
    run = client.create_run(experiment_id, run_name="inspect-test")
    info = log_colar_model(run.info.run_id, str(model_dir), PROBLEMS[0].question, "colar-inspect-test")
    client.set_registered_model_alias("colar-inspect-test", "candidate", str(info.registered_model_version))
    for source in (["--model", "models:/colar-inspect-test@candidate"], ["--run", run.info.run_id]):
        assert cli.main(["inspect", *source, "--question", "q?", "--c", "1", "--max-latents", "2", "--no-cot"]) == 0
        assert re.search(r"c=1: \d latent steps", capsys.readouterr().out)
    assert cli.main(["inspect", "--run", "no-such-run", "--question", "q?"]) == 2
    assert "no colar model at no-such-run" in capsys.readouterr().err


# ---- bench/thoughts.py --------------------------------------------------------------------------

def test_the_thoughts_bench_scores_a_model_folder_against_both_baselines(model_dir, tmp_path, capsys):
    from bench import thoughts

    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in PROBLEMS))
    out = tmp_path / "thoughts.json"
    assert thoughts.main(["--model", str(model_dir), "--data", str(data), "--c", "1", "2", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["n_questions"] == 4 and set(report["by_c"]) == {"1", "2"}
    row = report["by_c"]["1"]
    for source in ("trained", "shuffled", "random_init"):
        for chain in ("data", "cot"):
            counts = row[f"{source}/{chain}"]
            assert 0 <= counts["hits"] <= counts["reached"] <= counts["places"]
    # the data's chains of the four problems hold 6 numbers each, one per token place at c = 1
    assert row["trained/data"]["places"] == 24
    assert "| 1 | random init |" in capsys.readouterr().out
    assert sorted(thoughts.derangement(7, 0)) == list(range(7))
    assert all(i != j for i, j in enumerate(thoughts.derangement(7, 0)))
