"""One short fusion run, trained in memory and scored, cached under a hash of its config and of what it was
scored on; the raw MoE scored the same way. The studies in `h3fusion.ablations.studies` are made of these."""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from h3fusion.ablations.scoring import SCORE_FORMAT, ScoringItems, score_model, scoring_items
from h3fusion.artifacts import atomic_write_json, digest, is_complete, read_manifest
from h3fusion.config import Profile, derived_profile


def ablation_profile(profile: Profile, overrides: Mapping[str, Any] | None = None) -> Profile:
    """The profile of one short ablation run: `overrides`, and fusion training cut to `ablations.steps` steps."""
    short = {"fusion.train.max_steps": profile.ablations.steps, "fusion.train.epochs": None}
    return derived_profile(profile, {**short, **dict(overrides or {})})


def top_ks(profile: Profile) -> list[int]:
    """The k values of the top-k ablation (default 1 .. number of experts; the profile checks their range)."""
    return list(profile.ablations.top_ks or range(1, profile.num_experts + 1))


def gamma_overrides(profile: Profile, gammas: Mapping[str, float]) -> dict[str, Any]:
    """Override of `fusion.drift_gammas` that changes the named experts' gamma and keeps the others."""
    current = {e: profile.fusion.gamma(e) for e in profile.expert_names}
    return {"fusion.drift_gammas": {**current, **dict(gammas)}}


def ablations_dir(profile: Profile) -> Path:
    return profile.run_dir / "ablations"


def _run_key(run_profile: Profile, trained: bool) -> str:
    """Hash of the run's model config and of what it is scored on (not of the extra checkpoints or k values:
    a cached run that has them is reused by a request for fewer)."""
    from h3fusion.fusion import raw_hash, variant_hash

    model_hash = variant_hash(run_profile) if trained else raw_hash(run_profile)
    return digest(
        {
            "model": model_hash,
            "score_examples": run_profile.ablations.score_examples,
            "routing_examples": run_profile.ablations.routing_examples,
            "data": run_profile.data.model_dump(mode="json"),
            "format": SCORE_FORMAT,
        }
    )


def _cached(path: Path, checkpoints: Sequence[int], ks: Sequence[int]) -> dict[str, Any] | None:
    """The cached result at `path` when it holds every requested checkpoint and k."""
    if not path.is_file():
        return None
    result = json.loads(path.read_text())
    has_all = {str(s) for s in checkpoints} <= set(result["checkpoints"]) and {str(k) for k in ks} <= set(
        result["by_top_k"]
    )
    return result if has_all else None


def _cache_path(run_profile: Profile, name: str, key: str) -> Path:
    return ablations_dir(run_profile) / f"{name}-{key}.json"


def _scores_by_k(
    profile: Profile, moe: Any, tok: Any, items: ScoringItems, ks: Sequence[int], trained: dict[str, Any]
) -> dict[str, Any]:
    """Scores of the same trained model with k changed at inference (`set_top_k`, no retraining); `trained` are
    the scores at the k it was trained with."""
    trained_k = moe.top_k
    out = {}
    try:
        for k in ks:
            moe.set_top_k(k)
            out[str(k)] = trained if k == trained_k else score_model(profile, moe, tok, items)
    finally:
        moe.set_top_k(trained_k)
    return out


def _checkpoint_callback(
    profile: Profile, tok: Any, items: ScoringItems, steps: Sequence[int], out: dict
) -> Any:
    from transformers import TrainerCallback

    class ScoreAtSteps(TrainerCallback):
        """Scores the model in training at the given global steps (the number-of-steps ablation)."""

        def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
            if state.global_step in steps and str(state.global_step) not in out:
                out[str(state.global_step)] = score_model(profile, model, tok, items)

    return ScoreAtSteps()


def _train_in_memory(run_profile: Profile, callbacks: list[Any]) -> tuple[Any, Any, list[dict[str, float]]]:
    """A short fusion run exactly like `fusion.train_fusion` (same trainer, seed, data) but nothing saved."""
    from h3fusion.fusion import build_raw, fusion_trainer
    from h3fusion.fusion_objective import LOSS_TERMS
    from h3fusion.training import loss_log, training_arguments

    build_raw(run_profile, quiet=True)  # shared with chapter 02, and it checks the experts
    with tempfile.TemporaryDirectory(prefix="h3fusion-ablation-") as work:
        args = training_arguments(
            run_profile.fusion.train,
            run_profile.seed,
            Path(work),
            save_strategy="no",
            ddp_find_unused_parameters=run_profile.fusion.top_k < run_profile.num_experts,
        )
        trainer, moe, tok = fusion_trainer(run_profile, args, callbacks)
        trainer.train()
    moe.eval()
    return moe, tok, loss_log(trainer, ("loss", *LOSS_TERMS))


