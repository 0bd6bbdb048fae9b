"""The experts modules of the fused model: what replaces Mixtral's `MixtralExperts` (book: method.md).

Routing is Mixtral's own (`MixtralTopKRouter`: ``p = softmax(W_g h)`` in float32, ``S = top-k(p)``,
``p~_i = p_i / sum_{j in S} p_j``), and so is the block (`MixtralSparseMoeBlock`): it calls its experts module
as ``experts(hidden_states [N, d], top_k_index [N, k], top_k_weights [N, k]) -> [N, d]`` with
``MoE(h) = sum_{i in S} p~_i E_i(h)``, ``E_i(h) = W_down_i (silu(W_gate_i h) * W_up_i h)``. Two modules compute
that call, one per storage (profile key `fusion.storage`):

* `MaterialisedExperts` (``materialised``): Mixtral's own experts (full per-expert weights ``gate_up_proj``
  [E, 2f, d], ``down_proj`` [E, d, f]; each expert its own slice, as the paper; the released code aliased them),
  with the fusion LoRA added when present.
* `DeltaExperts` (``delta``): ONE shared, frozen base FFN (``base_gate_proj`` ...) plus each expert's low-rank
  delta kept factored (`expert_deltas`, the scale alpha/r folded into B); its forward (`DeltaPath`) runs the base
  matmuls once for all tokens.

Fusion-stage training adds a second, trainable set of per-expert LoRA factors (`add_fusion_lora`, B = 0 so the
function is unchanged at init) in both storages; `merge_fusion_lora` folds them into the expert weights
(materialised) or appends them to the factored deltas (delta: ranks concatenate, exact). The drift of expert i is
``(alpha/r) B_i A_i`` per projection (`fusion_factors`, the input of `losses.drift_loss`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.models.mixtral.modeling_mixtral import MixtralExperts

from h3fusion.errors import ModelError
from h3fusion.moe.delta_path import DeltaPath
from h3fusion.moe.low_rank import PROJECTIONS, LowRankExperts, projection_shapes

Storage = Literal["delta", "materialised"]
STORAGES: tuple[str, ...] = ("delta", "materialised")


def check_storage(storage: str) -> None:
    if storage not in STORAGES:
        raise ModelError(
            f"unknown MoE storage {storage!r}; use 'delta' or 'materialised' (profile key `fusion.storage`)"
        )


class FusionExperts:
    """What both storages share: the experts' effective weights, their norms and the fusion LoRA.

    The storage supplies `stored_weight` (its dense part of the experts' weights), `low_rank_sets` (its factored
    parts) and `_merge` (how a trained fusion LoRA is folded in)."""

    storage: str
    num_experts: int
    hidden_dim: int
    intermediate_dim: int
    fusion_lora: LowRankExperts | None
    _stack_cache: dict

    def stored_weight(self, proj: str) -> torch.Tensor:  # pragma: no cover - every storage overrides it
        raise NotImplementedError

    def low_rank_sets(self) -> list[LowRankExperts]:
        """The factored parts of the experts' weights: the fusion LoRA when present (delta storage: its deltas too)."""
        return [] if self.fusion_lora is None else [self.fusion_lora]

    def expert_weight(self, proj: str) -> torch.Tensor:
        """Effective weights [E, out, in] of one projection, every low-rank set included (differentiable)."""
        w = self.stored_weight(proj)
        extras = [d for s in self.low_rank_sets() if (d := s.dense(proj)) is not None]
        if not extras:
            return w
        # sum in float32 so that bf16 weights lose no more than one rounding
        return (w.float() + sum(x.float() for x in extras)).to(w.dtype)

    def expert_weights(self) -> dict[str, torch.Tensor]:
        return {p: self.expert_weight(p) for p in PROJECTIONS}

    def expert_sq_norms(self) -> torch.Tensor:
        """[E] squared Frobenius norms of each expert's effective weights, all projections summed (differentiable)."""
        return sum(w.float().pow(2).sum(dim=(1, 2)) for w in self.expert_weights().values())  # type: ignore[return-value]

    def add_fusion_lora(
        self,
        rank: int,
        alpha: float,
        targets: Sequence[str] = PROJECTIONS,
        dropout: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> LowRankExperts:
        """Add trainable per-expert LoRA factors (B = 0: the function is unchanged at init)."""
        if self.fusion_lora is not None:
            raise ModelError("these experts already have fusion LoRA factors; call merge_fusion_lora() first")
        ref = self.stored_weight("down_proj")
        lora = LowRankExperts(
            self.num_experts,
            rank,
            projection_shapes(self.hidden_dim, self.intermediate_dim),
            targets,
            scale=alpha / rank,
            dropout=dropout,
            dtype=ref.dtype,
            device=ref.device,
        )
        lora.reset_lora(generator)
        self.fusion_lora = lora
        self._stack_cache.clear()
        return lora

    def fusion_factors(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(A [E, r, in], B [E, out, r]) per projection of the fusion LoRA (empty if none)."""
        return [] if self.fusion_lora is None else self.fusion_lora.factors()

    @torch.no_grad()
    def merge_fusion_lora(self) -> None:
        """Fold the fusion LoRA into the expert weights (exact) and drop its factors."""
        if self.fusion_lora is None:
            return
        self._merge(self.fusion_lora)
        self.fusion_lora = None
        self._stack_cache.clear()

    def _merge(self, lora: LowRankExperts) -> None:  # pragma: no cover - every storage overrides it
        raise NotImplementedError


class MaterialisedExperts(FusionExperts, MixtralExperts):
    """Mixtral's experts (their forward, their weights) plus an optional fusion LoRA."""

    storage = "materialised"

    def __init__(self, config) -> None:  # noqa: ANN001 - a MixtralConfig
        super().__init__(config)
        self.gate_up_proj.requires_grad_(False)
        self.down_proj.requires_grad_(False)
        self.fusion_lora = None
        self._stack_cache = {}

    def stored_weight(self, proj: str) -> torch.Tensor:
        f = self.intermediate_dim
        if proj == "gate_proj":
            return self.gate_up_proj[:, :f]
        if proj == "up_proj":
            return self.gate_up_proj[:, f:]
        return self.down_proj

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        if self.fusion_lora is None:
            return super().forward(hidden_states, top_k_index, top_k_weights)
        lora = self.fusion_lora
        out = torch.zeros_like(hidden_states)
        for e in range(self.num_experts):
            tok, slot = torch.where(top_k_index == e)
            if not tok.numel():
                continue
            x = hidden_states[tok]
            gate = x @ self.stored_weight("gate_proj")[e].T + _delta(lora, "gate_proj", x, e)
            up = x @ self.stored_weight("up_proj")[e].T + _delta(lora, "up_proj", x, e)
            act = self.act_fn(gate) * up
            y = act @ self.down_proj[e].T + _delta(lora, "down_proj", act, e)
            out.index_add_(0, tok, (y * top_k_weights[tok, slot, None]).to(out.dtype))
        return out

    def _merge(self, lora: LowRankExperts) -> None:
        for p in lora.targets:
            w = self.stored_weight(p)
            w.copy_((w.float() + lora.dense(p).float()).to(w.dtype))


def _delta(lora: LowRankExperts, proj: str, x: torch.Tensor, expert: int) -> torch.Tensor | int:
    d = lora.delta_of(proj, x, expert)
    return 0 if d is None else d


class DeltaExperts(DeltaPath, FusionExperts, nn.Module):
    """The delta storage: one frozen base FFN and every expert's low-rank delta, factored.

    Built by `upcycle` (h3fusion.moe.upcycle); the constructor makes zero-filled tensors of the right shapes.
    """

    storage = "delta"

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_experts: int,
        delta_rank: int = 1,
        hidden_act: str = "silu",
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.hidden_dim, self.intermediate_dim, self.num_experts = hidden_size, intermediate_size, num_experts
        self.hidden_act = hidden_act
        self.act_fn = ACT2FN[hidden_act]
        shapes = projection_shapes(hidden_size, intermediate_size)
        for p, (out_f, in_f) in shapes.items():
            self.register_parameter(
                f"base_{p}",
                nn.Parameter(torch.zeros(out_f, in_f, dtype=dtype, device=device), requires_grad=False),
            )
        self.expert_deltas = LowRankExperts(num_experts, delta_rank, shapes, dtype=dtype, device=device)
        self.expert_deltas.requires_grad_(False)
        self.fusion_lora = None
        self._stack_cache = {}  # stacked rank-r factors for inference (see `DeltaPath._stack`)

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        return self._forward_delta(hidden_states, top_k_weights, top_k_index)

    def stored_weight(self, proj: str) -> torch.Tensor:
        """The shared base weight seen as every expert's [E, out, in] (a view, no copy)."""
        return getattr(self, f"base_{proj}").unsqueeze(0).expand(self.num_experts, -1, -1)

    def low_rank_sets(self) -> list[LowRankExperts]:
        return [s for s in (self.expert_deltas, self.fusion_lora) if s is not None]

    def expert_sq_norms(self) -> torch.Tensor:
        """[E] squared norms of the effective weights without forming them (the released-code penalty).

        ``||W + B A||^2 = ||W||^2 + 2 <B, W A^T> + <B^T B, A A^T>`` with the low-rank factors of the upcycled delta
        and of the fusion LoRA stacked (scales folded into B): a few rank-r products per step instead of three full
        copies of every FFN."""
        total = torch.zeros(self.num_experts, dtype=torch.float32, device=self.base_gate_proj.device)
        for p in PROJECTIONS:
            base = getattr(self, f"base_{p}").float()
            factors = [
                (low_rank.A[p].float(), low_rank.B[p].float() * low_rank.scale)
                for low_rank in self.low_rank_sets()
                if p in low_rank.A
            ]
            total = total + base.pow(2).sum()
            if factors:
                a = torch.cat([f[0] for f in factors], dim=1)  # [E, R, in]
                b = torch.cat([f[1] for f in factors], dim=2)  # [E, out, R]
                cross = (b * torch.einsum("oi,eri->eor", base, a)).sum(dim=(1, 2))
                gram = (b.transpose(1, 2) @ b * (a @ a.transpose(1, 2))).sum(dim=(1, 2))
                total = total + 2 * cross + gram
        return total

    def _merge(self, lora: LowRankExperts) -> None:
        deltas = self.expert_deltas
        for p in lora.targets:
            a = torch.cat([deltas.A[p], lora.A[p].to(deltas.A[p])], dim=1)
            b = torch.cat([deltas.B[p], (lora.B[p] * lora.scale).to(deltas.B[p])], dim=2)
            deltas.A[p] = nn.Parameter(a, requires_grad=False)
            deltas.B[p] = nn.Parameter(b, requires_grad=False)

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, storage=delta, rank={self.expert_deltas.rank}"


def materialised_copy(experts: FusionExperts, config) -> MaterialisedExperts:  # noqa: ANN001
    """Mixtral's experts holding `experts`' effective weights (fusion LoRA merged in): the form that is exported."""
    ref = experts.expert_weight("down_proj")
    out = MaterialisedExperts(config).to(device=ref.device, dtype=ref.dtype)
    with torch.no_grad():
        w = {p: experts.expert_weight(p).detach() for p in PROJECTIONS}
        out.gate_up_proj.copy_(torch.cat([w["gate_proj"], w["up_proj"]], dim=1))
        out.down_proj.copy_(w["down_proj"])
    return out
