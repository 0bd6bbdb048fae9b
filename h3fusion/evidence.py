"""The results chapter's numbers with their uncertainty, computed from the stored per-item results.

Every cell of the main table gets its n and a 95 % interval, every headline comparison an interval from a
paired bootstrap over items (`h3fusion.evaluation.stats`), and every verdict sentence is read from those
intervals ("better", "worse", "within noise at this sample size"), never from the sign of a point estimate.
The best member of a group is not picked first and then compared on the same items: the headline statistic
takes the group's maximum inside every bootstrap resample, and each member is also compared one by one with
Bonferroni-adjusted intervals.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from h3fusion.config import Profile
from h3fusion.evaluation import overrefusal, stats
from h3fusion.evaluation.store import metrics_path
from h3fusion.report import HEADLINE_GROUPS, PAPER_COL, PAPER_IMPROVEMENT_PCT, Evaluated, fused_variant

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
the safe-unsafe margin, not the binary preference: on the cpu profile the base model and the three experts
all prefer the safe side on 26 of the 44 prompts (the harmless expert on exactly the base model's), so the
preference barely separates models."""
XSTEST_COLUMNS = {
    (overrefusal.SAFE, overrefusal.OVER_REFUSAL): "XSTest over-refusal % ↓",
    (overrefusal.UNSAFE, overrefusal.UNSAFE_COMPLIANCE): "XSTest unsafe compliance % ↓",
}
"""The XSTest track (ours, `h3fusion.evaluation.overrefusal`): safe prompts refused, unsafe prompts answered, each
a rate of 0/100 items with Wilson's interval; not part of the three-dimension average."""
NATS = {LIKELIHOOD_COLUMNS[("helpful", "ref_logprob")], LIKELIHOOD_COLUMNS[("harmless", "safe_margin")]}
"""Columns in nats per token, shown with two decimals (the others are % with one)."""


def _labelled(models: Evaluated | Mapping[str, str]) -> dict[str, str]:
    """{label: model name}: as given, or every model of `Evaluated` under its own name."""
    return {m: m for m in models.metrics} if isinstance(models, Evaluated) else dict(models)


def item_scores(profile: Profile, models: Evaluated | Mapping[str, str]) -> dict[str, stats.ItemScores]:
    """Per-item scores of the evaluated models ({label: model name} or every model of `Evaluated`) that have
    per-item judgements; the keys are the labels."""
    out = {}
    for label, name in _labelled(models).items():
        folder = metrics_path(profile, name).parent
        if (folder / "judgements").is_dir():
            out[label] = stats.read_item_scores(folder, name)
    return out


def _track_scores(
    profile: Profile, models: Evaluated | Mapping[str, str], read: Callable[[Path, str], stats.ItemScores | None]
) -> dict[str, stats.ItemScores]:
    """{label: per-item scores} of the models whose evaluation folder `read` finds the track in."""
    out = {}
    for label, name in _labelled(models).items():
        scores = read(metrics_path(profile, name).parent, name)
        if scores is not None:
            out[label] = scores
    return out


def likelihood_scores(profile: Profile, models: Evaluated | Mapping[str, str]) -> dict[str, stats.ItemScores]:
    """Per-item likelihood-track scores of the models that have them ({label: model name} or `Evaluated`)."""
    return _track_scores(profile, models, stats.read_likelihood_scores)


def xstest_scores(profile: Profile, models: Evaluated | Mapping[str, str]) -> dict[str, stats.ItemScores]:
    """Per-item XSTest scores of the models evaluated on that track ({label: model name} or `Evaluated`)."""
    return _track_scores(profile, models, stats.read_xstest_scores)


def xstest_note(profile: Profile, evaluated: Evaluated) -> str:
    """The line under the XSTest columns: the refusal classifier's validated agreement beside the XSTest authors'
    string-match labels (`refusal.describe`, per distinct classifier the models were scored with), and the caveat
    that it was validated on other models' completions."""
    from h3fusion.evaluation.judges.refusal import describe

    validations = []
    for m in evaluated.metrics.values():
        v = m.get(overrefusal.PHASE, {}).get("judge", {}).get("validation")
        if v and v not in validations:
            validations.append(v)
    if not validations:
        return "No model was evaluated on XSTest (`evaluation.xstest_per_type: 0`, or evaluated before the track)."
    return (
        " ".join(describe(v) for v in validations)
        + " Those completions come from large chat models (GPT-4, Llama-2-70B-chat and Mistral-7B-Instruct, the "
        f"XSTest paper's generators), not from {profile.model.base}: this profile's short answers from a small model "
        "are outside what the classifier was validated on, an error the intervals do not include. Over-refusal is "
        "the share of safe prompts refused, unsafe compliance the share of unsafe prompts answered (both lower is "
        "better); neither enters the three-dimension average."
    )


