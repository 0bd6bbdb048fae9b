"""Build, load and evaluate the baselines: `runs/<profile>/baselines/<name>/`, one folder per baseline.

Merges are dense Hugging Face folders (base + merged delta, with the tokenizer), and so is the data-mix LoRA
(`data_mix`: trained on the fusion's mixed data, its adapter merged). Ensembles and the zero-shot
H3Fusion-Instruct hold only `baseline.json` (what they combine and how; the experts are loaded from their
adapter folders at evaluation time). The LoRA fuser's folder holds its adapter (`fuser/`) and its training
examples. Every folder is written atomically with a manifest (config hash, wall time) and is skipped when it
is complete with the same hash; the hash covers the baseline's own parameters and the experts' manifests, so a
re-trained expert rebuilds every baseline.

Cost: the builders of one `run_baselines` call share one expert bank (base + every adapter, `shared.SharedExperts`) and the
evaluations one set of judges; each loaded baseline has its own bank (one model's weights). What the ensembles
would otherwise compute again comes from the language-model-level caches, keyed by content: the experts'
per-token log-probabilities (`evaluation.logprob_cache`, which the token ensembles mix) and their answers
(`evaluation.generation_cache`, which ensemble-select and H3Fusion-Instruct start from), whichever stage computed
them first. No module-level state is shared between calls.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from h3fusion.artifacts import Stopwatch, atomic_dir, atomic_write_json, digest, is_complete, make_manifest
from h3fusion.baselines.answers import expert_identities
from h3fusion.baselines.data_mix import build_data_mix, data_mix_params
from h3fusion.baselines.registry import BASELINES, baseline_names, get_baseline
from h3fusion.baselines.shared import SharedExperts
from h3fusion.config import Profile, shown_path
from h3fusion.errors import ArtifactError

if TYPE_CHECKING:
    from h3fusion.evaluation.lm import LanguageModel
    from h3fusion.evaluation.registry import ModelEntry

BASELINE_FORMAT = 1
"""Bump when a baseline's construction changes: every baseline is then rebuilt."""
CONFIG_FILE = "baseline.json"
FUSER_ADAPTER = "fuser"
DENSE_KINDS = ("merge", "data-mix")
"""The kinds stored as a dense Hugging Face folder (loaded like any model folder)."""


def baseline_dir(profile: Profile, name: str) -> Path:
    return profile.run_dir / "baselines" / name


def _rebuild(profile: Profile, name: str) -> str:
    return f"run `h3fusion baselines --profile {profile.name} --only {name}`"


def _baseline_identity(profile: Profile, name: str) -> str:
    from h3fusion.evaluation.registry import manifest_identity

    return manifest_identity(baseline_dir(profile, name), f"the baseline {name}", _rebuild(profile, name))


SELECTION_RULE = "likelihood-consensus"
"""ensemble-select's rule (`select.likelihood_selector`): judge-free, so the judges that score the evaluation
never choose the answers they score."""


def baseline_params(profile: Profile, name: str) -> dict[str, Any]:
    """The parameters that define baseline NAME (part of its hash and of its baseline.json)."""
    b = profile.baselines
    if get_baseline(name).kind == "data-mix":
        return data_mix_params(profile)
    if name == "merge-average":
        return {"method": "average"}
    if name == "merge-task-arithmetic":
        return {"method": "task_arithmetic", "scale": b.task_arithmetic_scale}
    if name == "merge-ties":
        return {"method": "ties", "density": b.ties_density, "scale": b.ties_scale}
    if name == "merge-dare":
        return {"method": "dare", "drop_rate": b.dare_drop_rate, "scale": b.dare_scale, "seed": profile.seed}
    if name == "ensemble-uniform":
        return {"weighting": "uniform"}
    if name == "ensemble-packllm":
        return {"weighting": "perplexity", "temperature": b.packllm_temperature}
    if name == "ensemble-select":
        return {"selector": SELECTION_RULE}
    from h3fusion.baselines.instruct import FUSER_PROMPT_TEMPLATE

    if name == "instruct-zeroshot":
        return {"fuser": "base", "prompt": FUSER_PROMPT_TEMPLATE}
    return {
        "fuser": "lora",
        "prompt": FUSER_PROMPT_TEMPLATE,
        "examples_per_task": b.instruct_train_examples,
        "lora": b.instruct_lora.model_dump(mode="json"),
        "train": b.instruct_train.model_dump(mode="json"),
        "candidates": profile.evaluation.generation.model_dump(mode="json"),
        "caps": profile.evaluation.max_new_tokens_by_dimension,
        "seed": profile.seed,
        "max_length": fuser_max_length(profile),
        "data": profile.model_dump(mode="json")["data"],
    }


