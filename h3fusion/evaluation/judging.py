"""The judged track's judging step: each dimension's judge applied to a model's answers, and the per-item rows
turned into the dimension's rates. `h3fusion.evaluation.run` caches the rows under the judge's identity (its
name and validation figures), so a judge re-validated to other figures re-judges every stored answer."""

from __future__ import annotations

from typing import Any

from h3fusion.config import Profile
from h3fusion.dimensions import Judge, get_dimension


def judge_identity(judge: Judge) -> dict[str, Any]:
    return {"name": judge.name, "validation": getattr(judge, "validation", {})}


def judge_dimension(
    task: str, judges: Any, keys: list[dict[str, Any]], answers: list[str]
) -> list[dict[str, Any]]:
    """The judge's output per item (scores come from these rows, see `scores_from_judgements`)."""
    return get_dimension(task).judge(judge_for(judges, task), keys, answers)


def _mean(values: Any) -> float:
    import numpy as np

    return float(np.mean(values)) if len(values) else float("nan")


def load_profile_judges(profile: Profile) -> Any:
    from h3fusion.evaluation.judges import load_judges

    return load_judges(profile)


def judge_for(judges: Any, task: str) -> Any:
    """The judge of one dimension from `Judges` (or any object with one attribute per dimension)."""
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
