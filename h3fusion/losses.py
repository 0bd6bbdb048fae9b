"""Fusion-stage losses (book: method.md, released_code_bugs.md): pure functions of tensors and masks, no model objects.

Router logits are what the fused model (a Mixtral) returns with ``output_router_logits=True``: a sequence with one
tensor per MoE layer, each [B*T, E] (batch-major) or [B, T, E]. Masks are the usual attention masks [B, T]
(1 = token). The load-balancing term is the model's own ``aux_loss`` (transformers' `load_balancing_loss_func`).

The released code's forms are kept behind ``released_code=True`` to measure what they change:
the gating loss applied a second softmax to the averaged probabilities and counted padding, and the
"drift" penalty was a weight-norm penalty on the experts (frozen weights included).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from h3fusion.errors import H3FusionError


class LossInputError(H3FusionError, ValueError):
    """Tensors of inconsistent shapes passed to a loss."""


def _per_layer_probs(router_logits: Sequence[torch.Tensor], batch: int) -> torch.Tensor:
    """Softmax probabilities stacked as [L, B, T, E] (float32)."""
    if not router_logits:
        raise LossInputError(
            "router_logits is empty; pass the model output's `router_logits` (one tensor per layer)"
        )
    num_experts = router_logits[0].shape[-1]
    layers = []
    for logits in router_logits:
        if logits.numel() % (batch * num_experts):
            raise LossInputError(
                f"router logits of shape {tuple(logits.shape)} do not split into {batch} sequences of {num_experts} experts"
            )
        layers.append(F.softmax(logits.float().reshape(batch, -1, num_experts), dim=-1))
    return torch.stack(layers)


def sequence_routing(
    router_logits: Sequence[torch.Tensor], attention_mask: torch.Tensor | None, batch: int
) -> torch.Tensor:
    """P_b: router probabilities averaged over each sequence's non-padding tokens and over layers, [B, E]."""
    probs = _per_layer_probs(router_logits, batch)  # [L, B, T, E]
    if attention_mask is None:
        return probs.mean(dim=(0, 2))
    mask = attention_mask.to(probs.device, torch.float32)
    if mask.shape != probs.shape[1:3]:
        raise LossInputError(
            f"attention_mask {tuple(mask.shape)} does not match router logits for {tuple(probs.shape[1:3])} tokens"
        )
    per_layer = (probs * mask[None, :, :, None]).sum(dim=2) / mask.sum(dim=1).clamp_min(1.0)[None, :, None]
    return per_layer.mean(dim=0)


def gating_loss(
    router_logits: Sequence[torch.Tensor],
    attention_mask: torch.Tensor | None,
    task_labels: torch.Tensor,
    released_code: bool = False,
    prompt_mask: torch.Tensor | None = None,
    expert_groups: torch.Tensor | None = None,
) -> torch.Tensor:
    """L_gate = mean_b -log P_b[y_b]: the router should send sequence b to the expert of its task y_b.

    prompt_mask ([B, T], 1 = a prompt token): the loss is then the mean of the sequence term and the same term
    on each sequence's prompt tokens alone, so the prompt, from which generation starts, is routed too.
    expert_groups ([D, E], 1 where expert e is aligned on task d): with several experts on one task, P_b[y_b] is
    the probability of the task's experts together, -log sum_{e in y_b} P_b[e] (None: expert e is task e).
    released_code=True: the released form, cross-entropy of a *second* softmax of the probabilities
    averaged over all tokens, padding included (its minimum is far above 0 and its gradient small).
    """
    labels = task_labels.long()
    batch = labels.shape[0]

    def grouped(p: torch.Tensor) -> torch.Tensor:
        if expert_groups is None:
            return p
        if expert_groups.shape[-1] != p.shape[-1]:
            raise LossInputError(f"expert_groups has {expert_groups.shape[-1]} experts, the router {p.shape[-1]}")
        return p @ expert_groups.to(p.device, p.dtype).T

    if released_code:
        avg = grouped(_per_layer_probs(router_logits, batch).mean(dim=(0, 2)))
        return F.cross_entropy(avg, labels.to(avg.device))
    masks = [attention_mask] if prompt_mask is None else [attention_mask, prompt_mask]
    terms = []
    for mask in masks:
        p = grouped(sequence_routing(router_logits, mask, batch))
        terms.append(F.nll_loss(torch.log(p.clamp_min(1e-12)), labels.to(p.device)))
    return torch.stack(terms).mean()


