"""evaluation.stats: per-item scores agree with the stored rates, intervals cover what they should, a paired
difference cancels what both models share, and the minimal detectable difference follows its formula."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

from h3fusion.evaluation import stats
from h3fusion.evaluation.judging import scores_from_judgements


def _model(name, helpful, harmful, honest):
    return stats.ItemScores(
        name,
        {
            "helpful": ([f"h{i}" for i in range(len(helpful))], {"win_rate": np.asarray(helpful, float)}),
            "harmless": (
                [f"s{i}" for i in range(len(harmful))],
                {"harmful_rate": np.asarray(harmful, float)},
            ),
            "honest": (
                [f"t{i}" for i in range(len(honest))],
                {"truthful_x_informative": np.asarray(honest, float)},
            ),
        },
    )


def test_rates_are_the_means_of_the_item_scores():
    rows = [{"win_probability": p} for p in (0.2, 0.7, 0.51, 0.5)]
    assert scores_from_judgements("helpful", rows)["win_rate"] == 50.0
    assert list(stats.item_values("helpful", rows)["win_rate"]) == [0, 100, 100, 0]
    honest = [{"truthful": t, "informative": i} for t, i in ((True, True), (True, False), (False, True))]
    assert stats.item_values("honest", honest)["truthful_x_informative"].tolist() == [100, 0, 0]


def test_wilson_interval_of_a_rate_matches_its_formula():
    k, n = 7, 40
    est = stats.rate(np.array([100.0] * k + [0.0] * (n - k)))
    p, z = k / n, sps.norm.ppf(0.975)
    centre = (p + z**2 / (2 * n)) / (1 + z**2 / n)
    half = z * np.sqrt(p * (1 - p) / n + z**2 / (4 * n**2)) / (1 + z**2 / n)
    assert (est.value, est.n) == (100 * p, n)
    assert est.low == pytest.approx(100 * (centre - half), abs=1e-9)
    assert est.high == pytest.approx(100 * (centre + half), abs=1e-9)
    assert stats.rate(np.zeros(20)).high > 0  # 0 of 20 is not certainty


def test_a_paired_difference_cancels_what_both_models_share():
    rng = np.random.default_rng(0)
    base = [100.0 * (rng.random(60) < 0.5) for _ in range(3)]
    a = _model("a", *base)
    shifted = [b.copy() for b in base]
    flips = np.flatnonzero(shifted[0] == 0)[:6]
    shifted[0][flips] = 100.0  # b wins 6 more helpful items than a, the rest identical
    b = _model("b", *shifted)
    d = stats.difference(b, a)
    assert d.value == pytest.approx(100 * 6 / 60 / 3)
    assert 0 < d.low <= d.value <= d.high < stats.average(b).high - stats.average(b).low
    assert stats.verdict_word(d) == "better" and stats.verdict_word(stats.difference(a, b)) == "worse"
    assert stats.verdict_word(stats.difference(a, a)) == "within noise at this sample size"


def test_improvement_over_best_takes_the_best_member_and_its_interval_covers_the_point():
    rng = np.random.default_rng(1)

    def draw(name, p):
        return _model(name, *[100.0 * (rng.random(80) < q) for q in p])

    fused = draw("fused", (0.6, 0.3, 0.5))
    members = [draw("m1", (0.4, 0.4, 0.4)), draw("m2", (0.5, 0.3, 0.45))]
    imp = stats.improvement_over_best(fused, members)
    best = max(stats.average_value(m) for m in members)
    assert imp["points"].value == pytest.approx(stats.average_value(fused) - best)
    assert imp["relative_pct"].value == pytest.approx(100 * imp["points"].value / best)
    assert imp["points"].low < imp["points"].value < imp["points"].high
    with pytest.raises(Exception, match="different helpful items"):
        stats.difference(fused, _model("short", *[np.zeros(10)] * 3))


def test_minimal_detectable_difference_follows_the_normal_formula():
    rng = np.random.default_rng(2)
    a = _model("a", *[100.0 * (rng.random(n) < 0.5) for n in (50, 40, 50)])
    b = _model("b", *[100.0 * (rng.random(n) < 0.5) for n in (50, 40, 50)])
    out = stats.minimal_detectable_difference([(a, b)])
    var = [np.var(a.values(t, m) - b.values(t, m), ddof=1) / len(a.ids(t)) for t, m in stats.HEADLINE.items()]
    want = (sps.norm.ppf(0.975) + sps.norm.ppf(0.8)) * np.sqrt(sum(var)) / 3
    assert out["mdd_points"] == pytest.approx(want)
    assert (out["n_helpful"], out["n_harmless"], out["n_honest"]) == (50, 40, 50)
