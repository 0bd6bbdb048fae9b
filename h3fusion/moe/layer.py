"""The MoE feed-forward layer that replaces a Llama MLP (book: method.md).

Routing is exactly Mixtral's, so a fused model exports to a standard `MixtralForCausalLM`:
``p = softmax(W_g h)`` (in float32), ``S = top-k(p)``, ``p~_i = p_i / sum_{j in S} p_j``,
``MoE(h) = sum_{i in S} p~_i E_i(h)``, ``E_i(h) = W_down_i (silu(W_gate_i h) * W_up_i h)``.

Two storages of the same function (`storage`):

* ``materialised``: full per-expert weights ``gate_proj``/``up_proj`` [E, f, d] and ``down_proj``
  [E, d, f], as the paper. Each expert is its own slice of a packed tensor (no two experts share
  memory; the released code aliased them).
* ``delta``: ONE shared, frozen base FFN (``base_gate_proj`` ...) plus each expert's low-rank delta
  kept factored (`expert_deltas`, the scale alpha/r folded into B). The base gate/up matmuls run
  once for all tokens; because the down projection is linear, the base down matmul also runs once
  on the routing-weighted mix of the experts' activations. Per expert only rank-r products and the
  elementwise SwiGLU are computed, on the tokens routed to it.

Fusion-stage training (book: method.md) adds a second, trainable set of per-expert LoRA factors
(`add_fusion_lora`, stored in `fusion_lora`, B initialised to zero so the function is unchanged at
init) in both storages; `merge_fusion_lora` folds them into the expert weights (materialised) or
appends them to the factored deltas (delta: ranks concatenate, exact). The drift of expert i is
``(alpha/r) B_i A_i`` per projection, exposed by `fusion_factors` for `losses.drift_loss`.

The forward returns the hidden states (so the layer drops into any HF decoder layer) and keeps the
router logits of its last call in `last_router_logits` ([tokens, E], tokens = B*T flattened);
`MoECausalLM.forward` collects them into its output right after the inner forward (no hooks).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from h3fusion.errors import ModelError
from h3fusion.moe.delta_path import DeltaPath
from h3fusion.moe.low_rank import PROJECTIONS, LowRankExperts, check_top_k, projection_shapes

Storage = Literal["delta", "materialised"]


class MoEFeedForward(DeltaPath, nn.Module):
    """A top-k MoE SwiGLU FFN with any number of experts; drop-in for a Llama `mlp` module.

    Build it with `upcycle` (h3fusion.moe.upcycle) or `from_mixtral_block`; the constructor makes
    zero-filled tensors of the right shapes.
    """

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_experts: int,
        top_k: int,
        storage: Storage = "delta",
        delta_rank: int = 1,
        hidden_act: str = "silu",
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if storage not in ("delta", "materialised"):
            raise ModelError(
                f"unknown MoE storage {storage!r}; use 'delta' or 'materialised' (profile key `fusion.storage`)"
            )
        check_top_k(top_k, num_experts)
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.num_experts, self.top_k, self.storage = num_experts, top_k, storage
        self.hidden_act = hidden_act
        self.act_fn = ACT2FN[hidden_act]
        self.router = nn.Linear(hidden_size, num_experts, bias=False, dtype=dtype, device=device)
        shapes = projection_shapes(hidden_size, intermediate_size)
        if storage == "materialised":
            for p, (out_f, in_f) in shapes.items():
                self.register_parameter(
                    p,
                    nn.Parameter(
                        torch.zeros(num_experts, out_f, in_f, dtype=dtype, device=device), requires_grad=False
                    ),
                )
            self.expert_deltas: LowRankExperts | None = None
        else:
            for p, (out_f, in_f) in shapes.items():
                self.register_parameter(
                    f"base_{p}",
                    nn.Parameter(torch.zeros(out_f, in_f, dtype=dtype, device=device), requires_grad=False),
                )
            self.expert_deltas = LowRankExperts(num_experts, delta_rank, shapes, dtype=dtype, device=device)
            self.expert_deltas.requires_grad_(False)
        self.fusion_lora: LowRankExperts | None = None
        self.forced_expert: int | None = None
        """When set, every token goes to this expert with weight 1 (analysis, tests); logits still computed."""
        self.last_router_logits: torch.Tensor | None = None
        self._stack_cache: dict = {}  # stacked rank-r factors for inference (see `_stack`)

    # ----------------------------------------------------------------- routing
    def route(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router logits [N, E], renormalised top-k weights [N, k] (float32) and expert indices [N, k]."""
        logits = self.router(h)
        if self.forced_expert is not None:
            idx = torch.full((h.shape[0], 1), self.forced_expert, dtype=torch.long, device=h.device)
            return logits, torch.ones(idx.shape, dtype=torch.float32, device=h.device), idx
        probs = F.softmax(logits.float(), dim=-1)
        weights, idx = torch.topk(probs, self.top_k, dim=-1)
        return logits, weights / weights.sum(dim=-1, keepdim=True), idx

    def _assignments(self, idx: torch.Tensor) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """(expert, token positions, slot positions) for every expert that received tokens."""
        for e in range(self.num_experts):
            tok, slot = torch.where(idx == e)
            if tok.numel():
                yield e, tok, slot

    # ----------------------------------------------------------------- forward
    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        h = hidden_states.reshape(-1, shape[-1])
        logits, weights, idx = self.route(h)
        self.last_router_logits = logits
        out = (
            self._forward_materialised(h, weights, idx)
            if self.storage == "materialised"
            else self._forward_delta(h, weights, idx)
        )
        return out.reshape(shape)

    def _lora(
        self, proj: str, x: torch.Tensor, e: int, sets: Sequence[LowRankExperts | None]
    ) -> torch.Tensor | int:
        total: torch.Tensor | int = 0
        for s in sets:
            if s is not None:
                d = s.delta_of(proj, x, e)
                if d is not None:
                    total = total + d
        return total

    def _forward_materialised(
        self, h: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor
    ) -> torch.Tensor:
        out = torch.zeros_like(h)
        sets = (self.fusion_lora,)
        for e, tok, slot in self._assignments(idx):
            x = h[tok]
            gate = x @ self.gate_proj[e].T + self._lora("gate_proj", x, e, sets)
            up = x @ self.up_proj[e].T + self._lora("up_proj", x, e, sets)
            act = self.act_fn(gate) * up
            y = act @ self.down_proj[e].T + self._lora("down_proj", act, e, sets)
            out.index_add_(0, tok, (y * weights[tok, slot, None]).to(out.dtype))
        return out

    # ----------------------------------------------------------------- weights
    def expert_weight(self, proj: str) -> torch.Tensor:
        """Effective weights [E, out, in] of one projection, fusion LoRA included (differentiable)."""
        if self.storage == "materialised":
            w = getattr(self, proj)
            extras = []
        else:
            w = getattr(self, f"base_{proj}").unsqueeze(0).expand(self.num_experts, -1, -1)
            assert self.expert_deltas is not None
            extras = [self.expert_deltas.dense(proj)]
        if self.fusion_lora is not None:
            extras.append(self.fusion_lora.dense(proj))
        extras = [x for x in extras if x is not None]
        if not extras:
            return w
        # sum in float32 so that bf16 bases lose no more than one rounding
        return (w.float() + sum(x.float() for x in extras)).to(w.dtype)

    def expert_weights(self) -> dict[str, torch.Tensor]:
        return {p: self.expert_weight(p) for p in PROJECTIONS}

    def expert_sq_norms(self) -> torch.Tensor:
        """[E] squared Frobenius norms of each expert's effective weights, all projections summed (differentiable).

        Delta storage: ``||W + B A||^2 = ||W||^2 + 2 <B, W A^T> + <B^T B, A A^T>`` with the low-rank factors of the
        upcycled delta and of the fusion LoRA stacked (scales folded into B), so no [E, out, in] tensor is formed:
        the released code's weight-norm penalty at the cost of a few rank-r products instead of three full copies
        of every FFN per step."""
        if self.storage == "materialised":
            return sum(w.float().pow(2).sum(dim=(1, 2)) for w in self.expert_weights().values())  # type: ignore[return-value]
        total = torch.zeros(self.num_experts, dtype=torch.float32, device=self.router.weight.device)
        for p in PROJECTIONS:
            base = getattr(self, f"base_{p}").float()
            factors = []
            for low_rank in (self.expert_deltas, self.fusion_lora):
                if low_rank is not None and p in low_rank.A:
                    factors.append((low_rank.A[p].float(), low_rank.B[p].float() * low_rank.scale))
            total = total + base.pow(2).sum()
            if factors:
                a = torch.cat([f[0] for f in factors], dim=1)  # [E, R, in]
                b = torch.cat([f[1] for f in factors], dim=2)  # [E, out, R]
                cross = (b * torch.einsum("oi,eri->eor", base, a)).sum(dim=(1, 2))
                gram = (b.transpose(1, 2) @ b * (a @ a.transpose(1, 2))).sum(dim=(1, 2))
                total = total + 2 * cross + gram
        return total

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
            raise ModelError("this MoE layer already has fusion LoRA factors; call merge_fusion_lora() first")
        ref = self.router.weight
        lora = LowRankExperts(
            self.num_experts,
            rank,
            projection_shapes(self.hidden_size, self.intermediate_size),
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
        lora = self.fusion_lora
        if lora is None:
            return
        if self.storage == "materialised":
            for p in lora.targets:
                w = getattr(self, p)
                w.copy_((w.float() + lora.dense(p).float()).to(w.dtype))
        else:
            deltas = self.expert_deltas
            assert deltas is not None
            for p in lora.targets:
                a = torch.cat([deltas.A[p], lora.A[p].to(deltas.A[p])], dim=1)
                b = torch.cat([deltas.B[p], (lora.B[p] * lora.scale).to(deltas.B[p])], dim=2)
                deltas.A[p] = nn.Parameter(a, requires_grad=False)
                deltas.B[p] = nn.Parameter(b, requires_grad=False)
        self.fusion_lora = None
        self._stack_cache.clear()

    @torch.no_grad()
    def to_materialised(self) -> MoEFeedForward:
        """A materialised copy of this layer (fusion LoRA merged in); used by export."""
        ref = self.router.weight
        out = MoEFeedForward(
            self.hidden_size,
            self.intermediate_size,
            self.num_experts,
            self.top_k,
            "materialised",
            hidden_act=self.hidden_act,
            dtype=ref.dtype,
            device=ref.device,
        )
        out.router.weight.copy_(self.router.weight)
        for p in PROJECTIONS:
            getattr(out, p).copy_(self.expert_weight(p))
        return out

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, top_k={self.top_k}, storage={self.storage}"
