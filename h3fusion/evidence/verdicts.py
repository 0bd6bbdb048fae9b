"""The headline comparisons, their verdicts read from intervals, the power analysis and the one-line summaries."""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

import pandas as pd

from h3fusion.config import Profile
from h3fusion.evaluation import stats
from h3fusion.evidence.columns import LIKELIHOOD_COLUMNS, LIKELIHOOD_HEADLINE, NATS, cell, interval_text
from h3fusion.report import HEADLINE_GROUPS, PAPER_COL, PAPER_IMPROVEMENT_PCT, Evaluated, fused_variant


def headline_comparisons(
    profile: Profile, evaluated: Evaluated, scores: Mapping[str, stats.ItemScores]
) -> pd.DataFrame:
    """H3Fusion-MoE against each group (experts, ensembles, merges, and the data-mix LoRA the paper lacks): the
    paper's statistic with its interval.

    improvement = avg(H3Fusion-MoE) - max over the group's members of avg(member), in points and relative %;
    its interval comes from a paired bootstrap over items that re-takes the maximum in every resample.
    """
    fused = fused_variant(profile)
    rows = {}
    for group in HEADLINE_GROUPS:
        claim = PAPER_IMPROVEMENT_PCT.get(group)
        members = [m for m in evaluated.present(group) if m in scores]
        row: dict[str, Any] = {"members compared": len(members), PAPER_COL: claim}
        if fused in scores and members:
            best = max(members, key=lambda m: stats.average_value(scores[m]))
            imp = stats.improvement_over_best(scores[fused], [scores[m] for m in members])
            row.update(
                {
                    "best member (point estimate)": best,
                    "improvement (points)": str(imp["points"]),
                    "improvement (relative %)": str(imp["relative_pct"]),
                    "verdict": stats.verdict_word(imp["points"]),
                    "_points": imp["points"],
                    "_relative": imp["relative_pct"],
                }
            )
        else:
            row.update({"best member (point estimate)": "not evaluated", "verdict": "not compared"})
        rows[f"vs the {group}"] = row
    return pd.DataFrame(rows).T


def likelihood_headline(
    profile: Profile, evaluated: Evaluated, scores: Mapping[str, stats.ItemScores]
) -> pd.DataFrame:
    """The headline on the likelihood track, one dimension at a time: H3Fusion-MoE's mean minus the best
    member's of each group (the best re-taken in every paired bootstrap resample), with the verdict it gives.
    Members without this track (`evaluation.likelihood.skip_models`) are left out and counted."""
    fused = fused_variant(profile)
    rows = {}
    for group in HEADLINE_GROUPS:
        members = [m for m in evaluated.present(group) if m in scores]
        for task, metric in LIKELIHOOD_HEADLINE.items():
            label = LIKELIHOOD_COLUMNS[(task, metric)]
            row: dict[str, Any] = {"metric": label, "members compared": len(members)}
            if fused in scores and members and task in scores[fused].tasks:
                imp = stats.metric_improvement_over_best(
                    scores[fused], [scores[m] for m in members], task, metric
                )
                d = 3 if label in NATS else 1  # differences of nats per token are hundredths
                row.update(
                    {
                        "improvement over the best member": interval_text(
                            imp.value, imp.low, imp.high, d, "+"
                        ),
                        "n": imp.n,
                        "verdict": stats.verdict_word(imp),
                    }
                )
            else:
                row.update(
                    {"improvement over the best member": "not scored", "n": 0, "verdict": "not compared"}
                )
            rows[(f"vs the {group}", task)] = row
    return pd.DataFrame(rows).T


def likelihood_verdict(headline: pd.DataFrame) -> str:
    """The likelihood track's headline as sentences, each read from its interval."""
    said = []
    for (group, task), row in headline.iterrows():
        if row["verdict"] == "not compared":
            continue
        said.append(
            f"{group}, {task} ({row['metric']}): {row['verdict']} ({row['improvement over the best member']}, n = {row['n']})"
        )
    if not said:
        return "Nothing can be compared on the likelihood track yet."
    return (
        "On the likelihood track, H3Fusion-MoE against the best member of each group: "
        + "; ".join(said)
        + "."
    )


def findings(comparisons: pd.DataFrame, headline: pd.DataFrame, mdd_points: float | None, scale: str) -> str:
    """The intro's findings summary as Markdown bullets: the judged headline (the paper's metric) and the
    likelihood track's, one group per bullet, every verdict read from its interval (`verdict`,
    `likelihood_verdict` say the same in sentences)."""
    lines = [f"At {scale}, H3Fusion-MoE against the best member of each group (95 % intervals):", ""]
    for label, row in comparisons.iterrows():
        if row["verdict"] == "not compared":
            continue
        p, r = row["_points"], row["_relative"]
        lines.append(
            f"- **Judged ({label}, the paper's metric)**: {row['verdict']}, {p.value:+.1f} points [{p.low:+.1f}, "
            f"{p.high:+.1f}] of the three-dimension average ({r.value:+.1f} % relative; {_claim(row[PAPER_COL])})."
        )
    for group, rows in headline.groupby(level=0, sort=False):
        said = [
            f"{task} {row['verdict']} ({row['improvement over the best member']}, n = {row['n']})"
            for (_, task), row in rows.iterrows()
            if row["verdict"] != "not compared"
        ]
        if said:
            lines.append(f"- **Likelihood ({group}, ours)**: " + "; ".join(said) + ".")
    if mdd_points is not None:
        lines.append(
            f"- **Power**: the judged comparisons detect about {mdd_points:.1f} points of the three-dimension "
            "average with 80 % power; smaller differences are usually missed."
        )
    return "\n".join(lines) + "\n"


