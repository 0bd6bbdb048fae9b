"""What the book's baselines and results chapters show, computed from `runs/<profile>/`.

The notebooks 03 and 06 only call these functions and display what they return: which models the book
expects and which of them were evaluated, the main results table of point estimates, the judges' validation
figures and the baselines' registry. The intervals, the headline comparisons and the verdicts are
`h3fusion.evidence`'s; wall times are `h3fusion.reproducibility`'s, embeddings `h3fusion.embeddings`'.
Nothing here trains or evaluates: missing artifacts are listed, never silently filled in.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from h3fusion.baselines.registry import BASELINES
from h3fusion.config import Profile
from h3fusion.evaluation.store import metrics_path

# The paper's headline claims: H3Fusion-MoE's improvement of the three-dimension average over the best
# individually aligned expert, the best ensemble and the best merge. Source: Tekin et al., "H3Fusion:
# Helpful, Harmless, Honest Fusion of Aligned LLMs", arXiv 2411.17792, abstract ("outperforms each
# individually aligned model by 11.37 %, ... state-of-the-art LLM ensemble approaches by 13.77 % and model
# merging approaches by 6.18 %").
PAPER_IMPROVEMENT_PCT: dict[str, float] = {"experts": 11.37, "ensembles": 13.77, "merges": 6.18}
DATA_MIX_GROUP = "data-mix LoRA"
"""The group of the baseline the paper lacks: one LoRA trained on the mixed data with the pipeline's budget."""
HEADLINE_GROUPS: tuple[str, ...] = (*PAPER_IMPROVEMENT_PCT, DATA_MIX_GROUP)
"""The groups H3Fusion-MoE is compared with in the headline: the paper's three, then the data-mix LoRA (no claim)."""

PAPER_COL = "paper's claim (relative %)"
RAW_MOE = "raw-moe"
NO_GATE_WEIGHT = 0.0
"""The gating-loss weight lambda of the 'without gating loss' variant."""


# ---------------------------------------------------------------------------------------------- models


def fused_variant(profile: Profile, gate_weight: float | None = None) -> str:
    """Folder name of the fused variant of this profile (optionally with another gating-loss weight)."""
    if gate_weight is None:
        return profile.fusion.variant
    return profile.fusion.model_copy(update={"gate_weight": gate_weight}).variant


def model_groups(profile: Profile) -> dict[str, list[str]]:
    """The models the book reports, grouped and in table order (whether or not they exist yet).

    fused: the raw (upcycled, untrained) MoE, the training-free MoE (hidden-state router), the profile's H3Fusion-MoE,
    the variant without gating loss, the released-code-faithful model, then any other trained variant found under
    fusion/ (ablations), so every evaluated one gets a row.
    """
    from h3fusion.fusion import TRAINING_FREE_MOE, trained_variants
    from h3fusion.released_model import released_code_variant

    main, no_gate = fused_variant(profile), fused_variant(profile, NO_GATE_WEIGHT)
    named = [RAW_MOE, TRAINING_FREE_MOE, main, no_gate, released_code_variant(profile)]
    fused = list(dict.fromkeys([*named, *(v for v, _ in trained_variants(profile))]))
    by_kind: dict[str, list[str]] = {"merge": [], "ensemble": [], "data-mix": [], "instruct": []}
    for name, b in BASELINES.items():
        by_kind[b.kind].append(name)
    return {
        "base": ["base"],
        "experts": profile.expert_names,
        "fused": fused,
        "merges": by_kind["merge"],
        "ensembles": by_kind["ensemble"],
        DATA_MIX_GROUP: by_kind["data-mix"],
        "instruct": by_kind["instruct"],
    }


def display_names(profile: Profile) -> dict[str, str]:
    """Readable row labels for the fused models (the folder name stays visible in brackets)."""
    from h3fusion.released_model import released_code_variant

    main, no_gate = fused_variant(profile), fused_variant(profile, NO_GATE_WEIGHT)
    released = released_code_variant(profile)
    return {
        RAW_MOE: "raw MoE (upcycled, untrained router)",
        "training-free-moe": "training-free MoE (upcycled, hidden-state router, no training)",
        main: f"H3Fusion-MoE [{main}]",
        no_gate: f"H3Fusion-MoE without gating loss [{no_gate}]",
        released: f"released-code-faithful MoE (its reproducible bugs on) [{released}]",
    }


@dataclass
class Evaluated:
    """The stored evaluations of a profile: metrics of the models found, and the expected ones missing."""

    metrics: dict[str, dict[str, Any]]
    missing: list[str]
    groups: dict[str, list[str]] = field(default_factory=dict)

    def present(self, group: str) -> list[str]:
        return [m for m in self.groups.get(group, []) if m in self.metrics]


def collect_metrics(profile: Profile, optional: Sequence[str] = ()) -> Evaluated:
    """Read every `eval/<model>/metrics.json` of the profile, in table order.

    Expected models without one are listed in `missing` (except those in `optional`, e.g. fused
    ablation variants that a profile may not train); evaluated models outside the expected groups
    (renamed or extra runs) are appended under the group `other`.
    """
    groups = model_groups(profile)
    optional = set(optional) | set(groups["fused"][3:])
    metrics, missing = {}, []
    for names in groups.values():
        for name in names:
            path = metrics_path(profile, name)
            if path.is_file():
                metrics[name] = json.loads(path.read_text())
            elif name not in optional:
                missing.append(name)
    eval_root = profile.run_dir / "eval"
    extra = sorted(p.parent.name for p in eval_root.glob("*/metrics.json")) if eval_root.is_dir() else []
    groups["other"] = [n for n in extra if n not in metrics]
    for name in groups["other"]:
        metrics[name] = json.loads(metrics_path(profile, name).read_text())
    return Evaluated(metrics, missing, groups)


def group_column(evaluated: Evaluated) -> pd.Series:
    """{model: group} for the evaluated models, to show next to the table."""
    kinds = {m: g for g, names in evaluated.groups.items() for m in names}
    return pd.Series({m: kinds.get(m, "other") for m in evaluated.metrics}, name="group")


# ---------------------------------------------------------------------------------------------- judges, times


def judge_validation(evaluated: Evaluated) -> pd.DataFrame:
    """The judges that scored the stored evaluations and their validation figures, one row per figure.

    Index (dimension, judge, figure), one column `value`. The figures are those recorded in each metrics.json
    when it was scored, so the table shows exactly the judges behind the numbers (a dimension lists several
    judges if models were scored by different ones); `models scored` counts the evaluations per judge.
    """
    figures: dict[tuple[str, str], dict[str, Any]] = {}
    for m in evaluated.metrics.values():
        for task, judge in m.get("judges", {}).items():
            row = figures.setdefault((task, judge.get("name", "?")), {"models scored": 0})
            row["models scored"] += 1
            for k, v in _flatten(judge.get("validation", {})).items():
                row.setdefault(k, v)
    records = [(task, name, k, v) for (task, name), row in figures.items() for k, v in row.items()]
    if not records:
        return pd.DataFrame()
    frame = pd.DataFrame(records, columns=["dimension", "judge", "figure", "value"])
    return frame.set_index(["dimension", "judge", "figure"])


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{key}."))
        elif isinstance(v, (int, float, str, bool)) or v is None:
            out[key] = v
    return out


def registry_table() -> pd.DataFrame:
    """The baselines' registry: name, kind, one-line description, reference."""
    return pd.DataFrame(
        [
            {"name": b.name, "kind": b.kind, "description": b.description, "reference": b.reference}
            for b in BASELINES.values()
        ]
    ).set_index("name")
