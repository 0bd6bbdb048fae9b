"""The fused model as a standard Mixtral folder, and such a folder loaded back (ARCHITECTURE.md).

The fused model is a `MixtralForCausalLM` already (`MoECausalLM`); what export adds is the experts in Mixtral's own
storage: delta storage and the fusion LoRA are materialised into a plain `MixtralForCausalLM` that shares every other
tensor, which transformers' `save_pretrained` writes (its config names the ``MixtralForCausalLM`` architecture, so
any engine reads it without custom code; transformers 5.x packs experts in memory, ``mlp.experts.gate_up_proj``
[E, 2f, d] and ``down_proj`` [E, d, f], and writes the classic per-expert keys
``block_sparse_moe.experts.{i}.w1/w2/w3``). After writing, the folder is loaded back and its logits compared with
the in-memory model's (`check_round_trip`).

`load_moe` reads a folder back as an `MoECausalLM` (materialised storage): fusion training can start from
``runs/<p>/fusion/raw/`` that way, or upcycle in memory again (delta storage needs the factored deltas, which the
folder no longer has).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import MixtralForCausalLM

from h3fusion.artifacts import MANIFEST, atomic_dir, atomic_write_json, check_weight_files
from h3fusion.errors import ArtifactError, ModelError
from h3fusion.moe.model import MoECausalLM, mixtral_on_tensors

ROUND_TRIP_TOKENS = 8
"""Token ids the exported folder's logits are checked on."""


@torch.no_grad()
def plain_mixtral(moe: MoECausalLM) -> MixtralForCausalLM:
    """A plain transformers `MixtralForCausalLM` with `moe`'s function, its experts materialised.

    Every tensor but the experts' is `moe`'s own (no copy): treat it as a read-only view, for saving.
    """
    state = {k: v for k, v in moe.state_dict().items() if ".mlp.experts." not in k}
    for i, experts in enumerate(moe.experts_modules()):
        w = {p: t.detach() for p, t in experts.expert_weights().items()}
        prefix = f"model.layers.{i}.mlp.experts."
        state[prefix + "gate_up_proj"] = torch.cat([w["gate_proj"], w["up_proj"]], dim=1).contiguous()
        state[prefix + "down_proj"] = w["down_proj"].contiguous()
    mixtral, missing, unexpected = mixtral_on_tensors(MixtralForCausalLM, moe.config, state, moe)
    if missing or unexpected:
        raise ModelError(f"export: the fused model's state lacks {missing[:3]} or has extra {unexpected[:3]}")
    return mixtral.eval()


def export_mixtral(
    moe_model: MoECausalLM, tokenizer: Any, folder: str | Path, manifest: dict[str, Any] | None = None
) -> Path:
    """Write a standard Mixtral folder (weights, config, generation config, tokenizer) atomically.

    The folder is loaded back before it is complete and must give `moe_model`'s logits (`check_round_trip`).
    `manifest`, when given, is written last as ``manifest.json`` (the artifact's completion mark).
    """
    folder = Path(folder)
    mixtral = plain_mixtral(moe_model)
    with atomic_dir(folder) as tmp:
        mixtral.save_pretrained(tmp)
        del mixtral
        check_round_trip(moe_model, tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if manifest is not None:
            atomic_write_json(tmp / MANIFEST, manifest)
    return folder


def round_trip_tolerance(dtype: torch.dtype) -> float:
    """Largest logit difference accepted, relative to max(1, max |logit|): storage forms round differently."""
    return 1e-4 if dtype in (torch.float32, torch.float64) else 5e-2


@torch.no_grad()
def logit_gap(reference: Any, candidate: Any) -> tuple[float, float]:
    """The largest |logit difference| of `candidate` from `reference` on the first `ROUND_TRIP_TOKENS` token ids
    (each model in eval mode, its own mode restored after), and the gap `round_trip_tolerance` allows there."""
    ids = torch.arange(min(ROUND_TRIP_TOKENS, reference.config.vocab_size), device=reference.device)[None]
    logits = []
    for model in (reference, candidate):
        was_training = model.training
        model.eval()
        try:
            logits.append(model(input_ids=ids).logits.float())
        finally:
            model.train(was_training)
    expected, got = logits
    tol = round_trip_tolerance(reference.dtype) * max(1.0, expected.abs().max().item())
    return (got - expected).abs().max().item(), tol


def check_round_trip(moe: MoECausalLM, folder: str | Path) -> float:
    """Load `folder` with plain transformers and compare its logits with `moe`'s on a few token ids.

    Returns the largest absolute difference; raises `ModelError` when it exceeds `round_trip_tolerance`.
    """
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=moe.dtype, use_safetensors=True)
    loaded.to(moe.device)
    diff, tol = logit_gap(moe, loaded)
    del loaded
    if not diff <= tol:
        raise ModelError(
            f"the exported Mixtral folder does not reproduce the fused model: logits differ by up to {diff:.3g} "
            f"(tolerance {tol:.3g}) for a {moe.config.model_type!r} base. Nothing was written; report this as a "
            "bug with the base model's config.json"
        )
    return diff


def load_moe(
    folder: str | Path, dtype: torch.dtype | None = None, device: str | torch.device | None = None
) -> MoECausalLM:
    """Load an exported Mixtral folder (e.g. ``runs/<p>/fusion/raw/``) as an `MoECausalLM` (materialised)."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.exists():
        raise ArtifactError(
            f"{folder} is not a model folder (no config.json); run `h3fusion fuse` to create it"
        )
    if json.loads(config_path.read_text()).get("model_type") != "mixtral":
        raise ArtifactError(f"{folder} does not hold a Mixtral model; expected an MoE exported by h3fusion")
    check_weight_files(folder, "re-run `h3fusion fuse` (with `--raw-only` for fusion/raw)")
    kwargs: dict[str, Any] = {}
    if dtype is not None:
        kwargs["dtype"] = dtype
    moe = MoECausalLM.from_pretrained(folder, use_safetensors=True, **kwargs)
    if device is not None:
        moe.to(device)
    return moe
