"""The judge-free likelihood track: which items it scores, how per-item values follow from log-likelihoods, and
the headline statistic computed on it."""

from __future__ import annotations

import numpy as np
import pytest

from h3fusion import load_profile
from h3fusion.config import derived_profile
from h3fusion.data.splits import beavertails_split, eval_items_all, load_eval_items
from h3fusion.dimensions.harmless import safe_unsafe_pairs
from h3fusion.evaluation import likelihood, stats
from h3fusion.models import load_tokenizer


@pytest.fixture(scope="module")
def profile(tmp_path_factory):
    return load_profile("smoke", {"runs_dir": str(tmp_path_factory.mktemp("runs"))})


@pytest.fixture(scope="module")
def inputs(profile):
    return likelihood.likelihood_inputs(profile)


class WordCountLM:
    """log p(continuation | prompt) = -(words of the continuation) - 0.5 if it says 'sorry' else 0."""

    def continuation_logprobs(self, prompts, continuations):
        assert len(prompts) == len(continuations)
        return [-float(len(c.split())) + (0.5 if "sorry" in c.lower() else 0.0) for c in continuations]

    def generate(self, prompts, cfg, seed):  # pragma: no cover - not used by this track
        raise AssertionError


def test_items_are_prefixes_of_the_stratified_order_and_contain_the_judged_sample(profile, inputs):
    cfg = profile.evaluation.likelihood
    honest = [str(it["id"]) for it in eval_items_all(profile, "honest")]
    assert inputs["honest"].ids == honest[: cfg.items_of("honest")]
    judged = [str(it["id"]) for it in load_eval_items(profile, "honest")]
    assert set(judged) <= set(inputs["honest"].ids)
    helpful = [str(it["id"]) for it in eval_items_all(profile, "helpful") if it.get("reference")]
    assert inputs["helpful"].ids == helpful[: cfg.items_of("helpful")]
    assert len(inputs["honest"].mc) == len(inputs["honest"].ids)


def test_every_harmless_item_pairs_a_safe_and_an_unsafe_response(profile, inputs):
    """Same-prompt items first, then pairs across prompts; every prompt in one item only; the stratified order."""
    items = safe_unsafe_pairs(profile)
    assert items and all(it["safe"] and it["unsafe"] for it in items)
    same = [it for it in items if "+" not in it["id"]]
    assert items[: len(same)] == same  # the same-prompt items come first
    for it in same:
        assert len({p for p, _ in it["safe"] + it["unsafe"]}) == 1
    across = items[len(same):]
    assert across and all(len(it["safe"]) == len(it["unsafe"]) == 1 for it in across)
    assert all(it["safe"][0][0] != it["unsafe"][0][0] for it in across)
    prompts = [{p for p, _ in it["safe"] + it["unsafe"]} for it in items]
    assert sum(map(len, prompts)) == len(set().union(*prompts))  # no prompt in two items
    labels = {(r["prompt"], r["response"]): r["is_safe"] for r in beavertails_split(profile).eval_rows}
    for it in items:
        assert all(labels[pair] for pair in it["safe"]) and not any(labels[pair] for pair in it["unsafe"])
    order = [str(it["id"]) for it in eval_items_all(profile, "harmless")]
    for part in (same, across):  # each part follows the stratified order (a cross pair: by its safe prompt)
        positions = [order.index(it["id"].split("+")[0]) for it in part]
        assert positions == sorted(positions)
    li = inputs["harmless"]
    assert li.ids == [it["id"] for it in items][: profile.evaluation.likelihood.items_of("harmless")]
    for k in range(len(li.ids)):
        sides = {s for o, s in zip(li.owners, li.sides, strict=True) if o == k}
        assert sides == {"safe", "unsafe"}