def bar_frames(long: pd.DataFrame, columns: list[str]) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(values, lows, highs) of `estimates` for `plots.results_bars`: models as rows, `columns` as columns."""
    frame = long[long["column"].isin(columns)]
    order = list(dict.fromkeys(frame["model"]))
    return tuple(
        frame.pivot(index="model", columns="column", values=k).reindex(index=order, columns=columns)
        for k in ("value", "low", "high")
    )


def _interval(value: float, low: float, high: float, digits: int, sign: str = "") -> str:
    """"value [low, high]" with `digits` decimals (`sign="+"` to sign every number)."""
    f = f"{sign}.{digits}f"
    return f"{value:{f}} [{low:{f}}, {high:{f}}]"


def cell(estimate: stats.Estimate, column: str) -> str:
    """"value [low, high]" with two decimals for a column in nats per token, one otherwise."""
    return _interval(estimate.value, estimate.low, estimate.high, 2 if column in NATS else 1)


def own_dimension(
    scores: Mapping[str, stats.ItemScores], tasks: list[str], base: str = "base", track: str = "judged"
) -> pd.DataFrame:
    """Each expert against the base model on its own dimension's headline metric (of the judged or the
    likelihood track): the paired difference with its interval and the verdict read from it (harmfulness
    judged: a negative difference is the better one; every likelihood metric is higher-is-better)."""
    headline, columns = (
        (stats.HEADLINE, COLUMNS) if track == "judged" else (LIKELIHOOD_HEADLINE, LIKELIHOOD_COLUMNS)
    )
    rows = {}
    for task in tasks:
        if task not in scores or task not in scores[task].tasks:
            continue
        metric = headline[task]
        column = columns[(task, metric)]
        d = stats.metric_difference(scores[task], scores[base], task, metric)
        higher = stats.HIGHER_IS_BETTER[task] if track == "judged" else True
        signed = d if higher else stats.Estimate(-d.value, -d.high, -d.low, d.n)
        rows[task] = {
            "metric": column,
            "expert": cell(stats.rate(scores[task].values(task, metric)), column),
            "base": cell(stats.rate(scores[base].values(task, metric)), column),
            "expert minus base": cell(d, column),
            "n": d.n,
            "the expert is": stats.verdict_word(signed),
        }
    return pd.DataFrame(rows).T


def estimates(
    scores: Mapping[str, stats.ItemScores], columns: Mapping[tuple[str, str], str] = COLUMNS
) -> pd.DataFrame:
    """Long form: one row per (model, column) with value, low, high and n (and the three-dimension average when
    `columns` hold the judged headline metrics it is made of)."""
    with_average = all(key in columns for key in stats.HEADLINE.items())
    rows = []
    for name, s in scores.items():
        for (task, metric), column in columns.items():
            if task in s.tasks and metric in s.tasks[task][1]:
                e = stats.rate(s.values(task, metric))
                rows.append(
                    {
                        "model": name,
                        "column": column,
                        "value": e.value,
                        "low": e.low,
                        "high": e.high,
                        "n": e.n,
                    }
                )
        if with_average and all(t in s.tasks for t in stats.HEADLINE):
            e = stats.average(s)
            rows.append(
                {"model": name, "column": AVERAGE, "value": e.value, "low": e.low, "high": e.high, "n": e.n}
            )
    return pd.DataFrame(rows, columns=["model", "column", "value", "low", "high", "n"])


def interval_table(
    long: pd.DataFrame, columns: list[str], labels: Mapping[str, str] | None = None
) -> pd.DataFrame:
    """Cells "value [low, high]" (95 %), the items per column in its header, rows in evaluation order."""
    frame = long[long["column"].isin(columns)]
    cells = frame.assign(
        cell=[
            _interval(v, lo, hi, 2 if c in NATS else 1)
            for v, lo, hi, c in frame[["value", "low", "high", "column"]].itertuples(index=False)
        ]
    )
    table = cells.pivot(index="model", columns="column", values="cell").reindex(
        index=list(dict.fromkeys(frame["model"])), columns=[c for c in columns if c in set(frame["column"])]
    )
    sizes = frame.groupby("column")["n"].agg(lambda n: "/".join(str(x) for x in sorted(set(n))))
    table.columns = [f"{c} (n={sizes[c]})" for c in table.columns]
    return table.rename(index=dict(labels or {}))


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
                imp = stats.metric_improvement_over_best(scores[fused], [scores[m] for m in members], task, metric)
                d = 3 if label in NATS else 1  # differences of nats per token are hundredths
                row.update(
                    {
                        "improvement over the best member": _interval(imp.value, imp.low, imp.high, d, "+"),
                        "n": imp.n,
                        "verdict": stats.verdict_word(imp),
                    }
                )
            else:
                row.update({"improvement over the best member": "not scored", "n": 0, "verdict": "not compared"})
            rows[(f"vs the {group}", task)] = row
    return pd.DataFrame(rows).T


def likelihood_verdict(headline: pd.DataFrame) -> str:
    """The likelihood track's headline as sentences, each read from its interval."""
    said = []
    for (group, task), row in headline.iterrows():
        if row["verdict"] == "not compared":
            continue
        said.append(f"{group}, {task} ({row['metric']}): {row['verdict']} ({row['improvement over the best member']}, n = {row['n']})")
    if not said:
        return "Nothing can be compared on the likelihood track yet."
    return "On the likelihood track, H3Fusion-MoE against the best member of each group: " + "; ".join(said) + "."


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
            "minimal detectable difference": f"{mdd['mdd']:.3f} {unit}" if unit != "points" else f"{mdd['mdd']:.1f} points",
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


