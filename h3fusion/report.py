"""What the book's baselines, embedding-drift and results chapters show, computed from `runs/<profile>/`.

The notebooks 03, 05 and 06 only call these functions and display what they return: which models the
book expects and which of them were evaluated, the main results table of point estimates, the judges'
validation figures, wall times from the manifests, and the hidden-embedding measurements of the paper's
Figure 4. The intervals, the headline comparisons and the verdicts are `h3fusion.evidence`'s.
Nothing here trains or evaluates: missing artifacts are listed, never silently filled in.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from h3fusion.artifacts import read_manifest
from h3fusion.baselines.registry import BASELINES
from h3fusion.config import Profile
from h3fusion.errors import H3FusionError
from h3fusion.evaluation.run import PHASE_TIMES
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
        "experts": list(profile.tasks),
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


def main_table(evaluated: Evaluated) -> pd.DataFrame:
    """`tables.results_table` of the evaluated models, with their group as the first column."""
    from h3fusion.evaluation.tables import results_table

    if not evaluated.metrics:
        raise H3FusionError(
            "no model of this profile has been evaluated yet; run `h3fusion evaluate --profile <name> --model base` "
            "(and the other models) first"
        )
    table = results_table(evaluated.metrics)
    table.insert(0, "group", group_column(evaluated).reindex(table.index))
    return table


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


def _eval_phases(folder: Path) -> dict[str, Any]:
    """The per-phase wall times an evaluation recorded in its manifest ({} when there is none)."""
    return (read_manifest(folder) or {}).get(PHASE_TIMES, {})


def _phase_seconds(phases: Mapping[str, Any], keys: Sequence[str]) -> float:
    """Seconds of these phases over every dimension; NaN when a reused phase's time was not recorded (an
    evaluation written before manifests carried the times of reused phases forward)."""
    values = [v.get(k) for v in phases.values() if isinstance(v, Mapping) for k in keys if k in v]
    if any(x is None for x in values) or _unrecorded(phases, keys):
        return math.nan
    return sum(float(x) for x in values)


def artifact_seconds(manifest: Mapping[str, Any]) -> float:
    """What building an artifact cost: its manifest's wall time, plus, for an evaluation (whose own wall time is only
    its last call's judging and writing), the loading, generation and likelihood phases it records, each as long as
    it took when first computed (also after a later call reused it); NaN where a reused phase's time was lost."""
    extra = _phase_seconds(manifest.get(PHASE_TIMES, {}), ("load_s", "generate_s", "mc_s", "likelihood_s"))
    return round(manifest.get("wall_time_s", math.nan) + extra, 2)


def _unrecorded(phases: Mapping[str, Any], keys: Sequence[str]) -> bool:
    """A reused generation or judgement recorded with 0 s: its real time was lost by an older resumed run."""
    flags = {"generate_s": "reused_generations", "judge_s": "reused_judgements"}
    return any(
        isinstance(v, Mapping) and v.get(flags.get(k, ""), False) and not v.get(k)
        for v in phases.values()
        for k in keys
    )


def wall_times(profile: Profile, names: Sequence[str]) -> pd.DataFrame:
    """Build and evaluation wall times (s) from the manifests of baselines/<name>/ (or fusion/<name>/ for a fused
    model: its training) and eval/<name>/."""
    rows = {}
    for name in names:
        build = (
            read_manifest(profile.run_dir / "baselines" / name)
            or read_manifest(profile.run_dir / "fusion" / name)
            or {}
        )
        ev = read_manifest(profile.run_dir / "eval" / name) or {}
        phases = _eval_phases(profile.run_dir / "eval" / name)
        rows[name] = {
            "build s": build.get("wall_time_s", math.nan),
            "model load s": phases.get("load_model", {}).get("load_s", math.nan) if phases else math.nan,
            "generation s": _phase_seconds(phases, ("generate_s",)) if phases else math.nan,
            "likelihood track s": _phase_seconds(phases, ("mc_s", "likelihood_s")) if phases else math.nan,
            "judging + writing s": ev.get("wall_time_s", math.nan),
        }
    return pd.DataFrame(rows).T


def short_labels(columns: Sequence[str]) -> dict[str, str]:
    """{column: column without its ` [judge]` suffix}, for figure panels (the table keeps the judges)."""
    return {c: str(c).split(" [", 1)[0] for c in columns}