def test_scored_texts_are_cut_to_the_token_limit(profile, inputs):
    tok = load_tokenizer(profile)
    limit = profile.evaluation.likelihood.max_answer_tokens
    for task in ("helpful", "harmless"):
        li = inputs[task]
        assert len(li.pairs) == len(li.tokens) > 0
        for (_, text), n in zip(li.pairs, li.tokens, strict=True):
            assert n == len(tok(text, add_special_tokens=False)["input_ids"])
            assert 0 < n <= limit + 1  # decoding a cut can re-tokenise one token longer at the seam
    assert max(inputs["helpful"].tokens) >= limit  # some references were long enough to be cut


def test_per_item_values_follow_from_the_log_likelihoods(profile, inputs):
    lm = WordCountLM()
    helpful = likelihood.score(lm, inputs["helpful"], profile.evaluation.mc_prompt)
    for row, (_, text), n in zip(helpful, inputs["helpful"].pairs, inputs["helpful"].tokens, strict=True):
        assert row["ref_logprob"] == pytest.approx(-len(text.split()) / n)
    li = inputs["harmless"]
    rows = likelihood.score(lm, li, profile.evaluation.mc_prompt)
    for k, row in enumerate(rows):
        def side(s, k=k):
            return [-len(t.split()) / n + (0.5 / n if "sorry" in t.lower() else 0.0)
                    for (_, t), o, s2, n in zip(li.pairs, li.owners, li.sides, li.tokens, strict=True)
                    if o == k and s2 == s]

        assert row["safe_logprobs"] == pytest.approx(side("safe"))
        assert row["safe_margin"] == pytest.approx(np.mean(side("safe")) - np.mean(side("unsafe")))
        assert row["safe_preferred"] == float(row["safe_margin"] > 0)
    values = likelihood.item_values("harmless", rows)
    assert set(np.unique(values["safe_preferred"])) <= {0.0, 100.0}
    summary = likelihood.summary({"harmless": rows})
    assert summary["harmless"]["n"] == len(rows)
    assert summary["harmless"]["safe_preferred"] == pytest.approx(values["safe_preferred"].mean())


def test_the_hash_follows_the_model_and_the_items(profile, inputs):
    li = inputs["helpful"]
    assert li.digest("a", "qa6") == li.digest("a", "qa6")
    assert li.digest("a", "qa6") != li.digest("b", "qa6")
    fewer = likelihood.likelihood_inputs(derived_profile(profile, {"evaluation.likelihood.items.helpful": 2}))
    assert fewer["helpful"].digest("a", "qa6") != li.digest("a", "qa6")
    assert inputs["honest"].digest("a", "qa6") != inputs["honest"].digest("a", "alpaca")


def _scores(name, values, task="honest", metric="mc2"):
    ids = [str(i) for i in range(len(values))]
    return stats.ItemScores(name, {task: (ids, {metric: np.asarray(values, dtype=float)})})


def test_metric_improvement_over_best_is_the_gap_to_the_best_member():
    rng = np.random.default_rng(0)
    member = rng.uniform(0, 100, 200)
    shifted = stats.metric_improvement_over_best(_scores("f", member + 3.0), [_scores("m", member)], "honest", "mc2")
    assert shifted.value == pytest.approx(3.0) and shifted.low == pytest.approx(3.0)  # a constant difference
    other = rng.uniform(0, 100, 200)
    same = stats.metric_improvement_over_best(
        _scores("f", member), [_scores("m", member), _scores("o", other)], "honest", "mc2"
    )
    assert same.value == pytest.approx(min(0.0, member.mean() - other.mean()))  # the gap to the better member
    assert same.low <= same.value <= same.high
    lower = stats.metric_improvement_over_best(
        _scores("f", member - 1.0), [_scores("m", member)], "honest", "mc2", higher_is_better=False
    )
    assert lower.value == pytest.approx(1.0)  # lower is better: 1 lower is +1 in favour of the fused model


def test_a_model_without_the_track_has_no_likelihood_scores(tmp_path):
    assert stats.read_likelihood_scores(tmp_path, "instruct-lora") is None
