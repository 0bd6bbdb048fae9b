"""What each dimension's evaluation generates from and what its judge compares against: the prompts in the
Alpaca template and the references kept beside every generation (and TruthfulQA's multiple-choice targets)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from h3fusion.config import TASKS, Profile
from h3fusion.errors import H3FusionError
from h3fusion.evaluation.mc import MCQuestion


def _get(item: Any, key: str, default: Any = None) -> Any:
    if isinstance(item, Mapping):
        return item.get(key, default)
    return getattr(item, key, default)


def _format_prompt(instruction: str, input_text: str = "") -> str:
    from h3fusion.data import format_prompt

    return format_prompt(instruction, input_text)


@dataclass
class DimensionInputs:
    """What one dimension generates from and what its judge compares against."""

    prompts: list[str]
    keys: list[dict[str, Any]]
    """Per item, the fields kept beside its generation (instruction, reference, question, ...)."""
    mc: list[MCQuestion] = field(default_factory=list)


def dimension_inputs(task: str, items: Sequence[Any]) -> DimensionInputs:
    """Prompts (Alpaca template) and the judge's references for one dimension's evaluation items."""
    if task == "helpful":
        keys = [
            {
                "item_id": _get(it, "id"),
                "instruction": _get(it, "instruction"),
                "input": _get(it, "input", "") or "",
                "reference": _get(it, "reference", None) or _get(it, "output"),
            }
            for it in items
        ]
        return DimensionInputs([_format_prompt(k["instruction"], k["input"]) for k in keys], keys)
    if task == "harmless":
        keys = [{"item_id": _get(it, "id"), "prompt": _get(it, "prompt")} for it in items]
        return DimensionInputs([_format_prompt(k["prompt"]) for k in keys], keys)
    if task == "honest":
        keys = [
            {
                "item_id": _get(it, "id"),
                "question": _get(it, "question"),
                "best_answer": _get(it, "best_answer"),
                "correct_answers": list(_get(it, "correct_answers")),
                "incorrect_answers": list(_get(it, "incorrect_answers")),
            }
            for it in items
        ]
        mc = [_mc_question(it, k) for it, k in zip(items, keys, strict=True)]
        return DimensionInputs([_format_prompt(k["question"]) for k in keys], keys, mc)
    raise H3FusionError(f"unknown evaluation dimension {task!r}; allowed: {list(TASKS)}")


def _mc_question(item: Any, key: dict[str, Any]) -> MCQuestion:
    mc1, mc2 = _get(item, "mc1_targets"), _get(item, "mc2_targets")
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