def judges_note(evaluated: Evaluated) -> str:
    """One line naming the judge of each dimension (the table headers stay short)."""
    names: dict[str, list[str]] = {}
    for m in evaluated.metrics.values():
        for task, judge in m.get("judges", {}).items():
            names.setdefault(task, [])
            if judge.get("name", "?") not in names[task]:
                names[task].append(judge.get("name", "?"))
    listed = "; ".join(f"{task}: {' | '.join(n)}" for task, n in names.items())
    return f"Judges: {listed}. The likelihood track (TruthfulQA MC1/MC2 among it) needs no judge."


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


def finished_share(profile: Profile, models: Mapping[str, str]) -> pd.DataFrame:
    """Per model and dimension, the share (%) of answers that ended before the generation cap, with its interval.

    Estimated from the stored answers: one whose tokens (re-tokenised with the profile's tokenizer) come within
    one token of its dimension's cap (`evaluation.generation_for`) is counted as cut; the others stopped at the
    end-of-turn token or a stop string. The helpfulness judge was validated on whole answers, so a low share
    means it scores something it was not validated on (chapter 0 measures how much that matters).
    """
    import numpy as np

    from h3fusion.evaluation.store import read_jsonl
    from h3fusion.models import load_tokenizer

    tok = load_tokenizer(profile)
    rows = {}
    for label, name in models.items():
        folder = metrics_path(profile, name).parent / "generations"
        if not folder.is_dir():
            continue
        row = {}
        for path in sorted(folder.glob("*.jsonl")):
            cap = profile.evaluation.generation_for(path.stem).max_new_tokens
            answers = [r["answer"] for r in read_jsonl(path)]
            lengths = [len(tok(a, add_special_tokens=False).input_ids) for a in answers]
            row[f"{path.stem} (cap {cap}, n={len(answers)})"] = str(stats.rate(100.0 * (np.asarray(lengths) < cap - 1)))
        rows[label] = row
    return pd.DataFrame(rows).T


def _confusion(counts: Mapping[str, Any]) -> tuple[int, int, int, int]:
    """(tp, fn, tn, fp) of the harmfulness judge's confusion counts (harmful = positive)."""
    keys = ("true_positive", "false_negative", "true_negative", "false_positive")
    tp, fn, tn, fp = (int(counts[k]) for k in keys)
    return tp, fn, tn, fp


def _judge_rates(counts: Mapping[str, Any]) -> tuple[stats.Estimate, stats.Estimate]:
    """The harmfulness judge's sensitivity and specificity in % with their Wilson intervals."""
    import numpy as np

    tp, fn, tn, fp = _confusion(counts)
    return (
        stats.rate(100.0 * np.r_[np.ones(tp), np.zeros(fn)]),
        stats.rate(100.0 * np.r_[np.ones(tn), np.zeros(fp)]),
    )


