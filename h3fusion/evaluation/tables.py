"""Results tables of point estimates: one row per model, the three dimensions with their direction and judge,
and the formula of the paper's headline comparison (computed with intervals by `h3fusion.evidence`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pandas as pd

HELPFUL = "Helpful win rate % ↑"
HARMFUL = "Harmful % ↓"
TRUTHFUL = "Truthful % ↑"
INFORMATIVE = "Informative % ↑"
TRUTH_INFO = "Truthful×Inf % ↑"
MC1 = "MC1 % ↑"
MC2 = "MC2 % ↑"
AVERAGE = "Average % ↑"
"""(helpful win rate + (100 - harmful %) + truthful×informative %) / 3: the quantity the headline compares."""

AVERAGE_FORMULA = "avg(m) = [win_rate(m) + (100 - harmful%(m)) + truthful×informative%(m)] / 3"
IMPROVEMENT_FORMULA = (
    "improvement over group G = 100 * (avg(fused) - max_{g in G} avg(g)) / max_{g in G} avg(g)  "
    "[relative %; absolute points = avg(fused) - max_{g in G} avg(g)], with " + AVERAGE_FORMULA
)


def _judge_label(rows: Sequence[Mapping[str, Any]], task: str) -> str:
    names = list(dict.fromkeys(r.get("judges", {}).get(task, {}).get("name", "?") for r in rows))
    return " | ".join(names)


def average_score(win_rate: float, harmful_rate: float, truthful_x_informative: float) -> float:
    """The three-dimension average of the headline (harmlessness enters as 100 - harmful %)."""
    return (win_rate + (100.0 - harmful_rate) + truthful_x_informative) / 3.0


def results_table(metrics: Iterable[Mapping[str, Any]] | Mapping[str, Mapping[str, Any]]) -> pd.DataFrame:
    """Rows = models (in the given order), columns = the scores; judge names in the headers.

    `metrics` are `evaluate_model` outputs (a list, or a dict name -> metrics). A dimension a model was not
    evaluated on is NaN. When models were scored by different judges, the header lists every judge.
    """
    rows = list(metrics.values()) if isinstance(metrics, Mapping) else list(metrics)
    heads = {
        "helpful": f"{HELPFUL} [{_judge_label(rows, 'helpful')}]",
        "harmless": f"{HARMFUL} [{_judge_label(rows, 'harmless')}]",
        "honest": f"{TRUTH_INFO} [{_judge_label(rows, 'honest')}]",
    }
    nan = float("nan")
    records = []
    for m in rows:
        s = m.get("scores", {})
        hp, hm, ho = s.get("helpful", {}), s.get("harmless", {}), s.get("honest", {})
        rec = {
            heads["helpful"]: hp.get("win_rate", nan),
            heads["harmless"]: hm.get("harmful_rate", nan),
            heads["honest"]: ho.get("truthful_x_informative", nan),
            f"{TRUTHFUL} [{_judge_label(rows, 'honest')}]": ho.get("truthful", nan),
            f"{INFORMATIVE} [{_judge_label(rows, 'honest')}]": ho.get("informative", nan),
            # the likelihood track's MC (all its questions), the model's own log-likelihoods: no judge
            MC1: m.get("likelihood", {}).get("honest", {}).get("mc1", nan),
            MC2: m.get("likelihood", {}).get("honest", {}).get("mc2", nan),
        }
        rec[AVERAGE] = average_score(rec[heads["helpful"]], rec[heads["harmless"]], rec[heads["honest"]])
        records.append(rec)
    return pd.DataFrame(records, index=pd.Index([m["model"] for m in rows], name="model"))


def to_markdown(table: pd.DataFrame, floatfmt: str = ".1f") -> str:
    """A GitHub markdown table (NaN shown as a dash)."""
    return table.to_markdown(floatfmt=floatfmt, missingval="–")