def registry_table() -> pd.DataFrame:
    """The baselines' registry: name, kind, one-line description, reference."""
    return pd.DataFrame(
        [
            {"name": b.name, "kind": b.kind, "description": b.description, "reference": b.reference}
            for b in BASELINES.values()
        ]
    ).set_index("name")


# ---------------------------------------------------------------------------------------------- embeddings


def embedding_prompts(profile: Profile, samples: int, split: str = "eval") -> tuple[list[str], list[str]]:
    """About `samples` prompts split evenly over the tasks (fewer when a task has fewer), with their task.

    The paper embeds 100 samples; a small profile has fewer evaluation items and then uses them all.
    """
    from h3fusion.analysis import task_prompts

    if samples < 1:
        raise H3FusionError(f"samples must be at least 1, got {samples}")
    per_task = task_prompts(profile, split)
    n, k = len(profile.tasks), samples // len(profile.tasks)
    quota = {t: k + (1 if i < samples - k * n else 0) for i, t in enumerate(profile.tasks)}
    prompts, tasks = [], []
    for t in profile.tasks:
        chosen = per_task[t][: quota[t]]
        prompts += chosen
        tasks += [t] * len(chosen)
    return prompts, tasks


def embedding_models(profile: Profile) -> tuple[list[str], list[str]]:
    """(models to embed, expected ones that do not exist yet): base, experts, raw MoE, H3Fusion-MoE, no gate."""
    from h3fusion.evaluation.registry import known_models

    wanted = ["base", *profile.tasks, RAW_MOE, fused_variant(profile), fused_variant(profile, NO_GATE_WEIGHT)]
    wanted = list(dict.fromkeys(wanted))
    entries, present, missing = known_models(profile), [], []
    for name in wanted:
        try:
            entries[name].identity()  # raises when the artifact is missing or stale
            present.append(name)
        except (KeyError, H3FusionError):
            missing.append(name)
    return present, missing


def embed_models(
    profile: Profile, names: Sequence[str], prompts: Sequence[str], layer: int = -1
) -> dict[str, np.ndarray]:
    """{model: [prompts, hidden]} mean-pooled hidden states of `layer`, loading one model at a time."""
    import gc

    from h3fusion.analysis import hidden_embeddings
    from h3fusion.evaluation.registry import known_models

    entries, out = known_models(profile), {}
    for name in names:
        lm = entries[name].load()
        model, tok = getattr(lm, "model", None), getattr(lm, "tokenizer", None)
        if model is None or tok is None:
            raise H3FusionError(f"{name} is not a single Hugging Face model; hidden embeddings need one")
        out[name] = hidden_embeddings(
            model, tok, list(prompts), layer=layer, max_length=profile.data.max_length
        )
        del lm, model
        gc.collect()
    return out


def distance_table(embeddings: Mapping[str, np.ndarray], references: Sequence[str]) -> pd.DataFrame:
    """Mean L2 distance (same prompt, original hidden space) of every model to each reference model."""
    from h3fusion.analysis import distances_to

    cols = {f"to {r}": distances_to(embeddings[r], embeddings) for r in references if r in embeddings}
    return pd.DataFrame(cols).reindex(list(embeddings))


# ---------------------------------------------------------------------------------------------- reproducibility


def notebook_wall_times(profile: Profile, book_dir: Path | None = None) -> pd.DataFrame:
    """Wall time (s) per executed notebook, as `h3fusion run-notebooks` recorded it next to the notebooks
    (`.attrs["note"]`: the file's optional remark on how the times were taken)."""
    from h3fusion.notebooks import batch_output_dir, wall_times_path

    path = wall_times_path(book_dir or batch_output_dir(), profile.name)
    data = json.loads(path.read_text()) if path.is_file() else {}
    columns = ["notebook", "wall s", "finished", "commit"]
    rows = [
        {"notebook": name, "wall s": v.get("wall_s"), "finished": v.get("finished"),
         "commit": (v.get("commit") or "")[:10]}
        for name, v in data.get("notebooks", {}).items()
    ]
    table = pd.DataFrame(rows, columns=columns).set_index("notebook")
    table.attrs["note"] = data.get("note", "")  # how the times were taken, when the file says
    return table


def from_scratch_run(profile: Profile, book_dir: Path | None = None) -> dict[str, Any]:
    """The last batch of notebooks that started from an empty runs folder (its start, commit, wall time per
    notebook and total): the measured cost of the whole book; {} when none was recorded."""
    from h3fusion.notebooks import FROM_SCRATCH, batch_output_dir, wall_times_path

    path = wall_times_path(book_dir or batch_output_dir(), profile.name)
    return (json.loads(path.read_text()) if path.is_file() else {}).get(FROM_SCRATCH, {})


