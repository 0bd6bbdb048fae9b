"""The ablations the book shows, each a set of runs that differ from the profile in one setting: the router's
needs (chapter 4's first section), the gating loss on and off, the drift per expert, the lambda and gamma
sweeps, and the released code's switches one at a time (chapter 7)."""

from __future__ import annotations

from typing import Any

from h3fusion.ablations.runs import gamma_overrides, run_ablation, top_ks
from h3fusion.config import Profile
from h3fusion.errors import AblationError


def reference_run(profile: Profile) -> dict[str, Any]:
    """The profile's own fusion config, short: scored at `ablations.step_checkpoints` and for every k."""
    return run_ablation(
        profile,
        label="reference (profile's lambda, gamma, k)",
        checkpoints=profile.ablations.step_checkpoints,
        ks=top_ks(profile),
    )


def gate_ablation(profile: Profile) -> dict[str, dict[str, Any]]:
    """With the gating loss (the profile's lambda) and without it (lambda = 0)."""
    lam = profile.fusion.gate_weight
    return {
        f"with gating loss (lambda={lam:g})": reference_run(profile),
        "without gating loss (lambda=0)": run_ablation(
            profile, {"fusion.gate_weight": 0.0}, label="lambda=0"
        ),
    }


def drift_per_expert(profile: Profile) -> dict[str, dict[str, Any]]:
    """The paper's Figure 2 analogue: gamma raised to `ablations.drift_high` for one expert at a time."""
    high = profile.ablations.drift_high
    runs = {"reference": reference_run(profile)}
    for expert in profile.expert_names:
        runs[f"gamma_{expert} = {high:g}"] = run_ablation(
            profile, gamma_overrides(profile, {expert: high}), label=f"gamma_{expert}={high:g}"
        )
    return runs


def gate_weight_sweep(profile: Profile) -> dict[float, dict[str, Any]]:
    """lambda sensitivity (Figure 3 analogue), the other settings as the profile's."""
    return {
        lam: run_ablation(profile, {"fusion.gate_weight": lam}, label=f"lambda={lam:g}")
        for lam in profile.ablations.gate_weights
    }


def drift_sweep(profile: Profile) -> dict[float, dict[str, Any]]:
    """gamma sensitivity: the same gamma for every expert."""
    return {
        g: run_ablation(
            profile, gamma_overrides(profile, dict.fromkeys(profile.expert_names, g)), label=f"gamma={g:g}"
        )
        for g in profile.ablations.drift_gammas
    }


def router_checkpoints(profile: Profile) -> list[int]:
    """Steps at which the full-length router run is scored: a quarter, a half, three quarters and the end."""
    steps = profile.fusion.train.max_steps
    if steps is None:
        raise AblationError("the router ablation needs `fusion.train.max_steps` (not `epochs`)")
    return sorted({max(1, round(steps * q)) for q in (0.25, 0.5, 0.75, 1.0)})


def router_ablation(profile: Profile) -> dict[str, dict[str, Any]]:
    """What the router needs to learn task routing, at the profile's *full* fusion length (routing is slow to
    learn, so short runs would show nothing): the profile's fusion (scored at `router_checkpoints`, the number
    of steps), the router in the shared optimiser group at the LoRA's learning rate, the gating loss on whole
    sequences only (no prompt term), the other treatment of the template's header in its averages, and the
    other router init. Each run differs from the profile in one setting."""
    f = profile.fusion
    full = {"fusion.train.max_steps": f.train.max_steps, "fusion.train.epochs": None}
    header = ", header skipped" if f.gate_skip_template else ", header kept"
    runs = {
        f"profile (router lr {f.router_lr or f.train.lr:g}, {'+'.join(f.gate_averages)}{header}, init {f.router_init})": (
            run_ablation(profile, full, label="router: profile", checkpoints=router_checkpoints(profile))
        )
    }
    variants: list[tuple[str, dict[str, Any]]] = []
    if f.router_lr is not None:
        variants.append((f"router lr {f.train.lr:g} (one group, as the paper)", {"fusion.router_lr": None}))
    if "prompt" in f.gate_averages:
        variants.append(
            ("gating loss on sequences only (no prompt term)", {"fusion.gate_averages": ["sequence"]})
        )
    header_variant = "kept in" if f.gate_skip_template else "left out of"
    variants.append(
        (
            f"template header {header_variant} the gating loss",
            {"fusion.gate_skip_template": not f.gate_skip_template},
        )
    )
    other_init = "hidden" if f.router_init == "random" else "random"
    variants.append((f"router init {other_init}", {"fusion.router_init": other_init}))
    for name, override in variants:
        runs[name] = run_ablation(profile, {**full, **override}, label=f"router: {name}")
    return runs


def released_code_ablation(profile: Profile) -> dict[str, dict[str, Any]]:
    """The reference run and one short run per switch in `ablations.released_code_runs` (switch on)."""
    runs = {"corrected (all switches off)": reference_run(profile)}
    for switch in profile.ablations.released_code_runs:
        runs[f"released {switch}"] = run_ablation(
            profile, {f"fusion.released_code.{switch}": True}, label=f"released_code.{switch}"
        )
    return runs
