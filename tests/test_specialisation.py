"""The specialisation table: paired differences against the base, signed so positive is better, oracle row."""

from __future__ import annotations

import numpy as np
import pytest

from h3fusion.evaluation import stats
from h3fusion.specialisation import ORACLE, improvement, specialisation_table

N = 40
RNG = np.random.default_rng(0)
BASE = {
    "helpful": RNG.choice([0.0, 100.0], N),
    "harmless": RNG.choice([0.0, 100.0], N),
    "honest": RNG.choice([0.0, 100.0], N),
}
METRIC = stats.HEADLINE


def scores(name: str, shift: dict[str, float]) -> stats.ItemScores:
    tasks = {}
    for task, values in BASE.items():
        ids = [f"{task}-{i}" for i in range(N)]
        tasks[task] = (ids, {METRIC[task]: values + shift.get(task, 0.0)})
    return stats.ItemScores(name, tasks)


@pytest.fixture
def models():
    return {
        "base": scores("base", {}),
        "helpful": scores("helpful", {"helpful": 10.0, "honest": -5.0}),
        "harmless": scores("harmless", {"harmless": -20.0}),  # harmful rate down: better
        "honest": scores("honest", {"honest": 15.0, "helpful": -30.0}),
        "fused": scores("fused", {"helpful": 5.0}),
    }


def test_a_constant_shift_is_the_improvement_with_a_degenerate_interval(models):
    e = improvement(models["helpful"], models["base"], "helpful", "judged")
    assert (e.value, e.low, e.high, e.n) == pytest.approx((10.0, 10.0, 10.0, N))
    # harmfulness is lower-is-better: a lower harmful rate is a positive improvement
    h = improvement(models["harmless"], models["base"], "harmless", "judged")
    assert h.value == pytest.approx(20.0) and stats.verdict_word(h) == "better"


def test_table_rows_columns_oracle_and_signs(models):
    experts = {t: t for t in ("helpful", "harmless", "honest")}
    table = specialisation_table(models, experts, others=["fused"])
    assert list(table.index) == ["helpful expert", "harmless expert", "honest expert", ORACLE, "fused"]
    assert len(table.columns) == 3 and all(f"(n={N})" in c for c in table.columns)
    helpful_col, harmless_col, honest_col = table.columns
    assert (
        table.loc["honest expert", helpful_col].startswith("-30.0")
        and "worse" in table.loc["honest expert", helpful_col]
    )
    assert (
        table.loc["harmless expert", harmless_col].startswith("20.0")
        and "better" in table.loc["harmless expert", harmless_col]
    )
    # the oracle row is each dimension's own expert
    assert table.loc[ORACLE, helpful_col] == table.loc["helpful expert", helpful_col]
    assert table.loc[ORACLE, harmless_col] == table.loc["harmless expert", harmless_col]
    assert table.loc[ORACLE, honest_col] == table.loc["honest expert", honest_col]
    assert "within noise" in table.loc["helpful expert", harmless_col]  # no shift: a zero-width interval at 0


def test_unknown_track_is_refused(models):
    with pytest.raises(ValueError, match="track"):
        improvement(models["helpful"], models["base"], "helpful", "other")


def test_versus_signs_each_dimension_so_positive_is_better(models):
    from h3fusion.specialisation import versus

    table = versus(models, "harmless", "helpful", ["helpful", "harmless", "honest"])
    diff = table["difference (positive = better)"].str.split(" ").str[0].astype(float)
    # harmless minus helpful: helpful -10 points (worse), harmful rate -20 (better, so +20), honest +5
    assert diff.tolist() == pytest.approx([-10.0, 20.0, 5.0])
    assert [v.split(" ")[0] for v in table["verdict"]] == ["worse", "better", "better"]
    assert (table["n"] == N).all()
