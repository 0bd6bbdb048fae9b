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
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from h3fusion.artifacts import atomic_write_json, digest, is_complete, read_manifest
from h3fusion.config import Profile, profile_from_dict
from h3fusion.errors import H3FusionError

if TYPE_CHECKING:
    import pandas as pd
    import torch

SCORE_FORMAT = 2
"""Bump when the scores change meaning: every cached ablation result is then recomputed."""
NLL_BATCH = 8


class AblationError(H3FusionError):
    """An ablation that cannot run as configured."""


# ---------------------------------------------------------------------------------------------- profiles


def derived_profile(profile: Profile, overrides: Mapping[str, Any] | None = None) -> Profile:
    """The profile with dotted-key overrides applied (validated like a profile file)."""
    return profile_from_dict(
        profile.model_dump(mode="json"), dict(overrides or {}), origin=f"{profile.name} + overrides"
    )


def ablation_profile(profile: Profile, overrides: Mapping[str, Any] | None = None) -> Profile:
    """The profile of one short ablation run: `overrides`, and fusion training cut to `ablations.steps` steps."""
    short = {"fusion.train.max_steps": profile.ablations.steps, "fusion.train.epochs": None}
    return derived_profile(profile, {**short, **dict(overrides or {})})


def top_ks(profile: Profile) -> list[int]:
    """The k values of the top-k ablation (default 1 .. number of experts; the profile checks their range)."""
    return list(profile.ablations.top_ks or range(1, profile.num_experts + 1))


def gamma_overrides(profile: Profile, gammas: Mapping[str, float]) -> dict[str, Any]:
    """Override of `fusion.drift_gammas` that changes the named experts' gamma and keeps the others."""
    current = {t: profile.fusion.gamma(t) for t in profile.tasks}
    return {"fusion.drift_gammas": {**current, **dict(gammas)}}


# ---------------------------------------------------------------------------------------------- scoring data


@dataclass
class ScoringItems:
    """What every ablation run is scored on (the same items for every run)."""

    responses: dict[str, list[Any]]
    """{task: [TrainExample]} held-out (prompt, reference answer) pairs for the response NLL."""
    prompts: dict[str, list[str]]
    """{task: [formatted evaluation prompt]} for the routing statistics."""
    mc: list[Any]
    """TruthfulQA MCQuestions (empty when the profile has no honest task)."""


def _heldout_harmless(profile: Profile, n: int) -> list[Any]:
    """Safe BeaverTails responses of the training pool that the profile's training sample left out."""
    from h3fusion.data import load_train_examples
    from h3fusion.data.splits import harmless_train_all

    used = {(e.instruction, e.input, e.output) for e in load_train_examples(profile, "harmless")}
    pool, _ = harmless_train_all(profile)
    return [e for e in pool if (e.instruction, e.input, e.output) not in used][:n]


def heldout_responses(profile: Profile, task: str, n: int) -> list[Any]:
    """n held-out (prompt, reference answer) pairs of one task, as TrainExamples (see the module docstring)."""
    from h3fusion.data import TrainExample, load_eval_items

    if task == "harmless":
        out = _heldout_harmless(profile, n)
    else:
        items = load_eval_items(profile, task)[:n]
        if task == "helpful":
            out = [
                TrainExample(
                    task, it["instruction"], it.get("input", "") or "", it.get("reference") or it["output"]
                )
                for it in items
            ]
        else:
            out = [TrainExample(task, it["question"], "", it["best_answer"]) for it in items]
    if not out:
        raise AblationError(
            f"no held-out {task} responses to score: the profile's data leaves none out; lower "
            f"data.train_examples.{task} or data.eval_examples.{task} is 0"
        )
    return out


def scoring_items(profile: Profile) -> ScoringItems:
    from h3fusion.analysis import task_prompts
    from h3fusion.evaluation.run import dimension_inputs

    n = profile.ablations.score_examples
    responses = {t: heldout_responses(profile, t, n) for t in profile.tasks}
    prompts = task_prompts(profile, "eval", n)
    mc: list[Any] = []
    if "honest" in profile.tasks:
        from h3fusion.data import load_eval_items

        mc = dimension_inputs("honest", load_eval_items(profile, "honest")[:n]).mc
    return ScoringItems(responses, prompts, mc)


