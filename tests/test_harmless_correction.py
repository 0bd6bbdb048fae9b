"""Correcting the harmfulness judge's rates for its measured errors (Rogan-Gladen): the corrected rate inverts
the judge's known error rates, a perfect judge changes nothing, the judge's own uncertainty widens the interval,
and a judge no better than chance is refused."""

from __future__ import annotations

import numpy as np
import pytest

from h3fusion.config import derived_profile
from h3fusion.errors import ArtifactError
from h3fusion.evaluation import stats

# A judge of sensitivity 0.8 and specificity 0.9 on 100 harmful and 100 harmless validation pairs.
JUDGE = {"tp": 80, "fn": 20, "tn": 90, "fp": 10}
PERFECT = {"tp": 60, "fn": 0, "tn": 40, "fp": 0}


def _flags(k: int, n: int = 100, seed: int = 0) -> np.ndarray:
    """n items' flags in % (0/100), k of them flagged, in a shuffled order."""
    return 100.0 * np.random.default_rng(seed).permutation(np.r_[np.ones(k), np.zeros(n - k)])


def test_a_known_case_is_inverted_exactly():
    # true rate 0.3: observed = 0.8 * 0.3 + (1 - 0.9) * 0.7 = 0.31
    e = stats.corrected_rate(_flags(31), **JUDGE)
    assert e.value == pytest.approx(30.0) and e.n == 100
    assert e.low < e.value < e.high


def test_a_perfect_judge_changes_neither_the_rate_nor_its_bootstrap_interval():
    flags = _flags(23)
    e = stats.corrected_rate(flags, **PERFECT)
    low, high = stats._bootstrap([flags], lambda v: v.mean())
    assert e.value == pytest.approx(23.0)
    assert (e.low, e.high) == pytest.approx((low, high))


def test_the_judges_uncertainty_widens_the_interval():
    flags = _flags(31)
    corrected, observed = stats.corrected_rate(flags, **JUDGE), stats.rate(flags)
    low, high = stats._bootstrap([flags], lambda v: v.mean())
    assert corrected.high - corrected.low > observed.high - observed.low
    assert corrected.high - corrected.low > (high - low) / (0.8 + 0.9 - 1)  # beyond the rescaling alone


def test_the_corrected_rate_is_clipped_to_a_proportion():
    assert stats.corrected_rate(_flags(5), **JUDGE).value == 0.0  # below the false-positive rate 0.1
    assert stats.corrected_rate(_flags(95), **JUDGE).value == 100.0  # above the sensitivity 0.8
    e = stats.corrected_rate(_flags(5), **JUDGE)
    assert 0.0 <= e.low <= e.high <= 100.0


def test_the_corrected_difference_is_the_observed_one_over_youdens_index():
    a, b = _flags(31, seed=1), _flags(24, seed=2)
    d = stats.corrected_difference(a, b, **JUDGE)
    assert d.value == pytest.approx((31.0 - 24.0) / (0.8 + 0.9 - 1))
    assert d.value == pytest.approx(
        stats.corrected_rate(a, **JUDGE).value - stats.corrected_rate(b, **JUDGE).value
    )
    observed = stats._bootstrap([a - b], lambda x: x.mean())
    assert d.low < d.value < d.high
    assert d.high - d.low > observed[1] - observed[0]
    perfect = stats.corrected_difference(a, b, **PERFECT)
    assert perfect.value == pytest.approx(7.0)


def test_the_difference_is_paired_over_items():
    a = _flags(30, seed=3)
    b = a.copy()
    b[np.flatnonzero(a == 0)[:3]] = 100.0  # b flags three more items than a, on the same items
    d = stats.corrected_difference(b, a, **PERFECT)
    assert d.value == pytest.approx(3.0)
    assert d.low >= 0.0  # every resample keeps b's extra flags: a paired interval cannot cross zero


@pytest.mark.parametrize(
    "counts", [{"tp": 50, "fn": 50, "tn": 50, "fp": 50}, {"tp": 30, "fn": 70, "tn": 60, "fp": 40}]
)
def test_a_judge_no_better_than_chance_is_refused(counts):
    with pytest.raises(ArtifactError, match="no better than chance"):
        stats.corrected_rate(_flags(31), **counts)
    with pytest.raises(ArtifactError, match="no better than chance"):
        stats.corrected_difference(_flags(31), _flags(20), **counts)


def test_flags_must_be_binary():
    with pytest.raises(ArtifactError, match="binary"):
        stats.corrected_rate(np.array([0.0, 50.0, 100.0]), **JUDGE)


COUNTS = {"true_positive": 80, "false_negative": 20, "true_negative": 90, "false_positive": 10}


def _scores(name: str, harmful: np.ndarray) -> stats.ItemScores:
    return stats.ItemScores(
        name, {"harmless": ([f"s{i}" for i in range(len(harmful))], {"harmful_rate": harmful})}
    )


def test_the_correction_table_has_one_row_per_model_with_both_rates(smoke_profile, monkeypatch):
    from h3fusion import evidence
    from h3fusion.evaluation.judges import harmless

    scores = {"base": _scores("base", _flags(31)), "fused": _scores("fused", _flags(24, seed=5))}
    table = evidence.harmless_correction(smoke_profile, scores, COUNTS)
    assert list(table.index) == ["base", "fused"]
    base = table.loc["base"]
    assert base["n"] == 100
    assert base["_corrected"].value == pytest.approx(30.0)
    assert base["observed harmful %"] == str(stats.rate(_flags(31)))
    assert base["corrected harmful %"] == str(stats.corrected_rate(_flags(31), tp=80, fn=20, tn=90, fp=10))
    assert base["judge sensitivity %"].startswith("80.0 [") and base["judge specificity %"].startswith(
        "90.0 ["
    )

    monkeypatch.setattr(harmless, "confusion", lambda profile: COUNTS)  # the default counts are the judge's
    assert evidence.harmless_correction(smoke_profile, scores).equals(table)
    paper = derived_profile(smoke_profile, {"judges.harmless.judge": "beaver-dam-7b"})
    assert evidence.harmless_correction(paper, scores).empty


def test_the_correction_note_states_the_counts_and_the_method():
    from h3fusion import evidence

    note = evidence.harmless_correction_note(COUNTS)
    for said in ("170 of 200", "flags 80", "clears 90", "Rogan–Gladen", "0.700", "independently"):
        assert said in note


def test_judgements_of_another_judge_are_not_corrected_with_these_counts(smoke_profile, tmp_path):
    import json

    from h3fusion import evidence
    from h3fusion.evaluation.store import metrics_path

    profile = smoke_profile.model_copy(update={"runs_dir": str(tmp_path)})
    scores = {"base": _scores("base", _flags(31))}
    path = metrics_path(profile, "base")
    path.parent.mkdir(parents=True)
    accuracy = (80 + 90) / 200  # COUNTS' accuracy: accepted
    path.write_text(json.dumps({"judges": {"harmless": {"validation": {"accuracy": accuracy}}}}))
    assert list(evidence.harmless_correction(profile, scores, COUNTS).index) == ["base"]
    path.write_text(json.dumps({"judges": {"harmless": {"validation": {"accuracy": 0.74}}}}))
    with pytest.raises(ArtifactError, match="base's harmless judgements were made by a judge with held-out accuracy 0.74"):
        evidence.harmless_correction(profile, scores, COUNTS)
