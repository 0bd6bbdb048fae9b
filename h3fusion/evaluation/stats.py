"""How sure the evaluation is: per-item scores, 95 % intervals, paired differences, headline comparisons, power.

Every rate of the tables is a mean of per-item scores (0 or 100 for a judged item, the MC2 probability in %),
read back from the per-item files an evaluation writes (`evaluation.run`). Intervals:

- one rate: Wilson's interval for a binary score (`scipy.stats.binomtest`), a percentile bootstrap otherwise;
- the three-dimension average, a difference between two models, the headline improvement over the best member
  of a group: a percentile bootstrap over items (`scipy.stats.bootstrap`, 2,000 resamples, seeded), items
  resampled within each dimension and *paired* across models (every model answered the same items), so the
  shared difficulty of an item cancels out of a difference. The headline statistic takes the maximum over the
  group inside every resample, so choosing the best member on the same items is part of its uncertainty.

A verdict is read from an interval, never from the sign of a point estimate (`verdict_word`).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import stats

from h3fusion.dimensions import DIMENSIONS, get_dimension
from h3fusion.errors import ArtifactError

CONFIDENCE = 0.95
RESAMPLES = 2000
SEED = 0
HEADLINE = {d.name: d.headline.key for d in DIMENSIONS.values()}
"""The metric of each dimension the three-dimension average is made of (a lower-is-better rate enters as 100 - rate)."""
HIGHER_IS_BETTER = {d.name: d.headline.higher_is_better for d in DIMENSIONS.values()}
"""Whether each dimension's headline metric is higher-is-better."""


def item_values(task: str, rows: Sequence[Mapping]) -> dict[str, np.ndarray]:
    """Per-item scores in % of one dimension's judgements (the rates are their means)."""
    return get_dimension(task).item_values(rows)


@dataclass(frozen=True)
class ItemScores:
    """One model's per-item scores: {task: (item ids, {metric: values in %})}."""

    model: str
    tasks: dict[str, tuple[list[str], dict[str, np.ndarray]]]

    def values(self, task: str, metric: str) -> np.ndarray:
        return self.tasks[task][1][metric]

    def ids(self, task: str) -> list[str]:
        return self.tasks[task][0]


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_item_scores(folder: Path, model: str) -> ItemScores:
    """Per-item scores of the judged track of the evaluation in `folder` (``eval/<model>/``)."""
    tasks: dict[str, tuple[list[str], dict[str, np.ndarray]]] = {}
    for path in sorted((folder / "judgements").glob("*.jsonl")):
        rows = _rows(path)
        tasks[path.stem] = ([str(r["item_id"]) for r in rows], item_values(path.stem, rows))
    if not tasks:
        raise ArtifactError(f"no per-item judgements in {folder}; re-run `h3fusion evaluate` for {model}")
    return ItemScores(model, tasks)


def read_likelihood_scores(folder: Path, model: str) -> ItemScores | None:
    """Per-item scores of the likelihood track in `folder` (``eval/<model>/likelihood/``), None when the model
    was not scored on it (`evaluation.likelihood.skip_models`)."""
    from h3fusion.evaluation import likelihood

    tasks = {}
    for path in sorted((folder / likelihood.FOLDER).glob("*.jsonl")):
        rows = _rows(path)
        tasks[path.stem] = ([str(r["item_id"]) for r in rows], likelihood.item_values(path.stem, rows))
    return ItemScores(model, tasks) if tasks else None


