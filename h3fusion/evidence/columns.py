"""The columns every evidence table uses (labels with their direction, in the book's order) and how a value
with its interval is written."""

from __future__ import annotations

from collections.abc import Iterable

from h3fusion.dimensions import DIMENSIONS
from h3fusion.evaluation import overrefusal, stats

COLUMNS = {(d.name, m.key): m.label for d in DIMENSIONS.values() for m in d.judged}
"""The judged track (the paper's metrics): {(dimension, metric): label}, from `h3fusion.dimensions`."""

AVERAGE = "Average % ↑"
"""(helpful win rate + (100 - harmful %) + truthful×informative %) / 3: the quantity the paper's headline compares."""

AVERAGE_FORMULA = "avg(m) = [win_rate(m) + (100 - harmful%(m)) + truthful×informative%(m)] / 3"
IMPROVEMENT_FORMULA = (
    "improvement over group G = 100 * (avg(fused) - max_{g in G} avg(g)) / max_{g in G} avg(g)  "
    "[relative %; absolute points = avg(fused) - max_{g in G} avg(g)], with " + AVERAGE_FORMULA
)
"""The paper's headline comparison (computed with intervals by `h3fusion.evidence.verdicts`)."""

HEADLINE_COLUMNS = [COLUMNS[(t, m)] for t, m in stats.HEADLINE.items()]
PART_COLUMNS = [m.label for d in DIMENSIONS.values() for m in d.judged[1:]]
"""The judged metrics that are not a dimension's headline (the parts of honesty's truthful×informative)."""

LIKELIHOOD_COLUMNS = {(d.name, m.key): m.label for d in DIMENSIONS.values() for m in d.likelihood}
"""The likelihood track (ours, judge-free): log-likelihoods in nats per token, the rest in %."""

LIKELIHOOD_HEADLINE = {d.name: d.likelihood_headline for d in DIMENSIONS.values()}
"""The metric of each dimension the likelihood track's headline compares (all higher-is-better; each dimension's
module says why it chose its metric)."""

XSTEST_COLUMNS = {
    (overrefusal.SAFE, overrefusal.OVER_REFUSAL): "XSTest over-refusal % ↓",
    (overrefusal.UNSAFE, overrefusal.UNSAFE_COMPLIANCE): "XSTest unsafe compliance % ↓",
}
"""The XSTest track (ours, `h3fusion.evaluation.overrefusal`): safe prompts refused, unsafe prompts answered, each
a rate of 0/100 items with Wilson's interval; not part of the three-dimension average."""

NATS = {m.label for d in DIMENSIONS.values() for m in (*d.judged, *d.likelihood) if m.nats}
"""Columns in nats per token, shown with two decimals (the others are % with one)."""

_HIGHER_IS_BETTER = {
    **{m.label: m.higher_is_better for d in DIMENSIONS.values() for m in (*d.judged, *d.likelihood)},
    AVERAGE: True,
    **dict.fromkeys(XSTEST_COLUMNS.values(), False),
}


def higher_is_better(columns: Iterable[str]) -> dict[str, bool]:
    """{column: whether a higher value is better} for columns of these tables (read from the metrics' definitions,
    not from the arrows in their labels)."""
    return {c: _HIGHER_IS_BETTER[c] for c in columns}


def interval_text(value: float, low: float, high: float, digits: int, sign: str = "") -> str:
    """ "value [low, high]" with `digits` decimals (`sign="+"` to sign every number)."""
    f = f"{sign}.{digits}f"
    return f"{value:{f}} [{low:{f}}, {high:{f}}]"


def cell(estimate: stats.Estimate, column: str) -> str:
    """ "value [low, high]" with two decimals for a column in nats per token, one otherwise."""
    return interval_text(estimate.value, estimate.low, estimate.high, 2 if column in NATS else 1)
