"""Per-expert low-rank deltas ``scale * B_e A_e`` stacked over experts: the factored storage of the aligned
experts' LoRA deltas in a delta-storage MoE layer, and of the fusion LoRA in both storages (book: method.md)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from h3fusion.errors import ModelError

PROJECTIONS: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
"""The three SwiGLU projections, with peft/Llama names."""

def projection_shapes(hidden_size: int, intermediate_size: int) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of each projection, as in `nn.Linear.weight`."""
    return {
        "gate_proj": (intermediate_size, hidden_size),
        "up_proj": (intermediate_size, hidden_size),
        "down_proj": (hidden_size, intermediate_size),
    }


def check_top_k(top_k: int, num_experts: int) -> None:
    if not 1 <= top_k <= num_experts:
        raise ModelError(
            f"top_k = {top_k} is impossible with {num_experts} expert(s); use a top_k between 1 and "
            f"{num_experts} (profile key `fusion.top_k`)"
        )


class LowRankExperts(nn.Module):
    """Per-expert low-rank deltas ``scale * B_e A_e`` for some of the projections.

    ``A[p]`` is [E, r, in], ``B[p]`` is [E, out, r] (peft's lora_A / lora_B stacked over experts).
    """

    def __init__(
        self,
        num_experts: int,
        rank: int,
        shapes: dict[str, tuple[int, int]],
        targets: Sequence[str] = PROJECTIONS,
        scale: float = 1.0,
        dropout: float = 0.0,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        unknown = [t for t in targets if t not in shapes]
        if unknown or not targets:
            raise ModelError(
                f"low-rank expert targets must be a non-empty subset of {list(shapes)}, got {list(targets)}"
            )
        self.num_experts, self.rank, self.scale = num_experts, rank, float(scale)
        self.A = nn.ParameterDict(
            {
                p: nn.Parameter(torch.zeros(num_experts, rank, shapes[p][1], dtype=dtype, device=device))
                for p in targets
            }
        )
        self.B = nn.ParameterDict(
            {
                p: nn.Parameter(torch.zeros(num_experts, shapes[p][0], rank, dtype=dtype, device=device))
                for p in targets
            }
        )
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(self.A.keys())

    def reset_lora(self, generator: torch.Generator | None = None) -> None:
        """peft's default LoRA init: A ~ kaiming-uniform(a=sqrt(5)) = U(+-1/sqrt(in)), B = 0."""
        with torch.no_grad():
            for p in self.targets:
                a = self.A[p]
                bound = 1.0 / math.sqrt(a.shape[-1])
                noise = torch.rand(a.shape, generator=generator, dtype=torch.float32)
                a.copy_(((noise * 2 - 1) * bound).to(a))
                self.B[p].zero_()

    def delta_of(self, proj: str, x: torch.Tensor, expert: int) -> torch.Tensor | None:
        """``scale * B_e A_e x`` for tokens x [n, in]; None when `proj` is not targeted."""
        if proj not in self.A:
            return None
        z = self.dropout(x) @ self.A[proj][expert].T
        return (z @ self.B[proj][expert].T) * self.scale

    def dense(self, proj: str) -> torch.Tensor | None:
        """The full deltas [E, out, in] of one projection (differentiable)."""
        if proj not in self.A:
            return None
        return torch.bmm(self.B[proj], self.A[proj]) * self.scale

    def factors(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(A, B) per targeted projection, for `losses.drift_loss`."""
        return [(self.A[p], self.B[p]) for p in self.targets]
