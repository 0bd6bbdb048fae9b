"""The helpful / harmless / honest judges (book chapter 0), chosen by `profile.evaluation.*_judge`.

`offline` judges are proxies built here and validated against real labels (GPT-4 verdicts, BeaverTails
labels, TruthfulQA references); their validation figures travel with every score. The paper's judges
(AlpacaEval/GPT-4, beaver-dam-7b, the TruthfulQA judge models) are options of the same interface for users
with an API key or a GPU and hub access. Offline judges are cached under runs/<profile>/judges/<dimension>/.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from h3fusion.config import Profile


@dataclass
class Judges:
    helpful: Any
    harmless: Any
    honest: Any
    refusal: Any = None
    """XSTest's refusal classifier (`refusal.load_offline`); None when the profile's XSTest track is off."""


def _helpful(profile: Profile) -> Any:
    from h3fusion.evaluation.judges import helpful

    if profile.evaluation.helpful_judge == "alpaca_eval":
        return helpful.AlpacaEvalJudge(profile)
    return helpful.load_offline(profile)


def _harmless(profile: Profile) -> Any:
    from h3fusion.evaluation.judges import harmless

    if profile.evaluation.harmless_judge == "beaver-dam-7b":
        return harmless.BeaverDamJudge(profile)
    return harmless.load_offline(profile)


def _honest(profile: Profile) -> Any:
    from h3fusion.evaluation.judges import honest

    if profile.evaluation.honest_judge == "truthfulqa-judges":
        return honest.TruthfulQAModelJudges(profile)
    return honest.load_offline(profile)


def load_judges(profile: Profile) -> Judges:
    """The three judges of the profile and the refusal classifier of its XSTest track; offline ones are trained
    once and then loaded from the cache."""
    from h3fusion.evaluation import overrefusal
    from h3fusion.evaluation.judges import refusal

    return Judges(
        helpful=_helpful(profile),
        harmless=_harmless(profile),
        honest=_honest(profile),
        refusal=refusal.load_offline(profile) if overrefusal.enabled(profile) else None,
    )


def validation_lines(judges: Judges) -> list[str]:
    lines = []
    for task in ("helpful", "harmless", "honest", "refusal"):
        judge = getattr(judges, task, None)
        if judge is None:
            continue
        lines.append(f"{task}: {judge.name}")
        for key, value in getattr(judge, "validation", {}).items():
            lines.append(f"  {key}: {value}")
        # shown here, but kept out of `validation`, which is part of the judge's identity in the metrics
        if getattr(judge, "train_wall_time_s", None) is not None:
            lines.append(f"  train_wall_time_s: {judge.train_wall_time_s}")
    return lines


def print_validation(profile: Profile) -> None:
    """`h3fusion judges --validate`: train or load the judges and print their held-out figures."""
    print("\n".join(validation_lines(load_judges(profile))))


__all__ = ["Judges", "load_judges", "print_validation", "validation_lines"]
