"""Ablations of H3Fusion-MoE (book chapter 04) and the released code's switches (chapter 07).

The cpu budget allows no generation-based evaluation of a dozen fused variants, so every ablation here is a
*short* fusion run (`ablations.steps` steps, in memory, nothing exported) from the same raw MoE, scored with
cheap likelihood metrics on `ablations.score_examples` held-out items per task:

- ``nll``: mean negative log-likelihood per response token of held-out reference answers (helpful: the
  AlpacaEval reference, harmless: safe BeaverTails responses not used in training, honest: TruthfulQA's best
  answer of the evaluation questions); lower means the model is closer to that expert's target behaviour;
- ``mc1``/``mc2``: TruthfulQA multiple choice from the model's own log-likelihoods on those questions;
- ``routing``: mean router probability per layer and expert on each task's evaluation prompts, and the
  routing accuracy (share of prompts whose top layer-averaged expert is their task's expert).

A run's result is cached as JSON in ``runs/<profile>/ablations/`` under a hash of its fusion config (the
same hash `fusion.variant_hash` gives an exported variant) and of what was scored. When a run has the same
config as a fused model already exported by `h3fusion fuse` (same steps included), that model is loaded
and scored instead of being retrained.

The package, one concern per module: `scoring` (what a run is scored on), `runs` (one run, cached), `studies`
(the ablations the book shows), `tables` (their tables), `released_code` (chapter 7's direct measurements). The
names below are its public API; the notebooks use them as ``from h3fusion import ablations as A``.
"""

from h3fusion.ablations.released_code import drift_forms, gating_loss_forms, label_audit
from h3fusion.ablations.runs import (
    ablation_profile,
    ablations_dir,
    gamma_overrides,
    raw_run,
    run_ablation,
    top_ks,
)
from h3fusion.ablations.scoring import (
    SCORE_FORMAT,
    ScoringItems,
    heldout_responses,
    response_nll,
    score_model,
    scoring_items,
)
from h3fusion.ablations.studies import (
    drift_per_expert,
    drift_sweep,
    gate_ablation,
    gate_weight_sweep,
    reference_run,
    released_code_ablation,
    router_ablation,
    router_checkpoints,
)
from h3fusion.ablations.tables import (
    ROUTING_ALL,
    ROUTING_MASKS,
    ROUTING_SEQUENCE,
    loss_logs,
    nested_scores_table,
    router_accuracy_table,
    router_matrix,
    router_weight_table,
    score_row,
    scores_table,
    sensitivity,
)
from h3fusion.config import derived_profile
from h3fusion.errors import AblationError

__all__ = [
    "ROUTING_ALL",
    "ROUTING_MASKS",
    "ROUTING_SEQUENCE",
    "SCORE_FORMAT",
    "AblationError",
    "ScoringItems",
    "ablation_profile",
    "ablations_dir",
    "derived_profile",
    "drift_forms",
    "drift_per_expert",
    "drift_sweep",
    "gamma_overrides",
    "gate_ablation",
    "gate_weight_sweep",
    "gating_loss_forms",
    "heldout_responses",
    "label_audit",
    "loss_logs",
    "nested_scores_table",
    "raw_run",
    "reference_run",
    "released_code_ablation",
    "response_nll",
    "router_ablation",
    "router_accuracy_table",
    "router_checkpoints",
    "router_matrix",
    "router_weight_table",
    "run_ablation",
    "score_model",
    "score_row",
    "scores_table",
    "scoring_items",
    "sensitivity",
    "top_ks",
]