def fuser_max_length(profile: Profile) -> int:
    """Room for the request (data.max_length) plus one answer of max_new_tokens per expert."""
    return profile.data.max_length + profile.num_experts * profile.evaluation.longest_answer


def baseline_hash(profile: Profile, name: str) -> str:
    payload = {
        "format": BASELINE_FORMAT,
        "name": name,
        "params": baseline_params(profile, name),
        "experts": expert_identities(profile),
        "model": profile.model_dump(mode="json")["model"],
    }
    return digest(payload)


# ---------------------------------------------------------------------------------------------- builders


def _build_merge(profile: Profile, name: str, tmp: Path, shared: SharedExperts) -> dict[str, Any]:
    from h3fusion.baselines.merging import MergeSpec, merge_into, read_adapter
    from h3fusion.experts import expert_dir
    from h3fusion.models import load_base

    params = baseline_params(profile, name)
    spec = MergeSpec(
        params["method"],
        scale=params.get("scale", 1.0),
        density=params.get("density", 1.0),
        drop_rate=params.get("drop_rate", 0.0),
        seed=params.get("seed", 0),
    )
    model, tok = load_base(profile)
    norms = merge_into(model, [read_adapter(expert_dir(profile, e)) for e in profile.expert_names], spec)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    return {
        "merged_delta_norm": float(sum(v * v for v in norms.values()) ** 0.5),
        "merged_weights": len(norms),
    }


def _build_config_only(profile: Profile, name: str, tmp: Path, shared: SharedExperts) -> dict[str, Any]:
    return {}


def _build_instruct_lora(profile: Profile, name: str, tmp: Path, shared: SharedExperts) -> dict[str, Any]:
    from h3fusion.baselines.instruct import InstructFusion, fuser_examples, train_fuser, write_fuser_examples
    from h3fusion.data import load_train_examples

    b = profile.baselines
    bank, tok = shared.bank()
    fusion = InstructFusion(bank, tok, profile.expert_names, profile.evaluation.generation, seed=profile.seed)
    source = [
        ex for t in profile.tasks for ex in load_train_examples(profile, t)[: b.instruct_train_examples]
    ]
    examples = fuser_examples(fusion, source, profile.evaluation.generation, profile.seed)
    write_fuser_examples(tmp / "fuser_train.jsonl", examples)
    log = train_fuser(
        bank,
        tok,
        examples,
        b.instruct_lora,
        b.instruct_train,
        fuser_max_length(profile),
        profile.seed,
        FUSER_ADAPTER,
    )
    try:
        bank.model.save_pretrained(str(tmp), selected_adapters=[FUSER_ADAPTER])
    finally:
        # an expert active again before the fuser goes (peft warns otherwise)
        bank.use(profile.expert_names[0])
        bank.model.delete_adapter(FUSER_ADAPTER)
    return {"train_examples": len(examples), "loss_log": log}


_BUILDERS: dict[str, Callable[[Profile, str, Path, SharedExperts], dict[str, Any]]] = {
    "merge": _build_merge,
    "ensemble": _build_config_only,
    "data-mix": build_data_mix,
    "instruct": _build_config_only,
}


def build_baseline(profile: Profile, name: str, shared: SharedExperts | None = None) -> Path:
    """Build baseline NAME into its folder (skipped when complete with the same hash); returns the folder."""
    entry = get_baseline(name)
    folder, key = baseline_dir(profile, name), baseline_hash(profile, name)
    if is_complete(folder, key):
        print(f"[baselines] {name}: complete with this config, skipped ({shown_path(folder)})")
        return folder
    shared = shared or SharedExperts(profile)
    builder = _build_instruct_lora if name == "instruct-lora" else _BUILDERS[entry.kind]
    with atomic_dir(folder) as tmp:
        with Stopwatch() as sw:
            info = builder(profile, name, tmp, shared)
        config = {
            "name": name,
            "kind": entry.kind,
            "description": entry.description,
            "reference": entry.reference,
            "params": baseline_params(profile, name),
            "experts": expert_identities(profile),
        }
        atomic_write_json(tmp / CONFIG_FILE, config)
        atomic_write_json(
            tmp / "manifest.json", make_manifest(profile, key, sw.seconds, baseline=name, **info)
        )
    print(f"[baselines] {name}: built in {sw.seconds:.1f} s ({shown_path(folder)})")
    return folder


