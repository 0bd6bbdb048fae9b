"""The delta storage's forward pass (`DeltaExperts`; book: method.md).

One shared, frozen base FFN plus each expert's low-rank delta kept factored: the base gate/up matmuls run once for
all tokens, the base down matmul once on the routing-weighted mix of the experts' activations, and per expert only
rank-r products and the element-wise SwiGLU are computed (`DeltaPath._forward_delta`). Kept apart from the experts'
construction and weight bookkeeping (`h3fusion.moe.experts`), which it is mixed into.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from h3fusion.moe.low_rank import PROJECTIONS, LowRankExperts
from h3fusion.moe.swiglu_mix import expert_order, swiglu_mix

if TYPE_CHECKING:
    from collections.abc import Callable


def _add_masked(
    base: torch.Tensor,
    low: tuple[torch.Tensor, torch.Tensor] | None,
    mask: torch.Tensor,
    reuse: bool,
    fresh: bool,
) -> torch.Tensor:
    """``base + (z * mask) @ b`` for one routing slot.

    reuse: add into `base` in place (its last use); fresh: the result must not alias `base` (the caller
    modifies it in place), so an unchanged `base` is cloned unless it may be reused.
    """
    if low is None:
        return base.clone() if fresh and not reuse else base
    codes = (low[0] * mask).flatten(1)
    return base.addmm_(codes, low[1]) if reuse else torch.addmm(base, codes, low[1])


class DeltaPath:
    """The delta storage's forward, mixed into `DeltaExperts` (which owns the attributes read here: the base
    weights ``base_<proj>``, `low_rank_sets` (the experts' deltas and the fusion LoRA), `num_experts`, `hidden_act`,
    `act_fn`, `training` and the inference cache `_stack_cache`)."""

    num_experts: int
    hidden_act: str
    act_fn: Callable[[torch.Tensor], torch.Tensor]
    training: bool
    low_rank_sets: Callable[[], list[LowRankExperts]]
    base_gate_proj: torch.Tensor
    base_up_proj: torch.Tensor
    base_down_proj: torch.Tensor
    _stack_cache: dict

    def _sets(self, proj: str) -> list[LowRankExperts]:
        return [s for s in self.low_rank_sets() if proj in s.A]

    def _stack(self, projs: tuple[str, ...]) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """All experts' and sets' rank-r factors of `projs` stacked for one matmul.

        Returns ``a`` [sum_p E*R_p, in] (per projection: expert-major, each expert's ranks of every set
        concatenated) and per projection ``b`` [E*R_p, out] (``scale * B_e^T`` in the same order, None
        when no set targets it), so that ``(((x @ a.T)[:, block p] * mask)) @ b_p`` is
        ``sum_e mask[n, e] * delta_e(x_n)``. Cached while no gradient is recorded and no factor changed
        (generation calls it once per token and layer).
        """
        sets = {p: self._sets(p) for p in projs}
        tensors = [t for p in projs for st in sets[p] for t in (st.A[p], st.B[p])]
        version = tuple((id(t), t._version, t.data_ptr(), t.dtype, t.device) for t in tensors)
        cached = self._stack_cache.get(projs)
        if not torch.is_grad_enabled() and cached is not None and cached[0] == version:
            return cached[1]
        a_parts: list[torch.Tensor] = []
        b_parts: list[torch.Tensor | None] = []
        for p in projs:
            if not sets[p]:
                b_parts.append(None)
                continue
            a_parts.append(torch.cat([st.A[p] for st in sets[p]], dim=1).flatten(0, 1))
            b_parts.append(
                torch.cat([st.B[p].transpose(1, 2) * st.scale for st in sets[p]], dim=1).flatten(0, 1)
            )
        a = torch.cat(a_parts) if a_parts else self.base_gate_proj.new_empty(0, 0)
        if not torch.is_grad_enabled():
            self._stack_cache[projs] = (version, (a, b_parts))
        return a, b_parts

    def _codes(
        self, projs: tuple[str, ...], x: torch.Tensor
    ) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """Per projection, ``(z [N, E, R], b [E*R, out])`` with ``z[n, e] = A_e x_n`` of every set (None if untargeted).

        One matmul for all `projs` (they share the input x), unless a set applies dropout to its input.
        """
        num = self.num_experts
        if self.training and any(
            not isinstance(st.dropout, nn.Identity) for p in projs for st in self._sets(p)
        ):  # each set sees its own dropout of x
            out: list[tuple[torch.Tensor, torch.Tensor] | None] = []
            for p in projs:
                sets = self._sets(p)
                if not sets:
                    out.append(None)
                    continue
                z = torch.cat(
                    [(st.dropout(x) @ st.A[p].flatten(0, 1).T).unflatten(1, (num, -1)) for st in sets], dim=2
                )
                b = torch.cat([st.B[p].transpose(1, 2) * st.scale for st in sets], dim=1).flatten(0, 1)
                out.append((z, b))
            return out
        a, bs = self._stack(projs)
        z_all = x @ a.T if a.numel() else None
        out, start = [], 0
        for b in bs:
            if b is None:
                out.append(None)
                continue
            assert z_all is not None
            width = b.shape[0]
            out.append((z_all[:, start : start + width].unflatten(1, (num, -1)), b))
            start += width
        return out

    def _forward_delta(self, h: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Top-k of E experts ``W + D_e`` (D_e = sum of the rank-r sets) at about the cost of ONE dense FFN.

        With ``g0 = W_gate h``, ``u0 = W_up h`` (shared, computed once) and slot s of token n routed
        to expert e = idx[n, s] with weight w = p~[n, s]:

        * ``g_s = g0 + D_gate,e h``, ``u_s = u0 + D_up,e h`` (one addmm per slot; the rank-r codes
          ``A_e h`` of all experts, gate and up, come from ONE matmul with the stacked factors, and the codes
          of the experts a slot did not select are masked to zero: for small E cheaper than gathering
          tokens per expert; the extra inner width E*R is tiny next to d);
        * ``a_s = silu(g_s) * u_s``;
        * ``out = W_down (sum_s w_s a_s) + sum_s w_s D_down,e a_s``: down is linear, so the experts'
          activations are mixed BEFORE one base down matmul, and the down deltas of all slots share one
          rank-code matrix (slots select distinct experts, so their masked codes add without overlap).

        Only k activations of width f per token are formed (the selected experts), no per-expert
        gather/index_add, and the base weights are read by exactly three matmuls, as in the dense FFN.

        Under ``torch.no_grad`` the element-wise steps run in place (fewer passes over [N, f], no new
        buffers); with autograd `_forward_delta_sorted` computes the same (the per-slot ops below remain
        for dropout, other activations and untargeted projections).
        """
        in_place = not torch.is_grad_enabled()
        w = weights.to(h.dtype)
        fast = not in_place and self.hidden_act == "silu" and not self._dropout_active()
        if fast and all(self._sets(p) for p in PROJECTIONS):
            return self._forward_delta_sorted(h, w, idx)
        onehot = F.one_hot(idx, self.num_experts).to(h.dtype)  # [N, k, E]
        gate0 = F.linear(h, self.base_gate_proj)
        up0 = F.linear(h, self.base_up_proj)
        low_gate, low_up = self._codes(("gate_proj", "up_proj"), h)
        mix: torch.Tensor | None = None
        down_codes: torch.Tensor | None = None  # sum_s w_s * mask_s * (A_down a_s), [N, E, R]
        down_b: torch.Tensor | None = None
        k = idx.shape[1]
        for s in range(k):
            mask, ws, last = onehot[:, s, :, None], w[:, s, None], s == k - 1
            g = _add_masked(gate0, low_gate, mask, reuse=last, fresh=in_place)
            u = _add_masked(up0, low_up, mask, reuse=last, fresh=False)
            act = (
                F.silu(g, inplace=True).mul_(u)
                if in_place and self.hidden_act == "silu"
                else self.act_fn(g) * u
            )
            (low_down,) = self._codes(("down_proj",), act)
            if low_down is not None:
                codes = low_down[0] * (mask * ws[:, :, None])
                down_codes = codes if down_codes is None else down_codes + codes
                down_b = low_down[1]
            if mix is None:
                mix = act.mul_(ws) if in_place else act * ws
            else:
                mix = mix.addcmul_(act, ws) if in_place else torch.addcmul(mix, act, ws)
        assert mix is not None
        out = F.linear(mix, self.base_down_proj)
        if down_codes is not None:
            out = out.addmm_(down_codes.flatten(1), down_b)
        return out

    def _dropout_active(self) -> bool:
        sets = [st for p in PROJECTIONS for st in self._sets(p)]
        return self.training and any(not isinstance(st.dropout, nn.Identity) for st in sets)

    def _forward_delta_sorted(self, h: torch.Tensor, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """`_forward_delta` with autograd, via `swiglu_mix` on tokens sorted by expert (a gather of
        [N, d], cheap next to the [N, f] work); the output is put back in token order."""
        perm, runs = expert_order(idx, self.num_experts)
        h_s, w_s, idx_s = h[perm], w[perm], idx[perm]
        gate0 = F.linear(h_s, self.base_gate_proj)
        up0 = F.linear(h_s, self.base_up_proj)
        low_gate, low_up = self._codes(("gate_proj", "up_proj"), h_s)
        assert low_gate is not None and low_up is not None
        a_down, (b_down,) = self._stack(("down_proj",))
        assert b_down is not None
        mix, z_down = swiglu_mix(gate0, up0, *low_gate, *low_up, w_s, a_down, runs)
        # sum_s w_s * A_down,e(s) a_s placed in the block of expert e(s) (slots pick distinct experts)
        onehot = F.one_hot(idx_s, self.num_experts).to(h.dtype).transpose(0, 1)  # [k, N, E]
        codes = (onehot[..., None] * (z_down * w_s.T[:, :, None])[:, :, None, :]).sum(0)
        out = torch.addmm(F.linear(mix, self.base_down_proj), codes.flatten(1), b_down)
        return out[torch.argsort(perm)]
