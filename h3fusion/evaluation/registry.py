"""Every model evaluation can load, in one place: the built-ins (base, experts, raw and fused MoEs, dense
baselines found on disk) and whatever another module registers with `register_models` (the ensembles and
H3Fusion-Instruct). A `ModelEntry` loads a model and names its exact weights for the caches."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from h3fusion.artifacts import MANIFEST, artifact_identity, check_weight_files, read_manifest
from h3fusion.config import Profile, shown_path
from h3fusion.errors import ArtifactError, H3FusionError, ModelError
from h3fusion.evaluation.lm import HFLanguageModel, LanguageModel

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


class UnknownModelError(H3FusionError, KeyError):
    """A model name that no loader knows."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


@dataclass(frozen=True)
class ModelEntry:
    """A model evaluation can load: `entry()` loads it; `identity()` names its exact weights for the cache."""

    name: str
    kind: str
    """base | expert | raw-moe | fused | baseline | (any kind a registered provider uses)."""
    load: Callable[[], LanguageModel]
    identity: Callable[[], str]
    description: str = ""

    def __call__(self) -> LanguageModel:
        return self.load()


ModelProvider = Callable[[Profile], Mapping[str, ModelEntry]]
_PROVIDERS: list[ModelProvider] = []
_PROVIDER_MODULES = ("h3fusion.baselines",)
"""Imported before listing models, so that their `register_models` calls have run."""


def register_models(provider: ModelProvider) -> ModelProvider:
    """Add a source of evaluable models (e.g. ensembles), as `provider(profile) -> {name: ModelEntry}`.

    Usable as a decorator; registering the same function twice has no effect.
    """
    if provider not in _PROVIDERS:
        _PROVIDERS.append(provider)
    return provider


def _import_providers() -> None:
    for module in _PROVIDER_MODULES:
        try:
            importlib.import_module(module)
        except (
            ModuleNotFoundError
        ) as err:  # the module itself absent (not one of its imports): nothing to add
            if err.name != module:
                raise


def manifest_identity(folder: Path, what: str, fix: str) -> str:
    """The artifact's identity (`artifacts.artifact_identity`): changes when it is rebuilt with another config
    or content, not with the wall time, date or machine of the build. An error (saying `fix`) when the artifact
    is incomplete or one of its weight files is damaged, before anything is loaded or written."""
    manifest = read_manifest(folder)
    if manifest is None:
        raise ArtifactError(f"{what} at {folder} is missing or incomplete (no {MANIFEST}); {fix}")
    check_weight_files(folder, fix)
    return artifact_identity(manifest)


def inference_device() -> str:
    """Where models are evaluated: the GPU when there is one."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def wrap_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> HFLanguageModel:
    """A Hugging Face model on `inference_device`, in eval mode, as a `LanguageModel`."""
    return HFLanguageModel(model.to(inference_device()).eval(), tokenizer)


def _load_base_lm(profile: Profile) -> HFLanguageModel:
    from h3fusion.models import load_base

    return wrap_model(*load_base(profile))


def _expert_identity(profile: Profile, expert: str) -> str:
    """The expert's manifest hash; an error when it is missing or was trained with another config."""
    from h3fusion.experts import check_experts_fit, require_expert

    folder = require_expert(profile, expert, "evaluating it")
    check_experts_fit(profile, [expert])
    return manifest_identity(
        folder, f"the {expert} expert", f"re-run `h3fusion align --profile {profile.name} --expert {expert}`"
    )


def _load_expert_lm(profile: Profile, expert: str) -> HFLanguageModel:
    """Base + the expert's LoRA adapter, merged into the weights (same function, dense-speed generation)."""
    from peft import PeftModel

    from h3fusion.experts import expert_dir
    from h3fusion.models import load_base

    _expert_identity(profile, expert)
    folder = expert_dir(profile, expert)
    model, tok = load_base(profile)
    try:
        merged = PeftModel.from_pretrained(model, str(folder)).merge_and_unload()
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot load the {expert} expert adapter from {folder}: {err}") from err
    return wrap_model(merged, tok)