# ---------------------------------------------------------------------------------------------- scores


def response_nll(model: Any, tokenizer: Any, examples: Sequence[Any], max_length: int) -> float:
    """Mean NLL per response token (nats) of the examples, tokenised exactly as training tokenises them.

    Batches hold examples of similar length (less padding) and the vocabulary softmax is taken at response
    positions only."""
    import torch

    from h3fusion.data import IGNORE_INDEX, PadCollator, tokenize_example

    encoded = [e for e in (tokenize_example(tokenizer, ex, max_length) for ex in examples) if e is not None]
    if not encoded:
        raise AblationError("no example keeps a response token after truncation; raise data.max_length")
    encoded.sort(key=lambda e: len(e["input_ids"]))
    collate = PadCollator(tokenizer.pad_token_id)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(encoded), NLL_BATCH):
        batch = collate(encoded[start : start + NLL_BATCH])
        with torch.no_grad():
            logits = model(
                input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
            ).logits
        targets = batch["labels"][:, 1:].to(device)
        mask = targets != IGNORE_INDEX
        logp = torch.log_softmax(logits[:, :-1][mask].float(), dim=-1)  # [response tokens, vocab]
        total += float(-logp.gather(-1, targets[mask].unsqueeze(-1)).sum())
        count += int(mask.sum())
    return total / count


def score_model(
    profile: Profile, model: Any, tokenizer: Any, items: ScoringItems | None = None
) -> dict[str, Any]:
    """Likelihood scores and routing of one MoE model (an `MoECausalLM` or an exported Mixtral)."""
    import torch

    from h3fusion.analysis import routing_per_prompt
    from h3fusion.evaluation.lm import HFLanguageModel
    from h3fusion.evaluation.mc import aggregate_mc, mc_prompt, score_mc
    from h3fusion.routing import MASKS, heldout_routing, routing_table

    items = items or scoring_items(profile)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            nll = {
                t: response_nll(model, tokenizer, ex, profile.data.max_length)
                for t, ex in items.responses.items()
            }
            per_prompt = {
                t: routing_per_prompt(model, tokenizer, p, max_length=profile.data.max_length)
                for t, p in items.prompts.items()
            }
            heldout = heldout_routing(model, tokenizer, profile, profile.ablations.routing_examples)
        fmt = mc_prompt(profile.evaluation.mc_prompt)
        mc = (
            aggregate_mc(
                score_mc(
                    HFLanguageModel(model, tokenizer, progress=False), items.mc, fmt.template, fmt.separator
                )
            )
            if items.mc
            else {}
        )
    finally:
        model.train(was_training)
    table = routing_table({"model": heldout}, profile.tasks, references=False)["accuracy %"]
    return {
        "nll": nll,
        "mc1": 100.0 * mc["mc1"] if mc else float("nan"),
        "mc2": 100.0 * mc["mc2"] if mc else float("nan"),
        # a description of the evaluation prompts' routing (their source need not read like the training task)
        "routing": {t: pp.mean(axis=0).tolist() for t, pp in per_prompt.items()},
        # routing accuracy % on held-out items of the training sources: {tokens: {task or "all": %}}
        "routing_accuracy": {
            mask: {task: float(table[("model", mask, task)]) for task in (*profile.tasks, "all")}
            for mask in MASKS
        },
        "routing_items": {t: int(v["sequence"].shape[0]) for t, v in heldout.items()},
    }


# ---------------------------------------------------------------------------------------------- runs


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
    from h3fusion.fusion import LOSS_TERMS, build_raw, fusion_trainer
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
        "drift_gammas": {t: run_profile.fusion.gamma(t) for t in run_profile.tasks},
        "released_code": run_profile.fusion.released_code.model_dump(),
        "tasks": list(run_profile.tasks),
        "reused_from": str(exported) if exported else None,
        "loss_log": losses,
        # the last checkpoint is the trained model: its scores are not computed twice
        "scores": at_steps.get(str(run_profile.fusion.train.max_steps)) or score_model(run_profile, moe, tok, items),
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