def artifact_table(profile: Profile) -> pd.DataFrame:
    """One row per artifact under runs/<profile>/ (every folder with a manifest): its stage, wall time, threads,
    config hash and commit, so each number in the book can be traced to the run that made it."""
    from h3fusion.artifacts import MANIFEST

    rows = []
    for path in sorted(profile.run_dir.rglob(MANIFEST)):
        m = read_manifest(path.parent) or {}
        artifact = path.parent.relative_to(profile.run_dir)
        rows.append(
            {
                "artifact": str(artifact),
                "stage": m.get("stage") or artifact.parts[0],
                "wall s": artifact_seconds(m),
                "torch threads": (m.get("hardware") or {}).get("torch_threads"),
                "config hash": m.get("config_hash", ""),
                "commit": (m.get("git_commit") or "")[:10],
                "finished": m.get("finished_at", ""),
            }
        )
    if not rows:
        return pd.DataFrame(columns=["stage", "wall s", "torch threads", "config hash", "commit", "finished"])
    return pd.DataFrame(rows).set_index("artifact")


def environment_table() -> pd.DataFrame:
    """This machine and the versions of the packages the results depend on."""
    from h3fusion.artifacts import hardware, package_versions

    info = {**hardware(), **{f"version: {k}": v for k, v in package_versions().items()}}
    for name in ("jupyter-book", "papermill", "sentence-transformers"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            info[f"version: {name}"] = metadata.version(name)
    return pd.DataFrame({"value": {k: str(v) for k, v in info.items()}}).rename_axis("item")


def _examples_seen(train: Any, examples: int) -> str:
    """Training examples a run sees: steps x batch x accumulation, or epochs x the examples (per expert)."""
    per_step = train.batch_size * train.grad_accum
    if train.max_steps is not None:
        seen = train.max_steps * per_step
        return f"{train.max_steps} steps x {per_step} = {seen} of {examples} ({min(seen, examples) / examples:.0%} at most once)"
    return f"{train.epochs:g} epochs x {examples} = {train.epochs * examples:,.0f}"


def settings_comparison(profile: Profile, paper: Profile) -> pd.DataFrame:
    """The settings that shape the results, side by side with the paper profile's (which follows the paper),
    read from the two profiles, with a mark where they differ."""
    def rows(p: Profile) -> dict[str, str]:
        e, f, ev, d = p.experts, p.fusion, p.evaluation, p.data
        caps = {t: ev.generation_for(t).max_new_tokens for t in p.tasks}
        sampling = "greedy" if ev.generation.temperature == 0 else f"sampled at temperature {ev.generation.temperature:g}"
        return {
            "base model": p.model.base,
            "training examples per expert": ", ".join(f"{t} {d.train_examples[t]}" for t in p.tasks),
            "examples an expert sees (helpful)": _examples_seen(e.train, d.train_examples["helpful"]),
            "max sequence length (tokens)": str(d.max_length),
            "expert LoRA r / alpha / dropout": f"{e.lora.r} / {e.lora.alpha:g} / {e.lora.dropout:g}",
            "expert learning rate": f"{e.train.lr:g}",
            "fusion examples seen": _examples_seen(f.train, sum(d.train_examples[t] for t in p.tasks)),
            "fusion learning rate": f"{f.train.lr:g}",
            "gating-loss weight lambda": f"{f.gate_weight:g}",
            "drift gammas": ", ".join(f"{t} {g:g}" for t, g in f.drift_gammas.items()),
            "router top-k": str(f.top_k),
            "new tokens per answer": ", ".join(f"{t} {c}" for t, c in caps.items()) + f" ({sampling})",
            "evaluation items (judged)": ", ".join(f"{t} {d.eval_examples[t]}" for t in p.tasks)
            + f" ({d.eval_sample})",
            "judges": f"{ev.helpful_judge} / {ev.harmless_judge} / {ev.honest_judge}",
            "DARE drop rate": f"{p.baselines.dare_drop_rate:g}",
        }

    mine, theirs = rows(profile), rows(paper)
    return pd.DataFrame(
        {
            f"{profile.name} profile": mine,
            "paper profile (the paper's settings)": theirs,
            "differs": {k: "yes" if mine[k] != theirs[k] else "" for k in mine},
        }
    )
