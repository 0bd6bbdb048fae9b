"""Specialisation: every expert on every dimension against the base model, with an oracle row.

Fusion can only help if the experts differ: each should be better than the base on its own dimension, and the
question is what each costs on the others. The oracle row sends each dimension's items through that
dimension's own expert, the upper bound a router that routes every prompt perfectly (and mixes nothing) could
reach. Other models (the fused ones) can be added as rows, so the distance to the oracle is read in the same
table. Every cell is a paired difference over the same items with its 95 % bootstrap interval
(`h3fusion.evaluation.stats.metric_difference`), signed so that a positive value is always the better one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pandas as pd

from h3fusion.evaluation import stats
from h3fusion.evidence import COLUMNS, LIKELIHOOD_COLUMNS, LIKELIHOOD_HEADLINE, cell

ORACLE = "oracle (each dimension through its own expert)"


def _metric(task: str, track: str) -> tuple[str, str, bool]:
    """(metric, column label, higher is better) of a dimension's headline metric on a track."""
    if track == "judged":
        metric = stats.HEADLINE[task]
        return metric, COLUMNS[(task, metric)], stats.HIGHER_IS_BETTER[task]
    if track == "likelihood":
        metric = LIKELIHOOD_HEADLINE[task]
        return metric, LIKELIHOOD_COLUMNS[(task, metric)], True
    raise ValueError(f"track must be 'judged' or 'likelihood', got {track!r}")


def improvement(model: stats.ItemScores, base: stats.ItemScores, task: str, track: str) -> stats.Estimate:
    """model minus base on a dimension's headline metric, signed so that positive is better."""
    metric, _, higher = _metric(task, track)
    d = stats.metric_difference(model, base, task, metric)
    return d if higher else stats.Estimate(-d.value, -d.high, -d.low, d.n)


def specialisation_table(
    scores: Mapping[str, stats.ItemScores],
    experts: Mapping[str, str],
    base: str = "base",
    track: str = "judged",
    others: Sequence[str] = (),
) -> pd.DataFrame:
    """Rows: each expert, the oracle, then `others`; columns: each dimension's headline metric. A cell is
    "improvement over the base [95 % interval]" (positive = better) with its verdict word.

    `experts` maps a dimension to the name of its expert in `scores` ({"helpful": "helpful", ...})."""
    tasks = [t for t in experts if t in scores[base].tasks]
    if not tasks:
        raise ValueError(f"the base model {base!r} has no scores on the experts' dimensions {list(experts)}")
    rows: dict[str, dict[str, str]] = {}

    def row(estimates: Mapping[str, stats.Estimate]) -> dict[str, str]:
        out = {}
        for task, e in estimates.items():
            column = _metric(task, track)[1]
            out[f"{column} (n={e.n})"] = f"{cell(e, column)} {stats.verdict_word(e).split(' at ')[0]}"
        return out

    for owner, name in experts.items():
        rows[f"{owner} expert"] = row({t: improvement(scores[name], scores[base], t, track) for t in tasks})
    rows[ORACLE] = row({t: improvement(scores[experts[t]], scores[base], t, track) for t in tasks})
    for name in others:
        rows[name] = row({t: improvement(scores[name], scores[base], t, track) for t in tasks})
    frame = pd.DataFrame.from_dict(rows, orient="index")
    frame.index.name = f"improvement over {base} (positive = better)"
    return frame


def versus(
    scores: Mapping[str, stats.ItemScores], model: str, reference: str, tasks: Sequence[str], track: str = "judged"
) -> pd.DataFrame:
    """`model` against `reference` on each dimension's headline metric of a track: both rates, the paired
    difference (signed so that positive = `model` better) with its 95 % interval, n and the verdict."""
    rows = {}
    for task in tasks:
        if task not in scores[model].tasks or task not in scores[reference].tasks:
            continue
        metric, column, _ = _metric(task, track)
        d = improvement(scores[model], scores[reference], task, track)
        rows[column] = {
            model: cell(stats.rate(scores[model].values(task, metric)), column),
            reference: cell(stats.rate(scores[reference].values(task, metric)), column),
            "difference (positive = better)": cell(d, column),
            "n": d.n,
            "verdict": stats.verdict_word(d),
        }
    frame = pd.DataFrame.from_dict(rows, orient="index")
    frame.index.name = f"{model} vs {reference} ({track})"
    return frame
