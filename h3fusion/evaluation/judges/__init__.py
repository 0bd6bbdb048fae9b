"""The judges of the dimensions (book chapter 0), one per dimension (`Dimension.load_judge`), chosen by
``judges.<dimension>.judge`` of the profile.

`offline` judges are proxies built here and validated against real labels (GPT-4 verdicts, BeaverTails
labels, TruthfulQA references); their validation figures travel with every score. The paper's judges
(AlpacaEval/GPT-4, beaver-dam-7b, the TruthfulQA judge models; `judges.paper`) are options of the same interface
for users with an API key or a GPU and hub access. Offline judges are cached under runs/<profile>/judges/<dimension>/.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from h3fusion.config import Profile


@dataclass
class Judges:
    """One judge per dimension (`by_dimension`; also readable as an attribute: ``judges.helpful``) and XSTest's
    refusal classifier (`refusal.load_offline`; None when the profile's XSTest track is off)."""

    by_dimension: dict[str, Any]
    refusal: Any = None

    def __getattr__(self, name: str) -> Any:
        by_dimension = self.__dict__.get("by_dimension", {})
        if name in by_dimension:
            return by_dimension[name]
        raise AttributeError(f"no judge for {name!r}; the judges are {list(by_dimension)}")


def load_judges(profile: Profile) -> Judges:
    """The judge of each of the profile's dimensions (`Dimension.load_judge`, chosen by the profile) and the
    refusal classifier of its XSTest track; offline ones are trained once and then loaded from the cache."""
    from h3fusion.dimensions import get_dimension
    from h3fusion.evaluation import overrefusal
    from h3fusion.evaluation.judges import refusal

    return Judges(
        {t: get_dimension(t).load_judge(profile) for t in profile.tasks},
        refusal=refusal.load_offline(profile) if overrefusal.enabled(profile) else None,
    )


def validation_lines(judges: Judges) -> list[str]:
    lines = []
    for task, judge in {**judges.by_dimension, "refusal": judges.refusal}.items():
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
