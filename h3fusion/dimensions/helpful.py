"""Helpfulness (Alpaca for training, AlpacaEval for evaluation): the judge's probability that the answer beats
the reference answer; on the likelihood track, the mean per-token log-likelihood of the reference answer."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from h3fusion.dimensions.base import Dimension, Metric


def item_values(rows: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    p = np.asarray([r["win_probability"] for r in rows], dtype=float)
    return {"win_rate": 100.0 * (p > 0.5)}


def judge(judge: Any, keys: list[dict[str, Any]], answers: list[str]) -> list[dict[str, Any]]:
    p = judge.win_probability(
        [k["instruction"] + (f"\n\n{k['input']}" if k["input"] else "") for k in keys],
        answers,
        [k["reference"] for k in keys],
    )
    return [{"win_probability": float(x)} for x in p]


def inputs(items: Sequence[Any]) -> Any:
    """The Alpaca prompt of each AlpacaEval instruction, and its reference answer for the judge."""
    from h3fusion.evaluation.inputs import DimensionInputs, alpaca_prompt, item_field

    keys = [
        {
            "item_id": item_field(it, "id"),
            "instruction": item_field(it, "instruction"),
            "input": item_field(it, "input", "") or "",
            "reference": item_field(it, "reference", None) or item_field(it, "output"),
        }
        for it in items
    ]
    return DimensionInputs([alpaca_prompt(k["instruction"], k["input"]) for k in keys], keys)


HELPFUL = Dimension(
    name="helpful",
    judged=(Metric("win_rate", "Helpful: win % ↑"),),
    likelihood=(Metric("ref_logprob", "Helpful: reference log-lik ↑", nats=True),),
    likelihood_headline="ref_logprob",
    prompt_field="instruction",
    strata="AlpacaEval subset",
    item_values=item_values,
    judge=judge,
    inputs=inputs,
)