def read_xstest_scores(folder: Path, model: str) -> ItemScores | None:
    """Per-item scores of the XSTest track in `folder` (``eval/<model>/xstest.jsonl``; `overrefusal.item_values`),
    None when the model was evaluated without it."""
    from h3fusion.evaluation import overrefusal

    path = folder / overrefusal.FILE
    return ItemScores(model, overrefusal.item_values(_rows(path))) if path.is_file() else None


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its 95 % interval and the number of items behind it."""

    value: float
    low: float
    high: float
    n: int

    def __str__(self) -> str:
        return f"{self.value:.1f} [{self.low:.1f}, {self.high:.1f}]"


def _bootstrap(
    samples: Sequence[np.ndarray], statistic, confidence: float = CONFIDENCE
) -> tuple[float, float]:
    """Percentile interval of `statistic(*samples)`: the items of each sample (its last axis, shared by every
    model row of that sample) are resampled independently of the other samples.

    scipy resamples the item *indices* of each sample, and the statistic reads the matrices through them, so
    the models of one sample stay paired item by item."""

    def on_indices(*indices: np.ndarray) -> float:
        return float(statistic(*(s[..., i] for s, i in zip(samples, indices, strict=True))))

    with warnings.catch_warnings():  # an undefined statistic (a relative change from 0) gives a NaN interval
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        res = stats.bootstrap(
            tuple(np.arange(s.shape[-1]) for s in samples),
            on_indices,
            n_resamples=RESAMPLES,
            confidence_level=confidence,
            method="percentile",
            vectorized=False,
            paired=False,
            rng=np.random.default_rng(SEED),
        )
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def rate(values: np.ndarray) -> Estimate:
    """A rate in % with its interval: Wilson's for 0/100 scores, a percentile bootstrap for others (MC2)."""
    values = np.asarray(values, dtype=float)
    n = len(values)
    if n == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0)
    if np.isin(values, (0.0, 100.0)).all():
        ci = stats.binomtest(int((values == 100.0).sum()), n).proportion_ci(CONFIDENCE, method="wilson")
        return Estimate(float(values.mean()), 100.0 * ci.low, 100.0 * ci.high, n)
    low, high = _bootstrap([values], lambda v: v.mean())
    return Estimate(float(values.mean()), low, high, n)


def _average(*samples: np.ndarray) -> np.ndarray:
    """The dimensions' headline rates averaged (one sample per dimension of `HEADLINE`, in its order; a
    lower-is-better rate enters as 100 - rate), per row of the samples."""
    parts = [
        x.mean(axis=-1) if HIGHER_IS_BETTER[task] else 100.0 - x.mean(axis=-1)
        for task, x in zip(HEADLINE, samples, strict=True)
    ]
    return sum(parts) / len(parts)


def _headline_samples(models: Sequence[ItemScores]) -> list[np.ndarray]:
    """Per dimension, the models' headline metric as rows of one matrix (columns = the same items)."""
    samples = []
    for task, metric in HEADLINE.items():
        ids = models[0].ids(task)
        for m in models[1:]:
            if m.ids(task) != ids:
                raise ArtifactError(
                    f"{m.model} and {models[0].model} were evaluated on different {task} items; re-evaluate both "
                    "with the same profile so that they can be compared item by item"
                )
        samples.append(np.vstack([m.values(task, metric) for m in models]))
    return samples


def average_value(model: ItemScores) -> float:
    """The three-dimension average's point estimate (no interval)."""
    return float(_average(*_headline_samples([model]))[0])


def average(model: ItemScores) -> Estimate:
    """The three-dimension average (the headline's quantity) with a bootstrap interval over items."""
    samples = _headline_samples([model])
    value = float(_average(*samples)[0])
    low, high = _bootstrap(samples, lambda *x: _average(*x)[0])
    return Estimate(value, low, high, min(s.shape[-1] for s in samples))


def difference(a: ItemScores, b: ItemScores, confidence: float = CONFIDENCE) -> Estimate:
    """avg(a) - avg(b) in points, with a paired bootstrap interval over items."""
    samples = _headline_samples([a, b])

    def diff(*x: np.ndarray) -> float:
        avg = _average(*x)
        return float(avg[0] - avg[1])

    low, high = _bootstrap(samples, diff, confidence)
    return Estimate(diff(*samples), low, high, min(s.shape[-1] for s in samples))


def metric_difference(a: ItemScores, b: ItemScores, task: str, metric: str) -> Estimate:
    """mean(a) - mean(b) of one metric, in points, with a paired bootstrap interval over its items."""
    if a.ids(task) != b.ids(task):
        raise ArtifactError(
            f"{a.model} and {b.model} were evaluated on different {task} items; re-evaluate both"
        )
    d = a.values(task, metric) - b.values(task, metric)
    low, high = _bootstrap([d], lambda x: x.mean())
    return Estimate(float(d.mean()), low, high, len(d))


