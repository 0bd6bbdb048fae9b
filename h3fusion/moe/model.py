"""`MoECausalLM`: the fused model, a transformers `MixtralForCausalLM` whose experts modules are H3Fusion's.

Everything but the experts is Mixtral's: attention, norms, embeddings, LM head, the router (`MixtralTopKRouter`),
the sparse block, the router logits (``output_router_logits=True``: one [B*T, E] tensor per layer, in the model's
dtype), the load-balancing loss (``aux_loss``), caching, `generate` and `save_pretrained`. The class swaps each
block's `MixtralExperts` for `MaterialisedExperts` (the same weights and forward, plus an optional fusion LoRA), so
a Mixtral folder loads as a fused model with `MoECausalLM.from_pretrained`; `upcycle` puts `DeltaExperts` there
instead. It adds helpers over all blocks: top-k, a forced expert, the fusion LoRA, drift factors and weight norms.

An upcycled Llama or Mistral model *is* a Mixtral (`moe_config`): GQA, head_dim, RoPE parameters, norms' epsilon,
sliding window, tied embeddings and token ids carry over from the base config. Other families are refused up front
(`check_base_family`), as mergekit-moe does: Gemma scales embeddings and norms differently, Qwen2 has q/k/v biases,
and Mixtral has neither.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import MixtralConfig, MixtralForCausalLM, PreTrainedModel
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

from h3fusion.errors import ModelError
from h3fusion.moe.experts import FusionExperts, MaterialisedExperts
from h3fusion.moe.low_rank import PROJECTIONS, check_top_k

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
EXPERT_NAMES_KEY = "h3fusion_expert_names"
"""Extra config.json key: the experts' names (ignored by other readers)."""


def decoder_layers(model: PreTrainedModel) -> list[nn.Module]:
    """The decoder layers of a Llama/Mixtral-family causal LM (count from the config)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ModelError(
            f"{type(model).__name__} is not a Llama-family causal LM (no `model.layers`); the MoE upcycling "
            "needs a decoder with gated `mlp.gate_proj/up_proj/down_proj` (Llama, Mistral, SmolLM2, ...)"
        )
    return list(layers)[: model.config.num_hidden_layers]


def check_base_family(config: Any) -> None:
    """Refuse a base whose upcycled MoE a Mixtral model would not reproduce (before any weights are touched)."""
    family = getattr(config, "model_type", None)
    if family not in MIXTRAL_EXACT_FAMILIES:
        raise ModelError(
            f"the base model is a {family!r} model; the fused model is a Mixtral, which reproduces only the "
            f"families {list(MIXTRAL_EXACT_FAMILIES)} exactly ({family!r} differs in its norms, embedding scaling, "
            "biases or attention). Set `model.base` to a Llama or Mistral model "
            "(e.g. HuggingFaceTB/SmolLM2-135M-Instruct or smollm2-offline)"
        )
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise ModelError(
            "the base model's attention or MLP has biases, which Mixtral lacks; it cannot be fused as a Mixtral. "
            "Use a base without biases (attention_bias and mlp_bias false)"
        )


def moe_config(
    base_config: Any, num_experts: int, top_k: int, expert_names: Sequence[str], dtype: torch.dtype
) -> MixtralConfig:
    """The Mixtral config of the fused model: the base's config with E experts, top-k routing and no jitter.

    ``router_aux_loss_coef`` is 0: the fusion objective weighs the load-balancing term itself
    (`fusion.load_balance_weight`), so the model's ``loss`` stays the LM loss."""
    check_base_family(base_config)
    check_top_k(top_k, num_experts)
    fields: dict[str, Any] = {k: getattr(base_config, k) for k in _CARRIED if hasattr(base_config, k)}
    fields.update(
        num_local_experts=num_experts,
        num_experts_per_tok=top_k,
        router_jitter_noise=0.0,
        router_aux_loss_coef=0.0,
        output_router_logits=False,
        architectures=["MixtralForCausalLM"],
    )
    cfg = MixtralConfig(**fields)
    setattr(cfg, EXPERT_NAMES_KEY, list(expert_names))
    cfg.dtype = dtype
    return cfg


def mixtral_on_tensors(
    model_class: type[MixtralForCausalLM], config: MixtralConfig, state: dict[str, torch.Tensor], source: Any
) -> tuple[Any, list[str], list[str]]:
    """A `model_class` (a Mixtral) holding `state`'s tensors without a copy: built on the meta device, its LM head
    tied when the config says so, its RoPE buffers rebuilt on `source`'s device, `source`'s generation config.

    Returns the model and the keys `state` lacked and had in excess: which may be missing is the caller's to say.
    """
    with torch.device("meta"):
        model = model_class(config)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    # non-persistent buffers (RoPE inverse frequencies) are not in the state dict: rebuild them
    model.model.rotary_emb = type(model.model.rotary_emb)(config).to(source.device)
    model.generation_config = source.generation_config
    return model, missing, unexpected


