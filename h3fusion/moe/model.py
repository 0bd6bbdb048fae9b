"""`MoECausalLM`: a Hugging Face causal LM whose MLPs are `MoEFeedForward` layers.

The wrapper owns an ordinary HF model (`self.model`: the upcycled `LlamaForCausalLM`, or a
`MixtralForCausalLM` loaded back from an exported folder) in which every decoder layer's ``mlp``
was replaced by a `MoEFeedForward`. Attention, embeddings, norms, LM head, caching and
`generate` are the inner model's. `forward` runs the inner forward and then collects each MoE
layer's `last_router_logits` into the output, so the router logits come out of `forward` itself
(explicit; no hooks, no globals; safe under DDP, which wraps this module).

Output: transformers' `MoeCausalLMOutputWithPast` with ``loss`` (LM loss when `labels` are given),
``logits``, ``cache`` and ``router_logits``: a tuple with one tensor per decoder layer (number of
layers from the config), each [B*T, E] (tokens flattened in batch-major order, the same layout as
Mixtral's ``output_router_logits``), in the model's dtype (softmax them in float32).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import MoeCausalLMOutputWithPast

from h3fusion.errors import ModelError
from h3fusion.moe.layer import MoEFeedForward
from h3fusion.moe.low_rank import PROJECTIONS, check_top_k


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


class MoECausalLM(nn.Module):
    """A causal LM with MoE FFNs that returns its router logits from `forward`."""

    def __init__(self, model: PreTrainedModel, expert_names: Sequence[str] | None = None) -> None:
        super().__init__()
        self.model = model
        layers = self.moe_layers()
        if not layers:
            raise ModelError("the model has no MoEFeedForward layers; build it with h3fusion.moe.upcycle")
        num = layers[0].num_experts
        self.expert_names: tuple[str, ...] = (
            tuple(expert_names) if expert_names else tuple(f"expert{i}" for i in range(num))
        )
        if len(self.expert_names) != num:
            raise ModelError(f"{len(self.expert_names)} expert names given for {num} experts")

    # --------------------------------------------------------------- structure
    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def generation_config(self) -> Any:
        return self.model.generation_config

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def moe_layers(self) -> list[MoEFeedForward]:
        """The MoE layer of every decoder layer, in order."""
        return [layer.mlp for layer in decoder_layers(self.model) if isinstance(layer.mlp, MoEFeedForward)]

    @property
    def num_experts(self) -> int:
        return self.moe_layers()[0].num_experts

    @property
    def top_k(self) -> int:
        return self.moe_layers()[0].top_k

    @property
    def storage(self) -> str:
        return self.moe_layers()[0].storage

    def set_top_k(self, top_k: int) -> None:
        """Change k in every layer (routing ablations; no retraining needed)."""
        check_top_k(top_k, self.num_experts)
        for layer in self.moe_layers():
            layer.top_k = top_k

    @contextlib.contextmanager
    def force_expert(self, expert: int | None) -> Iterator[None]:
        """Within the block every token of every layer goes to `expert` alone (weight 1)."""
        if expert is not None and not 0 <= expert < self.num_experts:
            raise ModelError(f"expert index {expert} out of range 0..{self.num_experts - 1}")
        layers = self.moe_layers()
        previous = [layer.forced_expert for layer in layers]
        for layer in layers:
            layer.forced_expert = expert
        try:
            yield
        finally:
            for layer, old in zip(layers, previous, strict=True):
                layer.forced_expert = old

    # ----------------------------------------------------------------- forward
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        **kwargs: Any,
    ) -> MoeCausalLMOutputWithPast:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
        return MoeCausalLMOutputWithPast(
            loss=out.loss,
            logits=out.logits,
            cache=getattr(out, "cache", None),
            hidden_states=getattr(out, "hidden_states", None),
            attentions=getattr(out, "attentions", None),
            router_logits=self._collect_router_logits(),
        )

    def _collect_router_logits(self) -> tuple[torch.Tensor, ...]:
        logits = []
        for layer in self.moe_layers():
            if layer.last_router_logits is None:
                raise ModelError("an MoE layer produced no router logits during the forward pass")
            logits.append(layer.last_router_logits)
            layer.last_router_logits = None  # the output now owns them
        return tuple(logits)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """The inner HF model's `generate` (caching, sampling, stopping criteria as usual)."""
        return self.model.generate(*args, **kwargs)

    def gradient_checkpointing_enable(
        self, gradient_checkpointing_kwargs: dict[str, Any] | None = None
    ) -> None:
        """Non-reentrant checkpointing only: the reentrant form runs the first forward without autograd,
        so the router logits in the output would carry no gradient (the gating loss would train nothing)."""
        kwargs = dict(gradient_checkpointing_kwargs or {})
        if kwargs.get("use_reentrant"):
            raise ModelError(
                "use_reentrant=True gradient checkpointing detaches the router logits from the graph; "
                "use the default (non-reentrant) checkpointing with MoECausalLM"
            )
        kwargs["use_reentrant"] = False
        self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

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
        for layer in self.moe_layers():
            layer.add_fusion_lora(rank, alpha, targets, dropout, generator)

    def freeze_for_fusion(self) -> list[nn.Parameter]:
        """Freeze everything except the routers and the fusion LoRA; return the trainable parameters.

        Attention LoRA (the released code's choice, `fusion.attention_lora`) is the caller's to add.
        """
        self.requires_grad_(False)
        trainable: list[nn.Parameter] = []
        for layer in self.moe_layers():
            trainable += list(layer.router.parameters())
            if layer.fusion_lora is not None:
                trainable += list(layer.fusion_lora.parameters())
        for p in trainable:
            p.requires_grad_(True)
        return trainable

    def router_parameters(self) -> list[nn.Parameter]:
        return [layer.router.weight for layer in self.moe_layers()]

    def fusion_lora_scale(self) -> float:
        lora = self.moe_layers()[0].fusion_lora
        if lora is None:
            raise ModelError("no fusion LoRA on this model; call add_fusion_lora(rank, alpha) first")
        return lora.scale

    def drift_factors(self) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
        """Per layer, the fusion LoRA's (A [E, r, in], B [E, out, r]) per projection: `drift_loss`'s input."""
        return [layer.fusion_factors() for layer in self.moe_layers()]

    def expert_weights(self) -> list[list[torch.Tensor]]:
        """Per layer, the effective expert weights [E, out, in] per projection (analysis)."""
        return [list(layer.expert_weights().values()) for layer in self.moe_layers()]

    def expert_sq_norms(self) -> list[torch.Tensor]:
        """Per layer, the [E] squared norms of the experts' effective weights (the released-code penalty)."""
        return [layer.expert_sq_norms() for layer in self.moe_layers()]

    def merge_fusion_lora(self) -> None:
        for layer in self.moe_layers():
            layer.merge_fusion_lora()
