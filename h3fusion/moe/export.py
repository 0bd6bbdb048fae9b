"""Export to a standard `MixtralForCausalLM` folder, and loading such a folder back (ARCHITECTURE.md).

The routing of `MoEFeedForward` is Mixtral's, so an upcycled Llama or Mistral model *is* a Mixtral:
``num_local_experts = E``, ``num_experts_per_tok = k``, and GQA, head_dim, RoPE parameters, norms'
epsilon, sliding window, tied embeddings and token ids carried over from the base config. Other families
are refused up front (`check_base_family`, also called by `upcycle`), as mergekit-moe does: Gemma scales
embeddings and norms differently, Qwen2 has q/k/v biases, and a Mixtral folder has neither. After writing, the
folder is loaded back and its logits compared with the in-memory model's (`check_round_trip`). The folder loads with
``AutoModelForCausalLM.from_pretrained(folder)`` without custom code. Delta storage and fusion LoRA
are materialised on export. transformers 5.x packs Mixtral experts in memory
(``mlp.experts.gate_up_proj`` [E, 2f, d], gate rows first; ``mlp.experts.down_proj`` [E, d, f]);
``save_pretrained`` writes the classic per-expert keys (``block_sparse_moe.experts.{i}.w1/w2/w3``)
that other engines read.

Fusion training can start from ``runs/<p>/fusion/raw/`` with `load_moe` (materialised storage), or
upcycle in memory again (delta storage needs the factored deltas, which the folder no longer has).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import MixtralConfig, MixtralForCausalLM, PreTrainedModel

from h3fusion.artifacts import MANIFEST, atomic_dir, atomic_write_json, check_weight_files
from h3fusion.errors import ArtifactError, ModelError
from h3fusion.moe.layer import MoEFeedForward
from h3fusion.moe.model import MoECausalLM, decoder_layers

_CARRIED = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "use_cache",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "tie_word_embeddings",
    "rope_parameters",
    "attention_dropout",
    "sliding_window",
)
MIXTRAL_EXACT_FAMILIES = ("llama", "mistral")
"""Base `config.model_type`s whose upcycled MoE the Mixtral architecture reproduces exactly (tests/test_moe.py)."""
ROUND_TRIP_TOKENS = 8
"""Token ids the exported folder's logits are checked on."""
EXPERT_NAMES_KEY = "h3fusion_expert_names"
"""Extra config.json key: the experts' task names (ignored by other readers)."""


def check_base_family(config: Any) -> None:
    """Refuse a base whose upcycled MoE a Mixtral folder would not reproduce (before any weights are touched)."""
    family = getattr(config, "model_type", None)
    if family not in MIXTRAL_EXACT_FAMILIES:
        raise ModelError(
            f"the base model is a {family!r} model; H3Fusion exports the fused MoE as a Mixtral folder, which "
            f"reproduces only the families {list(MIXTRAL_EXACT_FAMILIES)} exactly ({family!r} differs in its "
            "norms, embedding scaling, biases or attention). Set `model.base` to a Llama or Mistral model "
            "(e.g. HuggingFaceTB/SmolLM2-135M-Instruct or smollm2-offline)"
        )
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise ModelError(
            "the base model's attention or MLP has biases, which Mixtral lacks; it cannot be exported as Mixtral. "
            "Use a base without biases (attention_bias and mlp_bias false)"
        )


def mixtral_config(moe: MoECausalLM) -> MixtralConfig:
    """The Mixtral config equivalent to `moe` (its inner config + E, k)."""
    src = moe.config
    if src.model_type != "mixtral":  # a loaded Mixtral folder (`load_moe`) re-exports as itself
        check_base_family(src)
    fields: dict[str, Any] = {k: getattr(src, k) for k in _CARRIED if hasattr(src, k)}
    fields.update(
        num_local_experts=moe.num_experts,
        num_experts_per_tok=moe.top_k,
        router_jitter_noise=0.0,
        output_router_logits=False,
        architectures=["MixtralForCausalLM"],
    )
    cfg = MixtralConfig(**fields)
    setattr(cfg, EXPERT_NAMES_KEY, list(moe.expert_names))
    cfg.dtype = moe.dtype
    return cfg


def _mixtral_state_dict(moe: MoECausalLM) -> dict[str, torch.Tensor]:
    state = {k: v for k, v in moe.model.state_dict().items() if ".mlp." not in k}
    for i, layer in enumerate(moe.moe_layers()):
        weights = {p: w.detach() for p, w in layer.expert_weights().items()}
        prefix = f"model.layers.{i}.mlp."
        state[prefix + "gate.weight"] = layer.router.weight.detach()
        state[prefix + "experts.gate_up_proj"] = torch.cat(
            [weights["gate_proj"], weights["up_proj"]], dim=1
        ).contiguous()
        state[prefix + "experts.down_proj"] = weights["down_proj"].contiguous()
    return state


