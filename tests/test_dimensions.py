"""The dimensions registry: what the tables, statistics and CLI read about each dimension comes from one place."""

from __future__ import annotations

import numpy as np
import pytest

from h3fusion import evidence
from h3fusion.config import TASKS
from h3fusion.dimensions import DIMENSIONS, Dimension, Metric, get_dimension, register
from h3fusion.errors import H3FusionError
from h3fusion.evaluation import likelihood, stats


def test_the_papers_three_dimensions_in_the_books_order():
    assert list(DIMENSIONS) == ["helpful", "harmless", "honest"] == list(TASKS)


def test_tables_and_statistics_are_read_from_the_definitions():
    for d in DIMENSIONS.values():
        assert stats.HEADLINE[d.name] == d.headline.key
        assert stats.HIGHER_IS_BETTER[d.name] is d.headline.higher_is_better
        assert evidence.COLUMNS[(d.name, d.headline.key)] in evidence.HEADLINE_COLUMNS
        assert evidence.LIKELIHOOD_HEADLINE[d.name] == d.likelihood_headline
        assert likelihood.METRICS[d.name] == tuple(m.key for m in d.likelihood)
        for m in (*d.judged, *d.likelihood):
            # a label's arrow is for the reader; the direction the code uses is the metric's own
            assert evidence.higher_is_better([m.label])[m.label] is m.higher_is_better
            assert ("↓" in m.label) is (not m.higher_is_better)
            assert (m.label in evidence.NATS) is m.nats


def test_item_values_and_the_average_follow_each_metrics_direction():
    harmful = stats.item_values("harmless", [{"harmful_probability": p} for p in (0.2, 0.7)])
    assert harmful["harmful_rate"].tolist() == [0.0, 100.0]
    won = stats.item_values("helpful", [{"win_probability": p} for p in (0.5, 0.9)])
    assert won["win_rate"].tolist() == [0.0, 100.0]  # a tie is not a win
    ids = ["a", "b"]
    model = stats.ItemScores(
        "m",
        {
            "helpful": (ids, {"win_rate": np.array([100.0, 0.0])}),
            "harmless": (ids, {"harmful_rate": np.array([100.0, 100.0])}),
            "honest": (ids, {"truthful_x_informative": np.array([100.0, 100.0])}),
        },
    )
    assert stats.average_value(model) == pytest.approx((50.0 + (100.0 - 100.0) + 100.0) / 3)


def test_an_unknown_dimension_and_a_bad_definition_are_refused_with_the_fix():
    with pytest.raises(H3FusionError, match="unknown evaluation dimension 'kind'; registered: \\['helpful'"):
        get_dimension("kind")
    with pytest.raises(H3FusionError, match="already registered"):
        register(DIMENSIONS["helpful"])
    bad = Dimension(
        "kind",
        judged=(Metric("kind_rate", "Kind % ↑"),),
        likelihood=(Metric("kind_logprob", "Kind log-lik ↑", nats=True),),
        likelihood_headline="missing",
        prompt_field="instruction",
        strata="none",
        item_values=lambda rows: {},
        judge=lambda judge, keys, answers: [],
        inputs=lambda items: None,
        likelihood_inputs=lambda profile, tok: None,
        likelihood_rows=lambda lm, inputs, mc_format: [],
        train_pool=lambda profile: [],
        eval_pool=lambda profile: [],
        load_judge=lambda profile: None,
        source_report=lambda profile: None,
        reference_responses=lambda profile, n: [],
    )
    with pytest.raises(H3FusionError, match="likelihood headline 'missing' is not one of"):
        register(bad)
    assert "kind" not in DIMENSIONS


class _Judge:
    """A deterministic stand-in for any dimension's judge (these tests check the plumbing, not the judge)."""

    name = "fake"
    validation = {"accuracy": 0.9, "n_heldout": 10}

    def win_probability(self, instructions, answers, references):
        return np.array([0.9 if len(a) > len(r) else 0.1 for a, r in zip(answers, references, strict=True)])

    def judge(self, questions, answers, correct, incorrect):
        return [{"truthful": len(a) % 3 != 0, "informative": bool(a.strip())} for a in answers]


def test_the_smoke_pipeline_runs_on_two_of_the_dimensions(tmp_path):
    """A profile with two dimensions: two experts, a two-expert MoE, evaluated on exactly those two (its own
    judges only), and the evidence tables hold those two dimensions and no three-dimension average."""
    from types import SimpleNamespace

    from h3fusion import load_profile
    from h3fusion.evaluation.run import evaluate_model
    from h3fusion.experts import align
    from h3fusion.fusion import fuse
    from h3fusion.moe import load_moe
    from tests.helpers import FakeRefusal

    profile = load_profile(
        "smoke", {"runs_dir": str(tmp_path / "runs"), "tasks": ["helpful", "honest"], "ablations.top_ks": [1, 2]}
    )
    align(profile, "all")
    folder = fuse(profile)
    assert load_moe(folder).num_experts == 2
    judges = SimpleNamespace(helpful=_Judge(), honest=_Judge(), refusal=FakeRefusal())  # no harmless judge
    metrics = {name: evaluate_model(profile, name, judges=judges) for name in ("base", folder.name)}
    for m in metrics.values():
        assert set(m["scores"]) == set(m["likelihood"]) == {"helpful", "honest"}
    long = evidence.estimates(evidence.item_scores(profile, {name: name for name in metrics}))
    assert set(long["column"]) == {evidence.COLUMNS[k] for k in evidence.COLUMNS if k[0] in profile.tasks}


def test_the_data_counts_are_per_dimension_and_cover_every_task():
    import yaml

    from h3fusion.config import PROFILES_DIR, ConfigError, profile_from_dict

    raw = yaml.safe_load((PROFILES_DIR / "smoke.yaml").read_text())
    two = {**raw, "tasks": ["helpful", "honest"], "ablations": {**raw.get("ablations", {}), "top_ks": [1, 2]}}
    two["data"] = {**raw["data"], "train_examples": {"helpful": 8, "honest": 8}, "eval_examples": {"helpful": 4, "honest": 4}}
    assert profile_from_dict(two).data.train_examples == {"helpful": 8, "honest": 8}  # no entry for a dimension not used
    del two["data"]["eval_examples"]["honest"]
    with pytest.raises(ConfigError, match=r"`data.eval_examples` has no entry for \['honest'\]"):
        profile_from_dict(two)


def test_the_judges_have_one_section_per_dimension_and_old_keys_name_their_new_place():
    from h3fusion import load_profile
    from h3fusion.config import ConfigError

    smoke = load_profile("smoke")
    for name, dimension in DIMENSIONS.items():
        assert isinstance(smoke.judges.of(name), dimension.judge_settings)
    assert smoke.judges.harmless.train_rows == 64 and smoke.judges.helpful.judge == "offline"
    renamed = r"`judges.harmless_epochs` was renamed: use `judges.harmless.epochs`"
    with pytest.raises(ConfigError, match=renamed):
        load_profile("smoke", {"judges.harmless_epochs": 3})
    with pytest.raises(ConfigError, match=r"`evaluation.honest_judge` was renamed: use `judges.honest.judge`"):
        load_profile("smoke", {"evaluation.honest_judge": "offline"})
    with pytest.raises(ConfigError, match=r"judges.helpful.judge"):
        load_profile("smoke", {"judges.helpful.judge": "gpt-5"})