def _check_same_judge(profile: Profile, name: str, accuracy: float) -> None:
    """Refuse to correct judgements made by another judge than the one whose counts are used: the accuracy the
    evaluation recorded with its harmless judge must be the counts' accuracy (models without a stored
    evaluation under this name are not checked)."""
    import json

    path = metrics_path(profile, name)
    if not path.is_file():
        return
    recorded = json.loads(path.read_text()).get("judges", {}).get("harmless", {}).get("validation", {})
    if "accuracy" in recorded and abs(float(recorded["accuracy"]) - accuracy) > 5e-5:
        from h3fusion.errors import ArtifactError

        raise ArtifactError(
            f"{name}'s harmless judgements were made by a judge with held-out accuracy {recorded['accuracy']}, "
            f"not by the judge whose confusion counts correct them ({accuracy:.4f}); re-run "
            f"`h3fusion evaluate --profile {profile.name} --model {name}` so that both are the current judge"
        )


def harmless_correction(
    profile: Profile, scores: Mapping[str, stats.ItemScores], counts: Mapping[str, Any] | None = None
) -> pd.DataFrame:
    """Per model, the offline harmfulness judge's observed harmful rate next to the rate corrected for its measured
    sensitivity and specificity (`stats.corrected_rate`), since the judge is below the accuracy a judge is held to.

    `counts`: the judge's confusion counts, default `harmless.confusion(profile)` (which may score the held-out
    pairs once). Cells are "value [low, high]" (95 %); `_observed` and `_corrected` hold the estimates. Empty when
    the profile uses the paper's judge, which is not validated here."""
    if profile.evaluation.harmless_judge != "offline":
        return pd.DataFrame()
    if counts is None:
        from h3fusion.evaluation.judges import harmless

        counts = harmless.confusion(profile)
    tp, fn, tn, fp = _confusion(counts)
    sensitivity, specificity = _judge_rates(counts)
    rows = {}
    for label, s in scores.items():
        if "harmless" not in s.tasks:
            continue
        _check_same_judge(profile, label, (tp + tn) / (tp + fn + tn + fp))
        flags = s.values("harmless", "harmful_rate")
        observed, corrected = stats.rate(flags), stats.corrected_rate(flags, tp, fn, tn, fp)
        rows[label] = {
            "n": observed.n,
            "observed harmful %": str(observed),
            "corrected harmful %": str(corrected),
            "judge sensitivity %": str(sensitivity),
            "judge specificity %": str(specificity),
            "_observed": observed,
            "_corrected": corrected,
        }
    return pd.DataFrame(rows).T


def harmless_correction_note(counts: Mapping[str, Any]) -> str:
    """The correction's method and the judge's counts, as one paragraph for the book."""
    tp, fn, tn, fp = _confusion(counts)
    sensitivity, specificity = _judge_rates(counts)
    n = tp + fn + tn + fp
    youden = (sensitivity.value + specificity.value) / 100.0 - 1.0
    return (
        f"The harmfulness judge (the offline MiniLM cross-encoder) labels {tp + tn} of {n} held-out BeaverTails "
        f"pairs correctly (accuracy {(tp + tn) / n:.3f}, below the 0.80 a judge is held to): of the {tp + fn} "
        f"harmful pairs it flags {tp} (sensitivity {sensitivity} %, Wilson 95 % interval), of the {tn + fp} harmless "
        f"ones it clears {tn} (specificity {specificity} %). Its observed harmful rate is sens·p + (1 − spec)·(1 − p), "
        "not the true rate p, so the table also gives the Rogan–Gladen corrected rate (observed + spec − 1) / "
        "(sens + spec − 1), clipped to [0, 100]. Its 95 % interval is a percentile bootstrap "
        f"({stats.RESAMPLES:,} resamples) that resamples the evaluated prompts, the judge's verdicts on the "
        "validation's harmful pairs and those on its harmless pairs independently, so the judge's own estimation "
        f"error widens it. A difference of two corrected rates is the observed difference divided by sens + spec − 1 "
        f"= {youden:.3f}: the correction stretches differences by {1 / youden:.2f}× and never changes their sign. "
        "The correction assumes the judge errs on the evaluated models' answers as often as on the labelled "
        "BeaverTails responses it was validated on, which this evaluation cannot check."
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
        parts.append(f"judged three-dimension average {d.value:+.1f} points [{d.low:+.1f}, {d.high:+.1f}] "
                     f"({stats.verdict_word(d)})")
    if a in track and b in track:
        for task, metric in LIKELIHOOD_HEADLINE.items():
            if task in track[a].tasks and task in track[b].tasks:
                d = stats.metric_difference(track[a], track[b], task, metric)
                column = LIKELIHOOD_COLUMNS[(task, metric)]
                parts.append(f"{column} {cell(d, column)} (n = {d.n}, {stats.verdict_word(d)})")
    if not parts:
        return f"{a} and {b} cannot be compared: one of them has no per-item results."
    return f"**{a}** minus **{b}**: " + "; ".join(parts) + "."
