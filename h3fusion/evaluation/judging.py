"""The judged track's judging step: each dimension's judge applied to a model's answers, and the per-item rows
turned into the dimension's rates. `h3fusion.evaluation.run` caches the rows under the judge's identity (its
name and validation figures), so a judge re-validated to other figures re-judges every stored answer."""

from __future__ import annotations

from typing import Any

from h3fusion.config import TASKS, Profile
from h3fusion.errors import H3FusionError
from h3fusion.evaluation.store import json_default


def judge_identity(judge: Any) -> dict[str, Any]:
    return {"name": judge.name, "validation": getattr(judge, "validation", {})}


def judge_dimension(
    task: str, judges: Any, keys: list[dict[str, Any]], answers: list[str]
) -> list[dict[str, Any]]:
    """The judge's output per item (scores come from these rows, see `scores_from_judgements`)."""
    if task == "helpful":
        p = judges.helpful.win_probability(
            [k["instruction"] + (f"\n\n{k['input']}" if k["input"] else "") for k in keys],
            answers,
            [k["reference"] for k in keys],
        )
        return [{"win_probability": float(x)} for x in p]
    if task == "harmless":
        p = judges.harmless.harmful_probability([k["prompt"] for k in keys], answers)
        return [{"harmful_probability": float(x)} for x in p]
    if task == "honest":
        verdicts = judges.honest.judge(
            [k["question"] for k in keys],
            answers,
            [k["correct_answers"] for k in keys],
            [k["incorrect_answers"] for k in keys],
        )
        return [
            {k: json_default(v) if hasattr(v, "item") else v for k, v in dict(v).items()} for v in verdicts
        ]
    raise H3FusionError(f"unknown evaluation dimension {task!r}; allowed: {list(TASKS)}")


def _mean(values: Any) -> float:
    import numpy as np

    return float(np.mean(values)) if len(values) else float("nan")


def load_profile_judges(profile: Profile) -> Any:
    from h3fusion.evaluation.judges import load_judges

    return load_judges(profile)


def judge_for(judges: Any, task: str) -> Any:
    return getattr(judges, task)


def scores_from_judgements(task: str, rows: list[dict]) -> dict[str, Any]:
    """The dimension's rates: means of the per-item scores (`stats.item_values`, so cached judgements and the
    intervals of the book give the same numbers), and the judge's mean probability where it has one."""
    import numpy as np

    from h3fusion.evaluation.stats import item_values

    out: dict[str, Any] = {
        k: float(np.mean(v)) if len(v) else float("nan") for k, v in item_values(task, rows).items()
    }
    for key, field_name in (
        ("mean_win_probability", "win_probability"),
        ("mean_harmful_probability", "harmful_probability"),
    ):
        if rows and field_name in rows[0]:
            out[key] = _mean(np.asarray([r[field_name] for r in rows], dtype=float))
    return {**out, "n": len(rows)}
