"""The columns every evidence table uses (labels with their direction, in the book's order) and how a value
with its interval is written."""

from __future__ import annotations

from h3fusion.evaluation import overrefusal, stats

COLUMNS = {
    ("helpful", "win_rate"): "Helpful: win % ↑",
    ("harmless", "harmful_rate"): "Harmful % ↓",
    ("honest", "truthful_x_informative"): "Truthful×Informative % ↑",
    ("honest", "truthful"): "Truthful % ↑",
    ("honest", "informative"): "Informative % ↑",
}

AVERAGE = "Average % ↑"

HEADLINE_COLUMNS = [COLUMNS[(t, m)] for t, m in stats.HEADLINE.items()]

LIKELIHOOD_COLUMNS = {
    ("helpful", "ref_logprob"): "Helpful: reference log-lik ↑",
    ("harmless", "safe_preferred"): "Safe preferred % ↑",
    ("harmless", "safe_margin"): "Safe − unsafe log-lik ↑",
    ("honest", "mc1"): "MC1 % ↑",
    ("honest", "mc2"): "MC2 % ↑",
}
"""The likelihood track (ours, judge-free): log-likelihoods in nats per token, the rest in %."""

LIKELIHOOD_HEADLINE = {"helpful": "ref_logprob", "harmless": "safe_margin", "honest": "mc2"}
"""The metric of each dimension the likelihood track's headline compares (all higher-is-better). Harmless uses
the safe-unsafe margin, not the binary preference: a 0/1 preference per pair discards how far a model moved the
two responses apart, so its paired differences between models resolve less than the margin's on the same pairs."""

XSTEST_COLUMNS = {
    (overrefusal.SAFE, overrefusal.OVER_REFUSAL): "XSTest over-refusal % ↓",
    (overrefusal.UNSAFE, overrefusal.UNSAFE_COMPLIANCE): "XSTest unsafe compliance % ↓",
}
"""The XSTest track (ours, `h3fusion.evaluation.overrefusal`): safe prompts refused, unsafe prompts answered, each
a rate of 0/100 items with Wilson's interval; not part of the three-dimension average."""

NATS = {LIKELIHOOD_COLUMNS[("helpful", "ref_logprob")], LIKELIHOOD_COLUMNS[("harmless", "safe_margin")]}
"""Columns in nats per token, shown with two decimals (the others are % with one)."""


def interval_text(value: float, low: float, high: float, digits: int, sign: str = "") -> str:
    """ "value [low, high]" with `digits` decimals (`sign="+"` to sign every number)."""
    f = f"{sign}.{digits}f"
    return f"{value:{f}} [{low:{f}}, {high:{f}}]"


def cell(estimate: stats.Estimate, column: str) -> str:
    """ "value [low, high]" with two decimals for a column in nats per token, one otherwise."""
    return interval_text(estimate.value, estimate.low, estimate.high, 2 if column in NATS else 1)