def likelihood_power(scores: Mapping[str, stats.ItemScores], power_level: float = 0.8) -> pd.DataFrame:
    """Per dimension of the likelihood track, the smallest paired difference detected at 80 % power."""
    rows = {}
    for task, metric in LIKELIHOOD_HEADLINE.items():
        scored = [s for s in scores.values() if task in s.tasks]
        if len(scored) < 2:
            continue
        mdd = stats.metric_mdd(list(itertools.combinations(scored, 2)), task, metric, power=power_level)
        unit = "nats/token" if LIKELIHOOD_COLUMNS[(task, metric)] in NATS else "points"
        rows[LIKELIHOOD_COLUMNS[(task, metric)]] = {
            "n": mdd["n"],
            "minimal detectable difference": f"{mdd['mdd']:.3f} {unit}"
            if unit != "points"
            else f"{mdd['mdd']:.1f} points",
            "model pairs": mdd["pairs"],
        }
    return pd.DataFrame(rows).T


def member_differences(
    profile: Profile, evaluated: Evaluated, scores: Mapping[str, stats.ItemScores]
) -> pd.DataFrame:
    """avg(H3Fusion-MoE) - avg(member) for every member of every headline group, each interval Bonferroni-adjusted
    for the number of members of its group (so the group's intervals hold together at 95 %)."""
    fused = fused_variant(profile)
    rows = []
    if fused not in scores:
        return pd.DataFrame()
    for group in HEADLINE_GROUPS:
        members = [m for m in evaluated.present(group) if m in scores]
        for m in members:
            d = stats.difference(
                scores[fused], scores[m], confidence=1 - (1 - stats.CONFIDENCE) / len(members)
            )
            rows.append(
                {
                    "group": group,
                    "member": m,
                    "H3Fusion-MoE minus member (points)": str(d),
                    "verdict": stats.verdict_word(d),
                }
            )
    return pd.DataFrame(rows).set_index(["group", "member"]) if rows else pd.DataFrame()


def _claim(claim: float | None) -> str:
    """The paper's figure for a headline group, or that it has none (the data-mix LoRA is not in the paper)."""
    if claim is None or pd.isna(claim):
        return "not compared in the paper"
    return f"the paper claims {claim:+.2f} %"


def verdict(comparisons: pd.DataFrame, scale: str = "this scale") -> str:
    """What reproduces, read from the intervals of `headline_comparisons` (never from a point estimate's sign)."""
    said, missing = [], []
    for label, row in comparisons.iterrows():
        group = str(label).removeprefix("vs the ")
        if row["verdict"] == "not compared":
            missing.append(group)
            continue
        p, r, claim = row["_points"], row["_relative"], row[PAPER_COL]
        against = f"the best of the {group}" if row["members compared"] > 1 else f"the {group}"
        said.append(
            f"against {against}, H3Fusion-MoE is {row['verdict']} ({p.value:+.1f} points, 95 % CI "
            f"[{p.low:+.1f}, {p.high:+.1f}]; {r.value:+.1f} % relative, CI [{r.low:+.1f}, {r.high:+.1f}]; "
            f"{_claim(claim)})"
        )
    if not said:
        return "Nothing can be compared yet: H3Fusion-MoE or every comparison group lacks per-item results."
    text = f"At {scale}, " + "; ".join(said) + "."
    if missing:
        text += f" Not compared (not evaluated): {', '.join(missing)}."
    return text


def power(scores: Mapping[str, stats.ItemScores], power_level: float = 0.8) -> dict[str, float]:
    """The minimal detectable difference of the three-dimension average at these sample sizes, with the
    per-item variance of paired differences taken from every pair of evaluated models."""
    complete = [s for s in scores.values() if all(t in s.tasks for t in stats.HEADLINE)]
    return stats.minimal_detectable_difference(list(itertools.combinations(complete, 2)), power=power_level)


def power_note(mdd: Mapping[str, float]) -> str:
    """The power analysis as one sentence."""
    sizes = " / ".join(f"{int(mdd[f'n_{t}'])} {t}" for t in stats.HEADLINE)
    return (
        f"With {sizes} items, a paired comparison of two models' three-dimension averages detects a difference "
        f"of **{mdd['mdd_points']:.1f} points** with 80 % power at the 5 % level (standard error of a difference "
        f"{mdd['se_points']:.1f} points; per-item standard deviations of paired differences "
        + ", ".join(f"{t} {mdd[f'sd_{t}']:.0f}" for t in stats.HEADLINE)
        + f" points, medians over {int(mdd['pairs'])} model pairs). Smaller true differences are usually missed."
    )


def pairwise_summary(
    judged: Mapping[str, stats.ItemScores],
    track: Mapping[str, stats.ItemScores],
    a: str,
    b: str,
) -> str:
    """One sentence per track on `a` minus `b` (paired over the same items), each verdict read from its
    interval: the judged three-dimension average, and each headline metric of the likelihood track."""
    parts = []
    if a in judged and b in judged:
        d = stats.difference(judged[a], judged[b])
        parts.append(
            f"judged three-dimension average {d.value:+.1f} points [{d.low:+.1f}, {d.high:+.1f}] "
            f"({stats.verdict_word(d)})"
        )
    if a in track and b in track:
        for task, metric in LIKELIHOOD_HEADLINE.items():
            if task in track[a].tasks and task in track[b].tasks:
                d = stats.metric_difference(track[a], track[b], task, metric)
                column = LIKELIHOOD_COLUMNS[(task, metric)]
                parts.append(f"{column} {cell(d, column)} (n = {d.n}, {stats.verdict_word(d)})")
    if not parts:
        return f"{a} and {b} cannot be compared: one of them has no per-item results."
    return f"**{a}** minus **{b}**: " + "; ".join(parts) + "."