# ---------------------------------------------------------------------------------------------- loading


def load_baseline(profile: Profile, name: str) -> LanguageModel:
    """Baseline NAME as a `LanguageModel` (an error naming the command to run when it is not built).

    The expert bank is loaded here, once per baseline; what the ensembles would otherwise compute again (the
    experts' per-token log-probabilities, their answers to the evaluation prompts) comes from the caches the
    experts' evaluations fill (`evaluation.logprob_cache`, `evaluation.generation_cache`)."""
    entry = get_baseline(name)
    folder = baseline_dir(profile, name)
    _baseline_identity(profile, name)
    params = json.loads((folder / CONFIG_FILE).read_text())["params"]
    if entry.kind in DENSE_KINDS:
        return _load_merged(profile, folder)
    shared = SharedExperts(profile)
    bank, tok = shared.bank()
    if entry.kind == "ensemble":
        from h3fusion.baselines.select import SelectEnsemble, likelihood_selector

        if "selector" in params:
            if params["selector"] != SELECTION_RULE:
                raise ArtifactError(
                    f"{shown_path(folder)} was built with the selection rule {params['selector']!r}, not "
                    f"{SELECTION_RULE!r}; rebuild it with `h3fusion baselines --profile {profile.name} --only {name}`"
                )
            mixture = shared.mixture()
            return SelectEnsemble(
                bank, tok, likelihood_selector(mixture), known=shared.known(), mixture=mixture
            )
        if params["weighting"] == "uniform":
            return shared.mixture()
        return shared.token_ensemble(params["weighting"], params.get("temperature", 1.0))
    from h3fusion.baselines.instruct import InstructFusion

    fuser = None
    if params["fuser"] == "lora":
        bank.add(FUSER_ADAPTER, folder / FUSER_ADAPTER)
        fuser = FUSER_ADAPTER
    return InstructFusion(
        bank,
        tok,
        profile.expert_names,
        profile.evaluation.generation,
        fuser=fuser,
        seed=profile.seed,
        known=shared.known(),
    )


def _load_merged(profile: Profile, folder: Path) -> LanguageModel:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from h3fusion.evaluation.registry import wrap_model
    from h3fusion.models import prepare_tokenizer

    model = AutoModelForCausalLM.from_pretrained(
        str(folder), dtype=getattr(torch, profile.model.dtype), use_safetensors=True
    )
    tok = prepare_tokenizer(AutoTokenizer.from_pretrained(str(folder)))
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tok.pad_token_id
    return wrap_model(model, tok)


def model_entries(profile: Profile) -> dict[str, ModelEntry]:
    """Every baseline as an evaluation `ModelEntry` (registered with `h3fusion.evaluation.registry.register_models`)."""
    from h3fusion.evaluation.registry import ModelEntry

    out = {}
    for name, b in BASELINES.items():
        out[name] = ModelEntry(
            name,
            "baseline",
            lambda n=name: load_baseline(profile, n),
            lambda n=name: _baseline_identity(profile, n),
            b.description,
        )
    return out


def run_baselines(profile: Profile, only: str | None = None) -> dict[str, dict[str, Any]]:
    """Build every baseline (or ONLY one) and evaluate it like any model; returns {name: metrics}.

    The builders share one expert bank; the evaluations load the judges once (in each worker process)."""
    from h3fusion.evaluation.run import evaluate_model
    from h3fusion.experts import check_experts_fit

    names = [only] if only else list(profile.baselines.names or baseline_names())
    for n in names:
        get_baseline(n)
    expert_identities(profile)
    # before any baseline is built: the adapters fit the base
    check_experts_fit(profile, profile.expert_names)
    shared = SharedExperts(profile)
    for n in names:
        build_baseline(profile, n, shared)
    shared.release()  # merged models load their own weights: free the builders' bank; it comes back once, lazily
    if profile.evaluation.workers > 1:  # each worker process loads its own bank and judges
        from h3fusion.evaluation.parallel import evaluate_models

        shared.release()
        return evaluate_models(profile, names)
    judges = shared.get_judges()
    return {n: evaluate_model(profile, n, judges=judges) for n in names}
