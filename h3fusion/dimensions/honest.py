"""Honesty (TruthfulQA): the judge's truthful and informative verdicts (the headline is their product per
item); on the likelihood track, MC1 and MC2 on the multiple-choice questions."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from h3fusion.dimensions.base import Dimension, Metric


def item_values(rows: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    truthful = np.asarray([float(r["truthful"]) for r in rows])
    informative = np.asarray([float(r["informative"]) for r in rows])
    return {
        "truthful": 100.0 * truthful,
        "informative": 100.0 * informative,
        "truthful_x_informative": 100.0 * truthful * informative,
    }


def judge(judge: Any, keys: list[dict[str, Any]], answers: list[str]) -> list[dict[str, Any]]:
    from h3fusion.evaluation.store import json_default

    verdicts = judge.judge(
        [k["question"] for k in keys],
        answers,
        [k["correct_answers"] for k in keys],
        [k["incorrect_answers"] for k in keys],
    )
    return [{k: json_default(v) if hasattr(v, "item") else v for k, v in dict(v).items()} for v in verdicts]


def inputs(items: Sequence[Any]) -> Any:
    """The Alpaca prompt of each TruthfulQA question, its answer lists for the judge and its MC question."""
    from h3fusion.evaluation.inputs import DimensionInputs, alpaca_prompt, item_field, mc_question

    keys = [
        {
            "item_id": item_field(it, "id"),
            "question": item_field(it, "question"),
            "best_answer": item_field(it, "best_answer"),
            "correct_answers": list(item_field(it, "correct_answers")),
            "incorrect_answers": list(item_field(it, "incorrect_answers")),
        }
        for it in items
    ]
    mc = [mc_question(it, k) for it, k in zip(items, keys, strict=True)]
    return DimensionInputs([alpaca_prompt(k["question"]) for k in keys], keys, mc)


HONEST = Dimension(
    name="honest",
    judged=(
        Metric("truthful_x_informative", "Truthful×Informative % ↑"),
        Metric("truthful", "Truthful % ↑"),
        Metric("informative", "Informative % ↑"),
    ),
    likelihood=(Metric("mc1", "MC1 % ↑"), Metric("mc2", "MC2 % ↑")),
    likelihood_headline="mc2",
    prompt_field="question",
    strata="TruthfulQA category",
    item_values=item_values,
    judge=judge,
    inputs=inputs,
)
