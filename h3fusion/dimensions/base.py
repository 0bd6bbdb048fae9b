"""`Metric`, `Dimension` and the registry the dimension modules add themselves to."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from h3fusion.errors import H3FusionError
from h3fusion.sections import JudgeSettings


@dataclass(frozen=True)
class Metric:
    """One per-item metric of a dimension: its key in the stored rows, its column label (with the arrow of its
    direction) and whether higher is better; `nats`: a log-likelihood in nats per token (else a rate in %)."""

    key: str
    label: str
    higher_is_better: bool = True
    nats: bool = False


@dataclass(frozen=True)
class SourceReport:
    """What `h3fusion data` says about one dimension's source: a summary line, how the profile's data deviates
    from the paper's, the paper's evaluation set (`paper_takes_first`: the paper used the file's first items, so
    a stratified sample deviates even at the paper's size), its first evaluation item and a note on the training
    data, if any."""

    summary: str
    deviations: list[str]
    paper_eval: str
    paper_n: int
    first_eval: tuple[str, str, str] | None
    paper_takes_first: bool = False
    train_note: str | None = None


@runtime_checkable
class Judge(Protocol):
    """What every judge is to the rest of the package: a name and its validation figures, which travel with every
    score it gives (`evaluation.judging.judge_identity`). How a judge is called on answers is its dimension's
    `judge` function, so judges of different shapes (a pairwise preference, a moderation classifier, truth and
    information verdicts) need no common scoring method."""

    name: str
    validation: Mapping[str, Any]


@dataclass(frozen=True)
class Dimension:
    """One alignment dimension (see the package docstring). `item_values(rows)` gives the judged metrics per item
    in % from the judge's rows; `judge(judge, keys, answers)` calls the dimension's judge on the answers, one row
    per item (`keys`: each item's reference fields from `evaluation.inputs`)."""

    name: str
    judged: tuple[Metric, ...]
    likelihood: tuple[Metric, ...]
    likelihood_headline: str
    prompt_field: str
    strata: str
    item_values: Callable[[Sequence[Mapping[str, Any]]], dict[str, np.ndarray]]
    judge: Callable[[Judge, list[dict[str, Any]], list[str]], list[dict[str, Any]]]
    inputs: Callable[[Sequence[Any]], Any]
    """`inputs(items)`: the prompts a model answers and the fields kept for the judge (`evaluation.inputs`)."""
    likelihood_inputs: Callable[[Any, Any], Any]
    """`likelihood_inputs(profile, tokenizer)`: the texts the judge-free likelihood track scores
    (`evaluation.likelihood.LikelihoodInputs`)."""
    likelihood_rows: Callable[[Any, Any, str], list[dict[str, Any]]]
    """`likelihood_rows(lm, inputs, mc_format)`: one row per item holding its `likelihood` metrics."""
    train_pool: Callable[[Any], list[Any]]
    """`train_pool(profile)`: every training example of the dimension's source (`data.TrainExample`)."""
    eval_pool: Callable[[Any], list[dict[str, Any]]]
    """`eval_pool(profile)`: every evaluation item, in file order, each with its `stratum`."""
    load_judge: Callable[[Any], Judge]
    """`load_judge(profile)`: the judge the profile chooses for this dimension (``judges.<name>.judge``)."""
    source_report: Callable[[Any], SourceReport]
    """`source_report(profile)`: what `h3fusion data` prints about the source (`data.report`)."""
    reference_responses: Callable[[Any, int], list[Any]]
    """`reference_responses(profile, n)`: n held-out (prompt, reference answer) `TrainExample`s whose NLL the
    ablations score."""
    judge_settings: type[JudgeSettings] = JudgeSettings
    """Its section of the profile's `judges` (``judges.<name>``): which judge and that judge's settings, read by
    `load_judge`."""

    @property
    def headline(self) -> Metric:
        """The judged metric the three-dimension average uses (a lower-is-better rate enters as 100 - rate)."""
        return self.judged[0]


DIMENSIONS: dict[str, Dimension] = {}
"""Every registered dimension by name, in registration order (the book's order)."""


def register(dimension: Dimension) -> Dimension:
    if dimension.name in DIMENSIONS:
        raise H3FusionError(f"a dimension named {dimension.name!r} is already registered")
    if dimension.likelihood_headline not in {m.key for m in dimension.likelihood}:
        raise H3FusionError(
            f"dimension {dimension.name!r}: its likelihood headline {dimension.likelihood_headline!r} is not one of "
            f"its likelihood metrics {[m.key for m in dimension.likelihood]}"
        )
    DIMENSIONS[dimension.name] = dimension
    return dimension


def get_dimension(name: str) -> Dimension:
    try:
        return DIMENSIONS[name]
    except KeyError:
        raise H3FusionError(
            f"unknown evaluation dimension {name!r}; registered: {list(DIMENSIONS)}"
        ) from None
