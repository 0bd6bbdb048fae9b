"""Baselines of the book's chapter 3: model merges (averaging, task arithmetic, TIES, DARE on full deltas), token- and
output-level ensembles of the experts, one LoRA trained on the mixed data with the pipeline's step budget
(`data_mix`), and H3Fusion-Instruct. `run_baselines(profile, only)` builds and evaluates them (`h3fusion baselines`); importing this package registers them with the evaluation runner."""

from __future__ import annotations

from h3fusion.baselines.registry import (
    BASELINES,
    Baseline,
    UnknownBaselineError,
    baseline_names,
    get_baseline,
)
from h3fusion.baselines.runner import (
    baseline_dir,
    build_baseline,
    load_baseline,
    model_entries,
    run_baselines,
)
from h3fusion.evaluation.registry import register_models

register_models(model_entries)

__all__ = [
    "BASELINES",
    "Baseline",
    "UnknownBaselineError",
    "baseline_dir",
    "baseline_names",
    "build_baseline",
    "get_baseline",
    "load_baseline",
    "model_entries",
    "run_baselines",
]