def _exported(run_profile: Profile) -> Path | None:
    """The folder of an exported fused model with exactly this run's config, if `h3fusion fuse` made one."""
    from h3fusion.fusion import fusion_dir, variant_hash

    folder = fusion_dir(run_profile)
    return folder if is_complete(folder, variant_hash(run_profile)) else None


def run_ablation(
    profile: Profile,
    overrides: Mapping[str, Any] | None = None,
    *,
    label: str | None = None,
    checkpoints: Sequence[int] = (),
    ks: Sequence[int] = (),
) -> dict[str, Any]:
    """One short fusion run with `overrides` (dotted profile keys), scored; cached in ``ablations/``.

    checkpoints: steps at which the model in training is scored as well; ks: k values applied to the trained
    model with `set_top_k` and scored. Returns a dict with the run's config, loss log and scores.
    """
    from h3fusion.models import load_tokenizer
    from h3fusion.moe import load_moe

    run_profile = ablation_profile(profile, overrides)
    path = _cache_path(
        run_profile,
        run_profile.fusion.variant + f"_s{run_profile.fusion.train.max_steps}",
        _run_key(run_profile, trained=True),
    )
    cached = _cached(path, checkpoints, ks)
    if cached is not None:
        return {**cached, "label": label or cached["label"]}
    if path.is_file():  # the same run without some checkpoints or k values: redo it with all of them
        old = json.loads(path.read_text())
        checkpoints = sorted({*checkpoints, *map(int, old["checkpoints"])})
        ks = sorted({*ks, *map(int, old["by_top_k"])})
    items = scoring_items(run_profile)
    start = time.perf_counter()
    exported = None if checkpoints else _exported(run_profile)
    at_steps: dict[str, Any] = {}
    if exported is not None:
        moe, tok = load_moe(exported), load_tokenizer(run_profile)
        losses = (read_manifest(exported) or {}).get("loss_log", [])
    else:
        callbacks = (
            [_checkpoint_callback(run_profile, load_tokenizer(run_profile), items, checkpoints, at_steps)]
            if checkpoints
            else []
        )
        moe, tok, losses = _train_in_memory(run_profile, callbacks)
    result = {
        "label": label or run_profile.fusion.variant,
        "overrides": dict(overrides or {}),
        "variant": run_profile.fusion.variant,
        "steps": run_profile.fusion.train.max_steps,
        "top_k": run_profile.fusion.top_k,
        "gate_weight": run_profile.fusion.gate_weight,
        "router_lr": run_profile.fusion.router_lr,
        "gate_averages": list(run_profile.fusion.gate_averages),
        "router_init": run_profile.fusion.router_init,
        "drift_gammas": {e: run_profile.fusion.gamma(e) for e in run_profile.expert_names},
        "released_code": run_profile.fusion.released_code.model_dump(),
        "tasks": list(run_profile.tasks),
        "reused_from": str(exported) if exported else None,
        "loss_log": losses,
        # the last checkpoint is the trained model: its scores are not computed twice
        "scores": at_steps.get(str(run_profile.fusion.train.max_steps))
        or score_model(run_profile, moe, tok, items),
        "checkpoints": at_steps,
    }
    result["by_top_k"] = _scores_by_k(run_profile, moe, tok, items, ks, result["scores"]) if ks else {}
    result["wall_s"] = round(time.perf_counter() - start, 1)
    ablations_dir(run_profile).mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, result)
    return result


def raw_run(profile: Profile) -> dict[str, Any]:
    """The raw (upcycled, untrained) MoE scored like the runs: the reference every ablation starts from."""
    from h3fusion.fusion import upcycle_profile

    run_profile = ablation_profile(profile)
    path = _cache_path(run_profile, "raw", _run_key(run_profile, trained=False))
    if path.is_file():
        return json.loads(path.read_text())
    start = time.perf_counter()
    moe, tok = upcycle_profile(run_profile, show_progress=False)
    result = {
        "label": "raw MoE (no fusion training)",
        "variant": "raw",
        "steps": 0,
        "top_k": moe.top_k,
        "tasks": list(run_profile.tasks),
        "loss_log": [],
        "checkpoints": {},
        "by_top_k": {},
        "scores": score_model(run_profile, moe, tok),
    }
    result["wall_s"] = round(time.perf_counter() - start, 1)
    ablations_dir(run_profile).mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, result)
    return result