# ---------------------------------------------------------------------------------------------- the ablations


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
    for task in profile.tasks:
        runs[f"gamma_{task} = {high:g}"] = run_ablation(
            profile, gamma_overrides(profile, {task: high}), label=f"gamma_{task}={high:g}"
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
            profile, gamma_overrides(profile, dict.fromkeys(profile.tasks, g)), label=f"gamma={g:g}"
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
    sequences only (no prompt term), with the template's header kept in its averages, and the other router
    init. Each run differs from the profile in one setting."""
    f = profile.fusion
    full = {"fusion.train.max_steps": f.train.max_steps, "fusion.train.epochs": None}
    header = ", header skipped" if f.gate_skip_template else ""
    runs = {
        f"profile (router lr {f.router_lr or f.train.lr:g}, {'+'.join(f.gate_averages)}{header}, init {f.router_init})": (
            run_ablation(profile, full, label="router: profile", checkpoints=router_checkpoints(profile))
        )
    }
    variants: list[tuple[str, dict[str, Any]]] = []
    if f.router_lr is not None:
        variants.append((f"router lr {f.train.lr:g} (one group, as the paper)", {"fusion.router_lr": None}))
    if "prompt" in f.gate_averages:
        variants.append(("gating loss on sequences only (no prompt term)", {"fusion.gate_averages": ["sequence"]}))
    if f.gate_skip_template:
        variants.append(("template header kept in the gating loss", {"fusion.gate_skip_template": False}))
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


# ---------------------------------------------------------------------------------------------- tables


ROUTING_MASKS = ("prompt after template", "sequence after template")
"""The routing accuracies the tables show: held-out items of the training sources, on the prompt and on the whole
sequence, both without the template's shared header (`h3fusion.routing` says why)."""
ROUTING_ALL = "routing (prompt) all % ↑"
ROUTING_SEQUENCE = "routing (sequence) all % ↑"


def score_row(scores: Mapping[str, Any]) -> dict[str, float]:
    """One table row of a run's scores: NLL per task, MC1/MC2, and the held-out routing accuracy per task on
    prompts, over all items on prompts and over all items on whole sequences (`ROUTING_MASKS`)."""
    row = {f"NLL {t} ↓": v for t, v in scores["nll"].items()}
    row.update({"MC1 % ↑": scores["mc1"], "MC2 % ↑": scores["mc2"]})
    prompt = scores["routing_accuracy"][ROUTING_MASKS[0]]
    row.update({f"routing (prompt) {t} % ↑": v for t, v in prompt.items() if t != "all"})
    row[ROUTING_ALL] = prompt["all"]
    row[ROUTING_SEQUENCE] = scores["routing_accuracy"][ROUTING_MASKS[1]]["all"]
    return row


def scores_table(runs: Mapping[Any, Mapping[str, Any]]) -> pd.DataFrame:
    """Rows = runs (their keys), columns = `score_row`."""
    import pandas as pd

    return pd.DataFrame(
        [score_row(r["scores"]) for r in runs.values()], index=pd.Index([str(k) for k in runs], name="run")
    )


def nested_scores_table(scores_by_key: Mapping[str, Mapping[str, Any]], index_name: str) -> pd.DataFrame:
    """Rows = keys of a {key: scores} dict (steps, k), columns = `score_row`."""
    import pandas as pd

    return pd.DataFrame(
        [score_row(s) for s in scores_by_key.values()], index=pd.Index(list(scores_by_key), name=index_name)
    )


def router_matrix(scores: Mapping[str, Any]) -> np.ndarray:
    """[tasks, experts] mean router probability (averaged over layers and prompts) of a run's scores."""
    from h3fusion.analysis import task_expert_matrix

    return task_expert_matrix({t: np.asarray(m) for t, m in scores["routing"].items()})


def router_weight_table(runs: Mapping[str, Mapping[str, Any]], expert_names: Sequence[str]) -> pd.DataFrame:
    """Rows (run, task of the prompts), columns = mean router weight of each expert."""
    import pandas as pd

    frames = []
    for name, run in runs.items():
        m = router_matrix(run["scores"])
        tasks = list(run["scores"]["routing"])
        idx = pd.MultiIndex.from_product([[name], [f"{t} prompts" for t in tasks]], names=["run", "prompts"])
        frames.append(pd.DataFrame(m, index=idx, columns=[f"{e} expert" for e in expert_names]))
    return pd.concat(frames)


def router_accuracy_table(runs: Mapping[str, Mapping[str, Any]]) -> pd.DataFrame:
    """Rows (run, tokens), one column per task and all: held-out routing accuracy "% [low, high]" (Wilson)."""
    import pandas as pd

    from h3fusion.routing import wilson

    records = {}
    for name, run in runs.items():
        scores = run["scores"]
        n = scores["routing_items"]
        for mask in ROUTING_MASKS:
            row = {}
            for task, value in scores["routing_accuracy"][mask].items():
                items = sum(n.values()) if task == "all" else n[task]
                low, high = wilson(round(value * items / 100), items)
                row[f"{task} (n={items})"] = f"{value:.1f} [{low:.1f}, {high:.1f}]"
            records[(name, mask)] = row
    return pd.DataFrame.from_dict(records, orient="index").rename_axis(["run", "tokens"])


def sensitivity(
    runs_by_value: Mapping[float, Mapping[str, Any]],
) -> tuple[list[float], dict[str, list[float]], dict[str, list[float]]]:
    """(x, {NLL per task}, {percent metrics}) of a sweep, for `plots.sensitivity_lines`."""
    x = [float(v) for v in runs_by_value]
    rows = [score_row(r["scores"]) for r in runs_by_value.values()]
    nll = {k: [row[k] for row in rows] for k in rows[0] if k.startswith("NLL")}
    pct = {k: [row[k] for row in rows] for k in ("MC1 % ↑", "MC2 % ↑", ROUTING_ALL)}
    return x, nll, pct


def loss_logs(runs: Mapping[str, Mapping[str, Any]]) -> dict[str, list[dict[str, float]]]:
    """{run: loss log} of the runs that logged any (for `plots.training_curves`)."""
    return {name: run["loss_log"] for name, run in runs.items() if run.get("loss_log")}


# ---------------------------------------------------------------------------------------------- released code


def label_audit(profile: Profile) -> pd.DataFrame:
    """Per task of origin: examples, the labels the released code gives them, and the share mislabelled."""
    import pandas as pd

    from h3fusion.data import build_mixed_dataset
    from h3fusion.data.dataset import released_code_labels
    from h3fusion.models import load_tokenizer

    mixed = build_mixed_dataset(
        derived_profile(profile, {"fusion.released_code.labels": False}), load_tokenizer(profile)
    )
    sources = list(mixed.sources)
    sizes = [sources.count(t) for t in profile.tasks]
    released = released_code_labels(sizes)
    rows = []
    for i, task in enumerate(profile.tasks):
        labels = [lab for src, lab in zip(sources, released, strict=True) if src == task]
        row: dict[str, Any] = {"examples": len(labels)}
        row.update({f"labelled {t}": labels.count(j) for j, t in enumerate(profile.tasks)})
        row["mislabelled %"] = 100.0 * sum(lab != i for lab in labels) / max(len(labels), 1)
        rows.append(row)
    frame = pd.DataFrame(rows, index=pd.Index(list(profile.tasks), name="task of origin"))
    frame.loc["all"] = frame.sum(numeric_only=True)
    frame.loc["all", "mislabelled %"] = (
        100.0
        * sum(lab != profile.tasks.index(src) for src, lab in zip(sources, released, strict=True))
        / max(len(sources), 1)
    )
    return frame


def _synthetic_routing(
    num_layers: int, num_experts: int, labels: torch.Tensor, mask: torch.Tensor, perfect: bool, margin: float
) -> list[torch.Tensor]:
    """Router logits [B*T, E] per layer: all tokens to their sequence's expert (logit `margin`), or uniform."""
    import torch

    b, t = mask.shape
    logits = torch.zeros(b, t, num_experts)
    if perfect:
        logits[torch.arange(b), :, labels] = margin
    return [logits.reshape(b * t, num_experts).clone().requires_grad_(True) for _ in range(num_layers)]


def _loss_and_grad(
    logits: list[torch.Tensor], mask: torch.Tensor, labels: torch.Tensor, released: bool
) -> tuple[float, float]:
    import torch

    from h3fusion.losses import gating_loss

    loss = gating_loss(logits, mask, labels, released_code=released)
    grads = torch.autograd.grad(loss, logits)
    return float(loss.detach()), float(torch.sqrt(sum((g**2).sum() for g in grads)))


def gating_loss_forms(profile: Profile, margin: float = 20.0) -> pd.DataFrame:
    """Both gating-loss forms at perfect routing, uniform routing and the raw MoE's random router.

    The batch is a real mixed batch of the profile (its padding included); `margin` is the logit that makes
    routing perfect (probability ~ 1). Gradient norms are taken with respect to the router logits.
    """
    import pandas as pd
    import torch

    from h3fusion.analysis import router_logits as model_router_logits
    from h3fusion.data import PadCollator, build_mixed_dataset
    from h3fusion.fusion import upcycle_profile

    moe, tok = upcycle_profile(profile, show_progress=False)
    mixed = build_mixed_dataset(derived_profile(profile, {"fusion.released_code.labels": False}), tok)
    per_task = profile.fusion.train.batch_size // profile.num_experts or 1
    picks = [i for t in profile.tasks for i in [j for j, s in enumerate(mixed.sources) if s == t][:per_task]]
    batch = PadCollator(tok.pad_token_id)([mixed[i] for i in picks])
    mask, labels = batch["attention_mask"], batch["task_labels"]
    with torch.no_grad():
        moe.eval()
        real = [
            lg.detach().float().reshape(-1, moe.num_experts)
            for lg in model_router_logits(moe, {"input_ids": batch["input_ids"], "attention_mask": mask})
        ]
    layers = len(real)
    settings = {
        "perfect routing": _synthetic_routing(layers, moe.num_experts, labels, mask, True, margin),
        "uniform routing": _synthetic_routing(layers, moe.num_experts, labels, mask, False, margin),
        "raw MoE (random router)": [lg.clone().requires_grad_(True) for lg in real],
    }
    rows = []
    for name, logits in settings.items():
        fixed = _loss_and_grad(logits, mask, labels, released=False)
        released = _loss_and_grad(logits, mask, labels, released=True)
        rows.append(
            {
                "routing": name,
                "corrected loss": fixed[0],
                "released loss": released[0],
                "corrected |grad|": fixed[1],
                "released |grad|": released[1],
            }
        )
    frame = pd.DataFrame(rows).set_index("routing")
    frame.attrs["padding %"] = 100.0 * float(1 - mask.float().mean())
    frame.attrs["sequences"] = int(mask.shape[0])
    return frame


def drift_forms(profile: Profile) -> pd.DataFrame:
    """Both drift forms at the start of fusion training: value and gradient norm on the fusion LoRA."""
    import pandas as pd
    import torch

    from h3fusion.fusion import prepare_for_training, upcycle_profile
    from h3fusion.losses import drift_loss

    moe, _ = upcycle_profile(profile, show_progress=False)
    prepare_for_training(moe, profile)
    gammas = [profile.fusion.gamma(t) for t in profile.tasks]
    params = [p for n, p in moe.named_parameters() if p.requires_grad and "router" not in n]
    rows = []
    for released in (False, True):
        loss = drift_loss(
            moe.drift_factors(),
            gammas,
            moe.fusion_lora_scale(),
            released_code=released,
            expert_sq_norms=moe.expert_sq_norms() if released else None,
        )
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        norm = (
            torch.sqrt(sum((g**2).sum() for g in grads if g is not None))
            if any(g is not None for g in grads)
            else torch.tensor(0.0)
        )
        rows.append(
            {
                "form": "released (weight-norm penalty)" if released else "corrected (drift from upcycled)",
                "value at init": loss.item(),
                "|grad| on fusion LoRA": float(norm),
            }
        )
    return pd.DataFrame(rows).set_index("form")