@torch.no_grad()
def to_mixtral(moe: MoECausalLM) -> MixtralForCausalLM:
    """An in-memory `MixtralForCausalLM` with the same function as `moe`.

    It reuses `moe`'s tensors where no conversion is needed (no copy of attention/embeddings):
    treat it as a read-only view, e.g. for saving or evaluation.
    """
    cfg = mixtral_config(moe)
    device = moe.device
    with torch.device("meta"):
        mixtral = MixtralForCausalLM(cfg)
    state = _mixtral_state_dict(moe)
    mixtral.load_state_dict(state, strict=True, assign=True)
    if cfg.tie_word_embeddings:
        mixtral.lm_head.weight = mixtral.model.embed_tokens.weight
    # non-persistent buffers (RoPE inverse frequencies) are not in the state dict: rebuild them
    mixtral.model.rotary_emb = type(mixtral.model.rotary_emb)(cfg).to(device)
    mixtral.generation_config = moe.generation_config
    mixtral.eval()
    return mixtral


def export_mixtral(
    moe_model: MoECausalLM, tokenizer: Any, folder: str | Path, manifest: dict[str, Any] | None = None
) -> Path:
    """Write a standard Mixtral folder (weights, config, generation config, tokenizer) atomically.

    The folder is loaded back before it is complete and must give `moe_model`'s logits (`check_round_trip`).
    `manifest`, when given, is written last as ``manifest.json`` (the artifact's completion mark).
    """
    folder = Path(folder)
    mixtral = to_mixtral(moe_model)
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
def check_round_trip(moe: MoECausalLM, folder: str | Path) -> float:
    """Load `folder` with plain transformers and compare its logits with `moe`'s on a few token ids.

    Returns the largest absolute difference; raises `ModelError` when it exceeds `round_trip_tolerance`.
    """
    from transformers import AutoModelForCausalLM

    loaded = (
        AutoModelForCausalLM.from_pretrained(folder, dtype=moe.dtype, use_safetensors=True)
        .to(moe.device)
        .eval()
    )
    ids = torch.arange(min(ROUND_TRIP_TOKENS, moe.config.vocab_size), device=moe.device).unsqueeze(0)
    was_training = moe.training
    moe.eval()
    try:
        expected = moe(input_ids=ids).logits.float()
    finally:
        moe.train(was_training)
    diff = (loaded(input_ids=ids).logits.float() - expected).abs().max().item()
    del loaded
    tol = round_trip_tolerance(moe.dtype) * max(1.0, expected.abs().max().item())
    if not diff <= tol:
        raise ModelError(
            f"the exported Mixtral folder does not reproduce the fused model: logits differ by up to {diff:.3g} "
            f"(tolerance {tol:.3g}) for a {moe.config.model_type!r} base. Nothing was written; report this as a "
            "bug with the base model's config.json"
        )
    return diff


def from_mixtral(mixtral: PreTrainedModel, storage: str = "materialised") -> MoECausalLM:
    """Wrap a `MixtralForCausalLM` as an `MoECausalLM` (its sparse blocks become MoEFeedForward)."""
    if storage != "materialised":
        raise ModelError(
            "a Mixtral folder holds full expert weights only; load it with storage='materialised', or upcycle "
            "the base and adapters in memory for delta storage"
        )
    cfg = mixtral.config
    if getattr(cfg, "model_type", None) != "mixtral":
        raise ModelError(f"expected a Mixtral model, got model_type {getattr(cfg, 'model_type', None)!r}")
    f = cfg.intermediate_size
    for layer in decoder_layers(mixtral):
        block = layer.mlp
        ref = block.gate.weight
        moe = MoEFeedForward(
            cfg.hidden_size,
            f,
            cfg.num_local_experts,
            cfg.num_experts_per_tok,
            "materialised",
            hidden_act=cfg.hidden_act,
            dtype=ref.dtype,
            device=ref.device,
        )
        with torch.no_grad():
            moe.router.weight.copy_(ref)
            gate_up = block.experts.gate_up_proj
            moe.gate_proj.copy_(gate_up[:, :f])
            moe.up_proj.copy_(gate_up[:, f:])
            moe.down_proj.copy_(block.experts.down_proj)
        layer.mlp = moe
    names = getattr(cfg, EXPERT_NAMES_KEY, None)
    return MoECausalLM(mixtral, names)


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
    mixtral = MixtralForCausalLM.from_pretrained(folder, use_safetensors=True, **kwargs)
    if device is not None:
        mixtral.to(device)
    return from_mixtral(mixtral)