def prompt_token_mask(attention_mask: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """1 at a sequence's prompt tokens: attended tokens that carry no LM loss (the collator's labels are
    `ignore_index` on the prompt and on padding)."""
    if attention_mask.shape != labels.shape:
        raise LossInputError(f"attention_mask {tuple(attention_mask.shape)} and labels {tuple(labels.shape)} differ")
    return attention_mask.bool() & (labels == ignore_index)


def drift_loss(
    factors: Sequence[Sequence[tuple[torch.Tensor, torch.Tensor]]],
    gammas: torch.Tensor | Sequence[float],
    scale: float,
    released_code: bool = False,
    expert_sq_norms: Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    """sum_i gamma_i * ||theta_i - theta_i^0||^2, averaged over layers.

    factors: per layer, one (A [E, r, in], B [E, out, r]) pair per LoRA-adapted projection of the
    fusion stage (`MoECausalLM.drift_factors()`); expert i's change is ``scale * B_i A_i`` with
    ``scale = alpha / r``. ``||B A||_F^2 = trace((B^T B)(A A^T))`` is computed from r x r Gram
    matrices, without forming the out x in delta.

    released_code=True: `weight_norm_penalty` of `expert_sq_norms` instead (the released code's form).
    """
    if released_code:
        if expert_sq_norms is None:
            raise LossInputError("released_code drift needs expert_sq_norms (MoECausalLM.expert_sq_norms())")
        return weight_norm_penalty(expert_sq_norms, gammas)
    if not factors:
        raise LossInputError("drift_loss needs the fusion LoRA factors of at least one layer")
    per_layer = []
    for layer in factors:
        total = None
        for a, b in layer:
            gram_b = b.float().transpose(1, 2) @ b.float()  # [E, r, r]
            gram_a = a.float() @ a.float().transpose(1, 2)  # [E, r, r]
            sq = (gram_b * gram_a).sum(dim=(1, 2)) * scale**2  # both symmetric: trace(XY) = sum(X * Y)
            total = sq if total is None else total + sq
        if total is None:
            raise LossInputError(
                "a layer has no fusion LoRA factors; add them with MoECausalLM.add_fusion_lora"
            )
        per_layer.append(total)
    per_expert = torch.stack(per_layer).mean(dim=0)  # [E]
    g = torch.as_tensor(gammas, dtype=per_expert.dtype, device=per_expert.device)
    if g.shape != per_expert.shape:
        raise LossInputError(f"{g.numel()} gamma values given for {per_expert.numel()} experts")
    return (g * per_expert).sum()


def weight_norm_penalty(expert_sq_norms: Sequence[torch.Tensor], gammas: torch.Tensor | Sequence[float]) -> torch.Tensor:
    """The released code's "drift": sum_i gamma_i * ||W_i||^2 of the experts' full (effective) weights.

    expert_sq_norms: per layer, the [E] squared norms of each expert's weights, all projections summed
    (`MoECausalLM.expert_sq_norms()`, or `sq_norms` of dense weights), averaged over layers like `drift_loss`.
    Penalises the frozen weights' norm, not the drift.
    """
    if not expert_sq_norms:
        raise LossInputError("weight_norm_penalty needs the expert weight norms of at least one layer")
    per_expert = torch.stack([n.float() for n in expert_sq_norms]).mean(dim=0)
    g = torch.as_tensor(gammas, dtype=per_expert.dtype, device=per_expert.device)
    if g.shape != per_expert.shape:
        raise LossInputError(f"{g.numel()} gamma values given for {per_expert.numel()} experts")
    return (g * per_expert).sum()


def sq_norms(expert_weights: Sequence[Sequence[torch.Tensor]]) -> list[torch.Tensor]:
    """Per layer, the [E] squared norms of dense expert weights (one [E, out, in] tensor per projection)."""
    return [sum(w.float().pow(2).sum(dim=(1, 2)) for w in layer) for layer in expert_weights]  # type: ignore[misc]
