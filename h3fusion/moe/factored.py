"""A fused model read from its exported folder, run on the delta storage again (`factored_experts`).

Why: an exported fused model is a plain Mixtral whose experts are full FFNs, so top-2 routing computes two FFNs
per token where the delta storage (`DeltaExperts`) computes the base FFN once plus rank-r corrections. Every
fused model of this project is the base model plus low-rank changes per expert (the experts' LoRA, the fusion
LoRA; the released code's aliasing sums them), so ``W_e - W_base`` has a small rank, recovered exactly (up to
float32 rounding) from a randomised sketch of it (`_low_rank`). Evaluation uses it to score and generate at
about the cost of the dense model; a layer whose differences are not of low rank (a model fused from other
bases, a full fine-tune) keeps Mixtral's experts, so the result never depends on the shortcut being valid.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from h3fusion.moe.experts import DeltaExperts
from h3fusion.moe.low_rank import PROJECTIONS
from h3fusion.moe.upcycle import ExpertAdapter, delta_experts

MAX_RANK_SHARE = 0.125
"""A delta of rank above this share of min(d, f) is not worth factoring (the delta path would cost more)."""

RELATIVE_TOLERANCE = 1e-6
"""Largest entry of ``W_e - (W_base + B A)`` allowed, relative to the largest entry of W_e (float32 rounding is
about 6e-8)."""


def _expert_weights(experts: nn.Module) -> dict[str, torch.Tensor]:
    """[E, out, in] per projection from Mixtral's stacked experts (``gate_up_proj`` holds gate then up)."""
    gate, up = experts.gate_up_proj.detach().chunk(2, dim=1)
    return {"gate_proj": gate, "up_proj": up, "down_proj": experts.down_proj.detach()}


def _low_rank(
    delta: torch.Tensor, max_rank: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(A [r, in], B [out, r]) with ``B A`` the rank-r part of `delta` (float64), or None when r > max_rank.

    A randomised range finder (Halko, Martinsson and Tropp 2011) that widens its sketch until it has room to
    spare: the cost grows with the rank found, not with the matrix (a 7B model's 11008 x 4096 deltas of rank 16
    cost a [11008, 24] sketch, not an SVD of the whole matrix). Directions below 1e-5 of the largest singular
    value are dropped; `factored_experts` then checks the reconstruction entry by entry."""
    width = min(16, max_rank)
    while True:
        probe = torch.randn(delta.shape[1], width + 8, dtype=delta.dtype, generator=generator)
        sketch = delta @ probe.to(delta.device)
        q, _ = torch.linalg.qr(sketch)  # [out, width + 8], orthonormal columns spanning delta's range
        u, s, vh = torch.linalg.svd(q.T @ delta, full_matrices=False)
        if float(s[0]) == 0.0:
            return delta.new_zeros(1, delta.shape[1]), delta.new_zeros(delta.shape[0], 1)
        rank = int((s > s[0] * 1e-5).sum())
        if rank < width + 8:  # the sketch had room to spare: it holds the whole range
            return (vh[:rank], (q @ u[:, :rank]) * s[:rank]) if rank <= max_rank else None
        if width >= max_rank:
            return None
        width = min(2 * width, max_rank)


def factored_experts(
    experts: nn.Module, base_mlp: nn.Module, hidden_act: str = "silu", max_rank: int | None = None
) -> DeltaExperts | None:
    """`DeltaExperts` computing the same function as Mixtral's `experts` module, with `base_mlp`'s weights as the
    shared FFN, or None when some expert does not differ from it by a matrix of rank at most `max_rank` (default:
    `MAX_RANK_SHARE` of the smaller FFN width)."""
    weights = _expert_weights(experts)
    num, f, d = weights["gate_proj"].shape
    max_rank = max_rank or max(1, int(MAX_RANK_SHARE * min(d, f)))
    factors: list[dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]] = [{} for _ in range(num)]
    generator = torch.Generator().manual_seed(0)
    for p in PROJECTIONS:
        base = getattr(base_mlp, p).weight.detach()
        if base.shape != weights[p].shape[1:]:
            return None
        for e in range(num):
            w = weights[p][e]
            low = _low_rank(w.double() - base.double(), max_rank, generator)
            if low is None:
                return None
            a, b = low
            rebuilt = base.double() + b @ a
            if float((rebuilt - w.double()).abs().max()) > RELATIVE_TOLERANCE * float(w.abs().max()):
                return None
            factors[e][0, p] = (a.to(w.dtype), b.to(w.dtype))
    # the factors as one adapter per expert on a one-layer view: upcycling's own builder of the delta storage
    adapters = [ExpertAdapter(name=str(e), scale=1.0, factors=own) for e, own in enumerate(factors)]
    return delta_experts(base_mlp, 0, adapters, hidden_act).eval()


def factor_experts(model: Any, base_model: Any, max_rank: int | None = None) -> int:
    """Replace, in place, every MoE block's experts of `model` (a Mixtral) that `factored_experts` can factor
    against the matching MLP of `base_model` (a dense model of the same shapes); returns how many were replaced."""
    layers = model.model.layers
    base_layers = base_model.model.layers
    if len(layers) != len(base_layers):
        return 0
    replaced = 0
    for layer, base_layer in zip(layers, base_layers, strict=True):
        block = layer.mlp
        if not hasattr(block, "experts") or not hasattr(base_layer.mlp, "gate_proj"):
            continue
        factored = factored_experts(block.experts, base_layer.mlp, model.config.hidden_act, max_rank)
        if factored is not None:
            block.experts = factored
            replaced += 1
    return replaced
