"""The promotion gate: the rule on metrics alone, and against a real registry (which version holds
'candidate', whose run's metrics are compared). Concurrent reports and retried ones:
tests/test_promotion_registry.py."""

from __future__ import annotations

import pytest

from tasks.promotion import decide

#: The candidate's numbers: 0.40 on 500 questions, its interval over questions 0.02 (over seeds 0.01).
OLD = {"accuracy/c2": 0.40, "accuracy_ci95/c2": 0.01, "accuracy_qci95/c2": 0.02, "n_questions/c2": 500.0,
       "mean_latents/c2": 8.0}
#: Both runs measured on the same evaluation set.
SAME = {"new_digest": "a" * 64, "current_digest": "a" * 64}


def test_no_candidate_or_rule_always_promotes():
    assert decide({"accuracy/c2": 0.01}, None).promote
    assert decide({"accuracy/c2": 0.01}, OLD, rule="always").promote
    assert decide({"accuracy/c2": 0.01}, OLD, rule="always", new_digest="b" * 64, current_digest="a" * 64).promote


@pytest.mark.parametrize("new, promote, why", [
    ({"accuracy/c2": 0.50, "mean_latents/c2": 8.0}, True, "beats"),
    ({"accuracy/c2": 0.50, "mean_latents/c2": 7.0}, True, "beats"),
    ({"accuracy/c2": 0.41, "mean_latents/c2": 7.0}, False, "does not beat"),   # within the interval
    ({"accuracy/c2": 0.42, "mean_latents/c2": 7.0}, False, "does not beat"),   # at its edge
    ({"accuracy/c2": 0.01, "mean_latents/c2": 1.0}, False, "does not beat"),   # a chance-level run
    ({"accuracy/c2": 0.50, "mean_latents/c2": 9.5}, False, "longer"),          # better but longer chains
    ({"accuracy/c1": 0.90}, False, "has no accuracy/c2"),
])
def test_better_rule_needs_more_than_the_interval_and_no_longer_chains(new, promote, why):
    decision = decide(new, OLD, current_version="3", **SAME)
    assert decision.promote is promote and why in decision.reason, decision.reason
    tags = decision.tags()
    assert tags["colar.promotion.decision"] == ("promoted" if promote else "kept")
    if "accuracy/c2" in new:
        assert float(tags["colar.promotion.old"]) == 0.40 and float(tags["colar.promotion.old_qci95"]) == 0.02
        assert tags["colar.promotion.old_digest"] == tags["colar.promotion.new_digest"] == "a" * 64


def test_text_modes_compare_token_counts():
    old = {"accuracy/cot": 0.5, "accuracy_qci95/cot": 0.01, "mean_tokens/cot": 15.0}
    assert not decide({"accuracy/cot": 0.6, "mean_tokens/cot": 16.0}, old, metric="accuracy/cot", **SAME).promote
    assert decide({"accuracy/cot": 0.6, "mean_tokens/cot": 14.0}, old, metric="accuracy/cot", **SAME).promote


def test_the_gate_reads_the_run_of_the_version_that_holds_candidate(mlflow_server, tmp_path):
    """Against a real registry: the candidate's numbers and set digest come from the run that
    registered it, this run's digest from its own tags (as the report stage records them)."""
    from mlflow import MlflowClient

    from tasks.report import _promotion_decision, eval_digest_tags

    client = MlflowClient()
    exp = client.create_experiment(f"promotion-{tmp_path.name}")
    name = f"gate-{tmp_path.name}"
    client.create_registered_model(name)
    rule = {"rule": "better", "metric": "accuracy/c2"}

    def pipeline_run(digest: str) -> str:
        run = client.create_run(exp).info.run_id
        for tag, value in eval_digest_tags({"test": digest}).items():
            client.set_tag(run, tag, value)
        return run

    new = pipeline_run("a" * 64)
    assert _promotion_decision(client, name, new, {"accuracy/c2": 0.1}, rule).reason == "no candidate yet"

    run = pipeline_run("a" * 64)
    for key, value in OLD.items():
        client.log_metric(run, key, value)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "MLmodel").write_text("flavors: {}\n")
    client.log_artifacts(run, str(tmp_path / "m"), "model")
    version = client.create_model_version(name, f"runs:/{run}/model", run_id=run).version
    client.set_registered_model_alias(name, "candidate", str(version))

    kept = _promotion_decision(client, name, new, {"accuracy/c2": 0.01, "mean_latents/c2": 8.0}, rule)
    assert not kept.promote and f"version {version}" in kept.reason and kept.old == pytest.approx(0.40)
    assert _promotion_decision(client, name, new, {"accuracy/c2": 0.9, "mean_latents/c2": 8.0}, rule).promote
    assert _promotion_decision(client, name, new, {"accuracy/c2": 0.01}, {"rule": "always"}).promote
    other = pipeline_run("b" * 64)  # measured on another set: not compared, however good
    refused = _promotion_decision(client, name, other, {"accuracy/c2": 0.9, "mean_latents/c2": 8.0}, rule)
    assert not refused.promote and "different evaluation sets" in refused.reason, refused.reason
    # the run's own version holds the alias already (an earlier attempt of this run moved it): it keeps it
    assert _promotion_decision(client, name, run, dict(OLD), rule, version=str(version)).promote


