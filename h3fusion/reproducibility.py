"""What the book's reproducibility page shows (and the baselines chapter's wall times), from the manifests and
the notebook runner's records: what each artifact cost to build, each notebook's wall time and the last run from an
empty runs folder, the machine and package versions, and this profile's settings against the paper's."""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd

from h3fusion.artifacts import read_manifest
from h3fusion.config import Profile
from h3fusion.evaluation.run import PHASE_TIMES


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


def notebook_wall_times(profile: Profile, book_dir: Path | None = None) -> pd.DataFrame:
    """Wall time (s) per executed notebook, as `h3fusion run-notebooks` recorded it next to the notebooks
    (`.attrs["note"]`: the file's optional remark on how the times were taken)."""
    from h3fusion.notebooks import batch_output_dir, wall_times_path

    path = wall_times_path(book_dir or batch_output_dir(), profile.name)
    data = json.loads(path.read_text()) if path.is_file() else {}
    columns = ["notebook", "wall s", "finished", "commit"]
    rows = [
        {
            "notebook": name,
            "wall s": v.get("wall_s"),
            "finished": v.get("finished"),
            "commit": (v.get("commit") or "")[:10],
        }
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

    first = profile.tasks[0]  # one expert's budget, the same dimension's in both profiles

    def rows(p: Profile) -> dict[str, str]:
        e, f, ev, d = p.experts, p.fusion, p.evaluation, p.data
        caps = {t: ev.generation_for(t).max_new_tokens for t in p.tasks}
        sampling = (
            "greedy"
            if ev.generation.temperature == 0
            else f"sampled at temperature {ev.generation.temperature:g}"
        )
        return {
            "base model": p.model.base,
            "training examples per expert": ", ".join(f"{t} {d.train_examples[t]}" for t in p.tasks),
            f"examples an expert sees ({first})": _examples_seen(e.train, d.train_examples[first]),
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
            "judges": " / ".join(p.judges.of(t).judge for t in p.tasks),
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