def metric_improvement_over_best(
    fused: ItemScores, group: Sequence[ItemScores], task: str, metric: str, higher_is_better: bool = True
) -> Estimate:
    """mean(fused) - max_g mean(g) of one metric (min_g for a lower-is-better one, then negated so that a
    positive value always favours the fused model), the extreme taken inside every paired bootstrap resample."""
    models = [fused, *group]
    for m in group:
        if m.ids(task) != fused.ids(task):
            raise ArtifactError(f"{m.model} and {fused.model} were scored on different {task} items; re-evaluate both")
    sign = 1.0 if higher_is_better else -1.0
    matrix = sign * np.vstack([m.values(task, metric) for m in models])

    def improvement(v: np.ndarray) -> float:
        means = v.mean(axis=-1)
        return float(means[0] - means[1:].max())

    low, high = _bootstrap([matrix], improvement)
    return Estimate(improvement(matrix), low, high, matrix.shape[-1])


def metric_mdd(
    pairs: Sequence[tuple[ItemScores, ItemScores]], task: str, metric: str, power: float = 0.8, alpha: float = 0.05
) -> dict[str, float]:
    """The smallest difference of one metric's mean that a paired comparison detects with probability `power`
    (two-sided level `alpha`), with the per-item variance of paired differences the median over `pairs`."""
    if not pairs:
        raise ArtifactError("no pair of scored models to estimate the variance of a difference from")
    variances = [float(np.var(a.values(task, metric) - b.values(task, metric), ddof=1)) for a, b in pairs]
    n = len(pairs[0][0].values(task, metric))
    se = float(np.sqrt(np.median(variances) / n))
    z = stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power)
    return {"mdd": float(z * se), "se": se, "n": n, "pairs": len(pairs)}


def improvement_over_best(fused: ItemScores, group: Sequence[ItemScores]) -> dict[str, Estimate]:
    """The paper's headline statistic against a group: avg(fused) - max_g avg(g), in points and relative %,
    the maximum taken inside every bootstrap resample (the best member is chosen on the same items)."""
    samples = _headline_samples([fused, *group])

    def improvement(*x: np.ndarray) -> np.ndarray:
        avg = _average(*x)
        best = avg[1:].max()
        return np.array([avg[0] - best, 100.0 * (avg[0] - best) / best if best else np.nan])

    point = improvement(*samples)
    n = min(s.shape[-1] for s in samples)
    points = _bootstrap(samples, lambda *x: improvement(*x)[0])
    relative = _bootstrap(samples, lambda *x: improvement(*x)[1])
    return {
        "points": Estimate(float(point[0]), *points, n),
        "relative_pct": Estimate(float(point[1]), *relative, n),
    }


def verdict_word(estimate: Estimate) -> str:
    """'better' / 'worse' when the interval excludes zero, else 'within noise at this sample size'."""
    if estimate.low > 0:
        return "better"
    if estimate.high < 0:
        return "worse"
    return "within noise at this sample size"


def minimal_detectable_difference(
    pairs: Sequence[tuple[ItemScores, ItemScores]], power: float = 0.8, alpha: float = 0.05
) -> dict[str, float]:
    """The smallest difference of the three-dimension average (points) that a paired comparison of two models
    detects with probability `power` at two-sided level `alpha`, at the sizes of these evaluations.

    Normal approximation: MDD = (z_{1-alpha/2} + z_power) * sqrt(sum_d var_d / n_d) / 3, with var_d the
    variance of the per-item paired differences in dimension d, the median over the given model pairs.
    """
    variances: dict[str, list[float]] = {t: [] for t in HEADLINE}
    sizes = {}
    for a, b in pairs:
        for task, metric in HEADLINE.items():
            d = a.values(task, metric) - b.values(task, metric)
            variances[task].append(float(np.var(d, ddof=1)))
            sizes[task] = len(d)
    if not pairs:
        raise ArtifactError("no pair of evaluated models to estimate the variance of a difference from")
    var = {t: float(np.median(v)) for t, v in variances.items()}
    se = float(np.sqrt(sum(var[t] / sizes[t] for t in HEADLINE))) / 3.0
    z = stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power)
    return {
        "mdd_points": float(z * se),
        "se_points": se,
        **{f"n_{t}": sizes[t] for t in HEADLINE},
        **{f"sd_{t}": float(np.sqrt(var[t])) for t in HEADLINE},
        "pairs": len(pairs),
    }