class MoECausalLM(MixtralForCausalLM):
    """A `MixtralForCausalLM` with H3Fusion's experts modules and helpers over its MoE blocks."""

    def __init__(self, config: MixtralConfig) -> None:
        super().__init__(config)
        # the model's loss is the LM loss; the fusion objective weighs the load-balancing term (`aux_loss`) itself
        config.router_aux_loss_coef = self.router_aux_loss_coef = 0.0
        for block in self.moe_layers():
            old = block.experts
            new = MaterialisedExperts(config)
            # Mixtral's own (initialised or loaded) tensors
            new.gate_up_proj, new.down_proj = old.gate_up_proj, old.down_proj
            new.gate_up_proj.requires_grad_(False)
            new.down_proj.requires_grad_(False)
            block.experts = new

    # --------------------------------------------------------------- structure
    @property
    def expert_names(self) -> tuple[str, ...]:
        names = getattr(self.config, EXPERT_NAMES_KEY, None)
        return tuple(names) if names else tuple(f"expert{i}" for i in range(self.num_experts))

    def moe_layers(self) -> list[MixtralSparseMoeBlock]:
        """The sparse MoE block of every decoder layer, in order."""
        return [layer.mlp for layer in decoder_layers(self)]

    def experts_modules(self) -> list[FusionExperts]:
        return [block.experts for block in self.moe_layers()]

    @property
    def top_k(self) -> int:
        return self.config.num_experts_per_tok

    @property
    def storage(self) -> str:
        return self.experts_modules()[0].storage

    def set_top_k(self, top_k: int) -> None:
        """Change k in every layer and in the load-balancing loss (routing ablations; no retraining needed)."""
        check_top_k(top_k, self.num_experts)
        self.config.num_experts_per_tok = self.num_experts_per_tok = top_k
        for block in self.moe_layers():
            block.top_k = block.gate.top_k = top_k

    @contextlib.contextmanager
    def force_expert(self, expert: int | None) -> Iterator[None]:
        """Within the block every token of every layer goes to `expert` alone (weight 1); router logits as usual."""
        if expert is None:
            yield
            return
        if not 0 <= expert < self.num_experts:
            raise ModelError(f"expert index {expert} out of range 0..{self.num_experts - 1}")
        routers = [block.gate for block in self.moe_layers()]
        for router in routers:
            router.forward = _forced_routing(router, expert)  # an instance attribute: hooks still fire
        try:
            yield
        finally:
            for router in routers:
                del router.forward

    def activation_checkpointing_enable(
        self, activation_checkpointing_kwargs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        """Non-reentrant checkpointing only: the reentrant form runs the first forward without autograd, so the
        router logits in the output would carry no gradient (the gating loss would train nothing)."""
        options = dict(activation_checkpointing_kwargs or {})
        if options.get("use_reentrant"):
            raise ModelError(
                "use_reentrant=True activation checkpointing detaches the router logits from the graph; "
                "use the default (non-reentrant) checkpointing with the fused model"
            )
        options["use_reentrant"] = False
        super().activation_checkpointing_enable(activation_checkpointing_kwargs=options, **kwargs)

    # ------------------------------------------------------- fusion training
    def add_fusion_lora(
        self,
        rank: int,
        alpha: float,
        targets: Sequence[str] = PROJECTIONS,
        dropout: float = 0.0,
        seed: int = 0,
    ) -> None:
        """Trainable per-expert LoRA (B = 0) on every MoE layer, seeded."""
        generator = torch.Generator().manual_seed(seed)
        for experts in self.experts_modules():
            experts.add_fusion_lora(rank, alpha, targets, dropout, generator)

    def freeze_for_fusion(self) -> list[nn.Parameter]:
        """Freeze everything except the routers and the fusion LoRA; return the trainable parameters.

        Attention LoRA (the released code's choice, `fusion.attention_lora`) is the caller's to add.
        """
        self.requires_grad_(False)
        trainable = self.router_parameters()
        for experts in self.experts_modules():
            if experts.fusion_lora is not None:
                trainable += list(experts.fusion_lora.parameters())
        for p in trainable:
            p.requires_grad_(True)
        return trainable

    def router_parameters(self) -> list[nn.Parameter]:
        return [block.gate.weight for block in self.moe_layers()]

    def fusion_lora_scale(self) -> float:
        lora = self.experts_modules()[0].fusion_lora
        if lora is None:
            raise ModelError("no fusion LoRA on this model; call add_fusion_lora(rank, alpha) first")
        return lora.scale

    def drift_factors(self) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
        """Per layer, the fusion LoRA's (A [E, r, in], B [E, out, r]) per projection: `drift_loss`'s input."""
        return [experts.fusion_factors() for experts in self.experts_modules()]

    def expert_weights(self) -> list[list[torch.Tensor]]:
        """Per layer, the effective expert weights [E, out, in] per projection (analysis)."""
        return [list(experts.expert_weights().values()) for experts in self.experts_modules()]

    def expert_sq_norms(self) -> list[torch.Tensor]:
        """Per layer, the [E] squared norms of the experts' effective weights (the released-code penalty)."""
        return [experts.expert_sq_norms() for experts in self.experts_modules()]

    def merge_fusion_lora(self) -> None:
        for experts in self.experts_modules():
            experts.merge_fusion_lora()


def _forced_routing(router: nn.Module, expert: int) -> Any:
    def forward(hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = F.linear(hidden_states.reshape(-1, router.hidden_dim), router.weight)
        idx = torch.full((logits.shape[0], 1), expert, dtype=torch.long, device=logits.device)
        return logits, torch.ones(idx.shape, dtype=torch.float32, device=logits.device), idx

    return forward
