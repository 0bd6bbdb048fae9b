"""Per-item scores read back from the stored evaluations, and the interval tables built from them."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import pandas as pd

from h3fusion.config import Profile
from h3fusion.evaluation import stats
from h3fusion.evaluation.store import metrics_path
from h3fusion.evidence.columns import (
    AVERAGE,
    COLUMNS,
    LIKELIHOOD_COLUMNS,
    LIKELIHOOD_HEADLINE,
    NATS,
    cell,
    interval_text,
)
from h3fusion.report import Evaluated


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
    profile: Profile,
    models: Evaluated | Mapping[str, str],
    read: Callable[[Path, str], stats.ItemScores | None],
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


def bar_frames(long: pd.DataFrame, columns: list[str]) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(values, lows, highs) of `estimates` for `plots.results_bars`: models as rows, `columns` as columns."""
    frame = long[long["column"].isin(columns)]
    order = list(dict.fromkeys(frame["model"]))
    return tuple(
        frame.pivot(index="model", columns="column", values=k).reindex(index=order, columns=columns)
        for k in ("value", "low", "high")
    )


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
            interval_text(v, lo, hi, 2 if c in NATS else 1)
            for v, lo, hi, c in frame[["value", "low", "high", "column"]].itertuples(index=False)
        ]
    )
    table = cells.pivot(index="model", columns="column", values="cell").reindex(
        index=list(dict.fromkeys(frame["model"])), columns=[c for c in columns if c in set(frame["column"])]
    )
    sizes = frame.groupby("column")["n"].agg(lambda n: "/".join(str(x) for x in sorted(set(n))))
    table.columns = [f"{c} (n={sizes[c]})" for c in table.columns]
    return table.rename(index=dict(labels or {}))