def _validation_samples(tp: int, fn: int, tn: int, fp: int) -> tuple[np.ndarray, np.ndarray]:
    """The judge's verdicts (1 = flagged harmful) on the validation positives and on its negatives; refuses a
    judge no better than chance (sensitivity + specificity <= 1), for which no correction exists."""
    counts = {"tp": tp, "fn": fn, "tn": tn, "fp": fp}
    if any(int(v) != v or v < 0 for v in counts.values()):
        raise ArtifactError(f"confusion counts must be non-negative integers, got {counts}")
    if tp + fn < 2 or tn + fp < 2:
        raise ArtifactError(
            f"correcting a judge's rate needs at least 2 validation positives and 2 negatives, got {counts}"
        )
    sens, spec = tp / (tp + fn), tn / (tn + fp)
    if sens + spec <= 1:
        raise ArtifactError(
            f"the judge's sensitivity {sens:.3f} + specificity {spec:.3f} <= 1: it is no better than chance on "
            "its validation pairs, so its rates cannot be corrected for its errors (Rogan-Gladen is undefined)"
        )
    positives = np.r_[np.ones(int(tp)), np.zeros(int(fn))]
    negatives = np.r_[np.ones(int(fp)), np.zeros(int(tn))]
    return positives, negatives


def _flags(values: np.ndarray) -> np.ndarray:
    """Per-item harmful flags as 0/1 from 0/1 or 0/100 scores (`item_values`' harmful_rate)."""
    values = np.asarray(values, dtype=float)
    if not np.isin(values, (0.0, 1.0, 100.0)).all():
        raise ArtifactError("a corrected rate needs binary per-item flags (0/1 or 0/100)")
    return (values > 0).astype(float)


def _rogan_gladen(observed: float, positives: np.ndarray, negatives: np.ndarray) -> float:
    """(observed + specificity - 1) / (sensitivity + specificity - 1), unclipped; NaN where a resample's judge is
    no better than chance."""
    youden = positives.mean() + (1.0 - negatives.mean()) - 1.0
    if youden <= 0:
        return float("nan")
    return float((observed - negatives.mean()) / youden)


def corrected_rate(flags: np.ndarray, tp: int, fn: int, tn: int, fp: int) -> Estimate:
    """The true harmful rate in % estimated from a judge's flags and its validation confusion counts.

    An imperfect judge's observed rate is sens * p + (1 - spec) * (1 - p); Rogan-Gladen inverts it, clipped to
    [0, 100]. The interval is a percentile bootstrap that resamples the evaluated items, the validation
    positives and the validation negatives independently, so the judge's own estimation error is in it."""
    flags = _flags(flags)
    positives, negatives = _validation_samples(tp, fn, tn, fp)

    def corrected(f: np.ndarray, pos: np.ndarray, neg: np.ndarray) -> float:
        return float(100.0 * np.clip(_rogan_gladen(f.mean(), pos, neg), 0.0, 1.0))

    low, high = _bootstrap([flags, positives, negatives], corrected)
    return Estimate(corrected(flags, positives, negatives), low, high, len(flags))


def corrected_difference(
    flags_a: np.ndarray, flags_b: np.ndarray, tp: int, fn: int, tn: int, fp: int
) -> Estimate:
    """corrected rate(a) - corrected rate(b) in points for two models judged on the same items: the observed
    difference divided by sensitivity + specificity - 1 (not clipped: it is linear in the observed difference).

    The items are resampled paired across the two models, the validation samples independently."""
    a, b = _flags(flags_a), _flags(flags_b)
    if a.shape != b.shape:
        raise ArtifactError(f"a paired difference needs the same items, got {len(a)} and {len(b)} flags")
    positives, negatives = _validation_samples(tp, fn, tn, fp)

    def diff(f: np.ndarray, pos: np.ndarray, neg: np.ndarray) -> float:
        return float(100.0 * (_rogan_gladen(f[0].mean(), pos, neg) - _rogan_gladen(f[1].mean(), pos, neg)))

    samples = [np.vstack([a, b]), positives, negatives]
    low, high = _bootstrap(samples, diff)
    return Estimate(diff(*samples), low, high, len(a))
