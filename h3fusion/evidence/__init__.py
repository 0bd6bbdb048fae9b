"""The results chapter's numbers with their uncertainty, computed from the stored per-item results.

Every cell of the main table gets its n and a 95 % interval, every headline comparison an interval from a
paired bootstrap over items (`h3fusion.evaluation.stats`), and every verdict sentence is read from those
intervals ("better", "worse", "within noise at this sample size"), never from the sign of a point estimate.
The best member of a group is not picked first and then compared on the same items: the headline statistic
takes the group's maximum inside every bootstrap resample, and each member is also compared one by one with
Bonferroni-adjusted intervals.

A package, one concern per module: `columns` (the tables' labels and how an interval is written), `scores`
(per-item scores read back, interval tables), `verdicts` (headline comparisons, verdicts, power, summaries),
`judges` (the judges' notes, answers cut by the cap, the corrected harmfulness rate). The notebooks use it as
``from h3fusion import evidence``.
"""

from h3fusion.evidence.columns import (
    AVERAGE,
    COLUMNS,
    HEADLINE_COLUMNS,
    IMPROVEMENT_FORMULA,
    LIKELIHOOD_COLUMNS,
    LIKELIHOOD_HEADLINE,
    NATS,
    PART_COLUMNS,
    XSTEST_COLUMNS,
    cell,
    higher_is_better,
    interval_text,
)
from h3fusion.evidence.judges import (
    finished_share,
    harmless_correction,
    harmless_correction_note,
    judges_note,
    xstest_note,
)
from h3fusion.evidence.scores import (
    bar_frames,
    estimates,
    interval_table,
    item_scores,
    likelihood_scores,
    own_dimension,
    xstest_scores,
)
from h3fusion.evidence.verdicts import (
    findings,
    headline_comparisons,
    likelihood_headline,
    likelihood_power,
    likelihood_verdict,
    member_differences,
    pairwise_summary,
    power,
    power_note,
    verdict,
)

__all__ = [
    "AVERAGE",
    "COLUMNS",
    "HEADLINE_COLUMNS",
    "IMPROVEMENT_FORMULA",
    "LIKELIHOOD_COLUMNS",
    "LIKELIHOOD_HEADLINE",
    "NATS",
    "PART_COLUMNS",
    "XSTEST_COLUMNS",
    "bar_frames",
    "cell",
    "estimates",
    "findings",
    "finished_share",
    "harmless_correction",
    "harmless_correction_note",
    "headline_comparisons",
    "higher_is_better",
    "interval_table",
    "interval_text",
    "item_scores",
    "judges_note",
    "likelihood_headline",
    "likelihood_power",
    "likelihood_scores",
    "likelihood_verdict",
    "member_differences",
    "own_dimension",
    "pairwise_summary",
    "power",
    "power_note",
    "verdict",
    "xstest_note",
    "xstest_scores",
]