def test_the_gate_metric_defaults_to_c2_or_the_smallest_factor_and_an_unevaluated_one_is_refused():
    from flows.config import ConfigError, load_config

    cfg = load_config(None, [])
    assert cfg.tracking.promotion.metric_for(cfg.eval.compression_factors) == "accuracy/c2"
    cfg = load_config(None, ["eval.compression_factors=[1,3]"])
    assert cfg.tracking.promotion.metric_for(cfg.eval.compression_factors) == "accuracy/c1"
    with pytest.raises(ConfigError, match=r"field 'tracking\.promotion\.metric': accuracy/c3 is not evaluated"):
        load_config(None, ["eval.compression_factors=[1,2]", "tracking.promotion.metric=accuracy/c3"])


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("new, current, rule, why", [
    ({"accuracy/c2": NAN, "mean_latents/c2": 8.0}, OLD, "better", "not a finite accuracy"),
    ({"accuracy/c2": INF, "mean_latents/c2": 8.0}, OLD, "better", "not a finite accuracy"),
    ({"accuracy/c2": NAN}, None, "better", "not a finite accuracy"),                 # no candidate yet
    ({"accuracy/c2": INF}, OLD, "always", "not a finite accuracy"),                  # whatever the rule
    ({"accuracy/c2": 0.05, "mean_latents/c2": 1.0}, {**OLD, "accuracy/c2": 0.95, "accuracy_qci95/c2": NAN},
     "better", "accuracy_qci95/c2 missing or not finite"),                          # NaN interval
    ({"accuracy/c2": 0.90, "mean_latents/c2": 8.0}, {"accuracy/c2": 0.40, "mean_latents/c2": 8.0},
     "better", "accuracy_qci95/c2 missing or not finite"),                          # no interval
    ({"accuracy/c2": 0.90, "mean_latents/c2": NAN}, OLD, "better", "this run's chain length"),
    ({"accuracy/c2": 0.90}, OLD, "better", "this run's chain length"),              # no chain length
    ({"accuracy/c2": 0.90, "mean_latents/c2": 8.0}, {"accuracy_qci95/c2": 0.02, "mean_latents/c2": 8.0},
     "better", "version 3's accuracy/c2 missing"),                                  # candidate lacks the metric
])
def test_non_finite_or_missing_numbers_never_move_the_alias(new, current, rule, why):
    """Issue 22 item 5: NaN accuracy was promoted, a NaN interval let a 0.05 model replace a 0.95 one, a
    missing chain length skipped the length check, a candidate without the metric lost to anything."""
    decision = decide(new, current, rule=rule, current_version="3", **SAME)
    assert decision.promote is False and why in decision.reason, decision.reason
    assert decision.tags()["colar.promotion.decision"] == "kept"


def test_a_candidate_measured_on_another_set_or_without_a_digest_is_not_compared():
    """Issue 22 item 7: nothing checked which set or how many questions; 0.51 on 8 questions beat 0.50
    on 500. Now a different or missing set digest is a refusal that says so, whatever the numbers."""
    old = {"accuracy/c2": 0.50, "accuracy_ci95/c2": 0.0, "accuracy_qci95/c2": 0.0438, "n_questions/c2": 500.0,
           "mean_latents/c2": 8.0}
    new = {"accuracy/c2": 0.51, "accuracy_qci95/c2": 0.3464, "n_questions/c2": 8.0, "mean_latents/c2": 8.0}
    refused = decide({**new, "accuracy/c2": 0.99}, old, current_version="3", new_digest="b" * 64,
                     current_digest="a" * 64)
    assert not refused.promote and "different evaluation sets" in refused.reason, refused.reason
    assert "8 questions" in refused.reason and "500 questions" in refused.reason and "version 3" in refused.reason
    assert refused.tags()["colar.promotion.old_digest"] == "a" * 64
    assert refused.tags()["colar.promotion.new_n_questions"] == "8"
    for digests, who in (({"new_digest": None, "current_digest": "a" * 64}, "this run has no digest"),
                         ({"new_digest": "a" * 64, "current_digest": None}, "version 3 has no digest"),
                         ({}, "this run and version 3 have no digest")):
        decision = decide({**new, "accuracy/c2": 0.99}, old, current_version="3", **digests)
        assert not decision.promote and who in decision.reason and "colar.eval.digest" in decision.reason, \
            decision.reason
    # a named set's metric looks for that set's digest tag
    decision = decide({"accuracy/svamp/c2": 0.9}, {"accuracy/svamp/c2": 0.1}, metric="accuracy/svamp/c2")
    assert "colar.eval.digest.svamp" in decision.reason


def test_the_interval_compared_counts_the_questions_not_only_the_seeds():
    """Issue 22 item 7: with `eval.seeds: [0]` the interval over seeds is 0, so 0.51 beat 0.50 on the
    same 500 questions. The gate compares with the interval over questions (1.96 sqrt(p(1-p)/(n-1))
    with one seed: 0.0438 for p = 0.5, n = 500)."""
    from colar_core.scoring import question_ci95

    qci = question_ci95([[i < 250 for i in range(500)]])
    assert qci == pytest.approx(1.96 * (0.25 / 499) ** 0.5)
    old = {"accuracy/c2": 0.50, "accuracy_ci95/c2": 0.0, "accuracy_qci95/c2": qci, "n_questions/c2": 500.0,
           "mean_latents/c2": 8.0}
    kept = decide({"accuracy/c2": 0.51, "n_questions/c2": 500.0, "mean_latents/c2": 8.0}, old, **SAME)
    assert not kept.promote and "does not beat" in kept.reason and "over 500 questions" in kept.reason, kept.reason
    assert decide({"accuracy/c2": 0.55, "n_questions/c2": 500.0, "mean_latents/c2": 8.0}, old, **SAME).promote
