"""What each dimension's evaluation generates from and what its judge compares against: the prompts in the
Alpaca template and the references kept beside every generation (and TruthfulQA's multiple-choice targets)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from h3fusion.config import Profile
from h3fusion.dimensions import get_dimension
from h3fusion.evaluation.mc import MCQuestion


def item_field(item: Any, key: str, default: Any = None) -> Any:
    """A field of an evaluation item, whether a mapping (a JSON row) or an object."""
    if isinstance(item, Mapping):
        return item.get(key, default)
    return getattr(item, key, default)


@dataclass
class DimensionInputs:
    """What one dimension generates from and what its judge compares against."""

    prompts: list[str]
    keys: list[dict[str, Any]]
    """Per item, the fields kept beside its generation (instruction, reference, question, ...)."""
    mc: list[MCQuestion] = field(default_factory=list)


def dimension_inputs(task: str, items: Sequence[Any]) -> DimensionInputs:
    """Prompts (Alpaca template) and the judge's references for one dimension's evaluation items (the
    dimension's own `Dimension.inputs`)."""
    return get_dimension(task).inputs(items)


def mc_question(item: Any, key: dict[str, Any]) -> MCQuestion:
    """A TruthfulQA item's multiple-choice question: its MC1/MC2 targets, or one built from its answer lists."""
    mc1, mc2 = item_field(item, "mc1_targets"), item_field(item, "mc2_targets")
    if mc1 and mc2:
        return MCQuestion.from_targets(key["question"], dict(mc1), dict(mc2))
    return MCQuestion.from_generation_item(
        key["question"], key["best_answer"], key["correct_answers"], key["incorrect_answers"]
    )


def profile_inputs(profile: Profile) -> dict[str, DimensionInputs]:
    """{dimension: its inputs} for the profile's evaluation sample: what `evaluate_model` generates from (and what
    a baseline that reuses the experts' answers must find them generated from)."""
    from h3fusion.data import load_eval_items

    return {t: dimension_inputs(t, list(load_eval_items(profile, t))) for t in profile.tasks}