def _load_folder_lm(profile: Profile, folder: Path, what: str, fix: str) -> HFLanguageModel:
    """A standard Hugging Face model folder (dense merge, Mixtral-format MoE), tokenizer from it or the profile."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from h3fusion.models import load_tokenizer, prepare_tokenizer

    manifest_identity(folder, what, fix)
    model = AutoModelForCausalLM.from_pretrained(
        str(folder), dtype=getattr(torch, profile.model.dtype), use_safetensors=True
    )
    has_tok = any(
        (folder / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    )
    tok = (
        prepare_tokenizer(AutoTokenizer.from_pretrained(str(folder))) if has_tok else load_tokenizer(profile)
    )
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tok.pad_token_id
    if getattr(model.config, "num_local_experts", None):
        _factor_against_base(profile, model)
    return wrap_model(model, tok)


def _factor_against_base(profile: Profile, model: Any) -> None:
    """An exported fused model (full experts) runs on the delta storage again where its experts are the base FFN
    plus low-rank changes (`h3fusion.moe.factored`): about the dense model's cost instead of two FFNs per token,
    logits equal to float32 rounding (on the cpu profile's H3Fusion-MoE, 5.7e-5 at most on logits up to 35)."""
    from h3fusion.models import load_base
    from h3fusion.moe.factored import factor_experts

    base, _ = load_base(profile)
    replaced = factor_experts(model, base)
    layers = len(model.model.layers)
    if replaced < layers:
        print(
            f"{layers - replaced} of {layers} MoE layers kept as full experts (their experts are not the base "
            "FFN plus a low-rank change)"
        )


def _builtin_models(profile: Profile) -> dict[str, ModelEntry]:
    run = profile.run_dir
    entries: dict[str, ModelEntry] = {
        "base": ModelEntry(
            "base",
            "base",
            lambda: _load_base_lm(profile),
            lambda: f"{profile.section_hash('model')}-seed{profile.seed}",
            f"the base model ({profile.model.base})",
        )
    }
    for spec in profile.expert_specs:
        entries[spec.name] = ModelEntry(
            spec.name,
            "expert",
            lambda e=spec.name: _load_expert_lm(profile, e),
            lambda e=spec.name: _expert_identity(profile, e),
            f"base + the {spec.name} LoRA expert"
            + (f", aligned on {spec.dimension}" if spec.name != spec.dimension else "")
            + " (merged into the weights)",
        )
    from h3fusion.fusion import RAW_FOLDERS, TRAINING_FREE_MOE

    raw = {
        "raw-moe": run / "fusion" / RAW_FOLDERS["random"],
        TRAINING_FREE_MOE: run / "fusion" / RAW_FOLDERS["hidden"],
    }
    fusion_dirs = {**raw, profile.fusion.variant: run / "fusion" / profile.fusion.variant}
    if (run / "fusion").is_dir():
        for folder in sorted((run / "fusion").iterdir()):
            manifest = read_manifest(folder) if folder.is_dir() else None
            if manifest is not None and manifest.get("stage") == "fusion":  # trained variants, not raw MoEs
                fusion_dirs.setdefault(folder.name, folder)
    for name, folder in fusion_dirs.items():
        kind = "raw-moe" if name in raw else "fused"
        what = {
            "raw-moe": "the raw (upcycled) MoE",
            TRAINING_FREE_MOE: "the training-free MoE (upcycled, hidden-state router, no training)",
        }.get(name, f"the fused model {name}")
        init = "hidden" if name == TRAINING_FREE_MOE else "random"
        other_init = "" if init == profile.fusion.router_init else f" --set fusion.router_init={init}"
        fix = (
            f"build it with `h3fusion fuse --profile {profile.name} --raw-only{other_init}`"
            if kind == "raw-moe"
            else f"train it with `h3fusion fuse --profile {profile.name}`"
        )
        entries[name] = ModelEntry(
            name,
            kind,
            lambda f=folder, w=what, x=fix: _load_folder_lm(profile, f, w, x),
            lambda f=folder, w=what, x=fix: manifest_identity(f, w, x),
            f"{what} ({shown_path(folder)})",
        )
    if (run / "baselines").is_dir():
        for folder in sorted((run / "baselines").iterdir()):
            if (folder / "config.json").is_file() and folder.name not in entries:
                what = f"the baseline {folder.name}"
                fix = f"run `h3fusion baselines --profile {profile.name} --only {folder.name}`"
                entries[folder.name] = ModelEntry(
                    folder.name,
                    "baseline",
                    lambda f=folder, w=what, x=fix: _load_folder_lm(profile, f, w, x),
                    lambda f=folder, w=what, x=fix: manifest_identity(f, w, x),
                    f"dense merged model ({folder})",
                )
    return entries


def known_models(profile: Profile) -> dict[str, ModelEntry]:
    """Every model name `evaluate_model` accepts for this profile, with its loader (built-ins + registered)."""
    _import_providers()
    entries = _builtin_models(profile)
    for provider in _PROVIDERS:
        entries.update(provider(profile))
    return entries


def resolve_model(profile: Profile, name: str) -> ModelEntry:
    models = known_models(profile)
    if name not in models:
        raise UnknownModelError(
            f"unknown model {name!r} for profile {profile.name!r}; known models: {', '.join(models)}"
        )
    return models[name]
