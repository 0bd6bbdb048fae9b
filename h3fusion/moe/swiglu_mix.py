"""The rank-r deltas, per-slot SwiGLU and routing mix of the delta MoE as one autograd node (book: method.md).

`DeltaExperts._forward_delta` computes, for the k routing slots of every token (slot s of token n
routed to expert e = idx[n, s] with weight w[n, s]), ``g_s = g0 + B_gate,e z_gate,e``,
``u_s = u0 + B_up,e z_up,e``, ``a_s = silu(g_s) * u_s``, ``mix = sum_s w_s a_s`` and the down codes
``A_down,e a_s``. Written with plain tensor ops, the rank-r products of a slot run over the codes of
ALL experts (the unselected ones masked to zero, inner width E*R) and autograd records one node per op
and slot, each allocating an [N, f] temporary in backward. At small widths both cost as much as the
base matmuls.

Here the tokens come sorted by their experts (`expert_runs`), so that in every slot each expert owns
contiguous row blocks: each block's rank-r products use only its expert's factors (inner width R, a
third of the work for E = 3), and the slots' activations live in one [k, N, f] buffer whose backward
reuses its buffers in place.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

Runs = list[list[tuple[int, int, int]]]
"""Per slot, the (expert, start row, end row) blocks of the sorted tokens."""


def expert_order(idx: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, Runs]:
    """A token permutation sorting ``idx`` [N, k] lexicographically, and the runs of each slot's expert.

    After sorting, ``idx[perm, s]`` is constant on the runs of the key prefix ``idx[:, :s+1]``, so
    every slot splits into at most ``E**(s+1)`` contiguous blocks of one expert each.
    """
    key = torch.zeros_like(idx[:, 0])
    for s in range(idx.shape[1]):
        key = key * num_experts + idx[:, s]
    perm = torch.argsort(key, stable=True)
    runs: Runs = []
    for s in range(idx.shape[1]):
        experts, counts = torch.unique_consecutive(idx[perm, s], return_counts=True)
        ends = counts.cumsum(0).tolist()
        starts = [0, *ends[:-1]]
        runs.append(list(zip(experts.tolist(), starts, ends, strict=True)))
    return perm, runs


class SwiGLUMix(torch.autograd.Function):
    """``(mix, z_down) = swiglu_mix(g0, u0, zg, bg, zu, bu, w, a_down, runs)``; see `swiglu_mix`."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        g0: torch.Tensor,
        u0: torch.Tensor,
        zg: torch.Tensor,
        bg: torch.Tensor,
        zu: torch.Tensor,
        bu: torch.Tensor,
        w: torch.Tensor,
        a_down: torch.Tensor,
        runs: Runs,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        k, (n, f) = len(runs), g0.shape
        rg, ru, rd = zg.shape[2], zu.shape[2], a_down.shape[0] // zg.shape[1]
        g, u = g0.new_empty((k, n, f)), u0.new_empty((k, n, f))
        for s, slot in enumerate(runs):
            for e, i, j in slot:  # one addmm per block writes its rows once
                torch.addmm(g0[i:j], zg[i:j, e], bg[e * rg : (e + 1) * rg], out=g[s, i:j])
                torch.addmm(u0[i:j], zu[i:j, e], bu[e * ru : (e + 1) * ru], out=u[s, i:j])
        acts = F.silu(g).mul_(u)  # silu(g) is recomputed in backward: one [k, N, f] buffer less alive
        mix = acts[0] * w[:, :1]
        for s in range(1, k):
            mix.addcmul_(acts[s], w[:, s : s + 1])
        z_down = g0.new_empty((k, n, rd))
        for s, slot in enumerate(runs):
            for e, i, j in slot:
                torch.mm(acts[s, i:j], a_down[e * rd : (e + 1) * rd].T, out=z_down[s, i:j])
        ctx.save_for_backward(g, u, acts, zg, bg, zu, bu, w, a_down)
        ctx.runs = runs
        ctx.set_materialize_grads(False)
        return mix, z_down

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_mix: torch.Tensor | None, grad_z_down: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, ...]:
        g, u, acts, zg, bg, zu, bu, w, a_down = ctx.saved_tensors
        runs: Runs = ctx.runs
        need = ctx.needs_input_grad
        k, rd = g.shape[0], a_down.shape[0] // zg.shape[1]
        # d(loss)/d(a_s): the down codes' share, then the mix's w_s * grad_mix
        ga = torch.zeros_like(g) if grad_z_down is None else torch.empty_like(g)  # the blocks cover every row
        grad_a_down = torch.zeros_like(a_down) if need[7] and grad_z_down is not None else None
        if grad_z_down is not None:
            grad_z_down = grad_z_down.contiguous()  # autograd may hand an expanded view to BLAS
            for s, slot in enumerate(runs):
                for e, i, j in slot:
                    rows = grad_z_down[s, i:j]
                    torch.mm(rows, a_down[e * rd : (e + 1) * rd], out=ga[s, i:j])
                    if grad_a_down is not None:
                        grad_a_down[e * rd : (e + 1) * rd].addmm_(rows.T, acts[s, i:j])
        grad_w = None
        if grad_mix is not None:
            for s in range(k):
                ga[s].addcmul_(grad_mix, w[:, s : s + 1])
            if need[6]:
                grad_w = torch.stack([(acts[s] * grad_mix).sum(-1) for s in range(k)], dim=1)
        grad_u = F.silu(g).mul_(ga)
        grad_g = torch.ops.aten.silu_backward.grad_input(ga.mul_(u), g, grad_input=ga)  # ga's last use
        g0_grad, zg_grad, bg_grad = _low_rank_grads(grad_g, zg, bg, runs, need[0], need[2], need[3])
        u0_grad, zu_grad, bu_grad = _low_rank_grads(grad_u, zu, bu, runs, need[1], need[4], need[5])
        return g0_grad, u0_grad, zg_grad, bg_grad, zu_grad, bu_grad, grad_w, grad_a_down, None


def _low_rank_grads(
    grad: torch.Tensor,
    z: torch.Tensor,
    b: torch.Tensor,
    runs: Runs,
    need_base: bool,
    need_z: bool,
    need_b: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Grads of ``x0``, ``z`` and ``b`` in ``x_s[rows] = x0[rows] + z[rows, e] @ b_e`` from grad [k, N, f]."""
    r = z.shape[2]
    grad_z = torch.zeros_like(z) if need_z else None
    grad_b = torch.zeros_like(b) if need_b else None
    for s, slot in enumerate(runs):
        for e, i, j in slot:
            rows, b_e = grad[s, i:j], b[e * r : (e + 1) * r]
            if grad_z is not None:  # slots of a token select distinct experts: no two blocks overlap
                grad_z[i:j, e] = rows @ b_e.T
            if grad_b is not None:
                grad_b[e * r : (e + 1) * r].addmm_(z[i:j, e].T, rows)
    return (grad.sum(0) if need_base else None), grad_z, grad_b


def swiglu_mix(
    g0: torch.Tensor,
    u0: torch.Tensor,
    zg: torch.Tensor,
    bg: torch.Tensor,
    zu: torch.Tensor,
    bu: torch.Tensor,
    w: torch.Tensor,
    a_down: torch.Tensor,
    runs: Runs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The routing-weighted SwiGLU activations of k slots, and each slot's down codes.

    Tokens sorted as `expert_order` gives (with its `runs`). g0, u0: [N, f] base gate/up
    pre-activations; zg, zu: [N, E, R] every expert's gate/up codes ``A_e h``; bg, bu: [E*R, f] the
    experts' up-factors (expert-major); w: [N, k] routing weights; a_down: [E*Rd, f]. Returns
    ``mix = sum_s w[:, s] * a_s`` [N, f] and ``z_down[s] = A_down,e a_s`` [k, N, Rd] of the slot's expert,
    with ``a_s = silu(g0 + zg[:, e] @ bg_e) * (u0 + zu[:, e] @ bu_e)``.
    """
    return SwiGLUMix.apply(g0, u0, zg, bg, zu, bu, w, a_down, runs)  # type: ignore[no-any-return]


def swiglu_mix_reference(
    g0: torch.Tensor,
    u0: torch.Tensor,
    zg: torch.Tensor,
    bg: torch.Tensor,
    zu: torch.Tensor,
    bu: torch.Tensor,
    w: torch.Tensor,
    a_down: torch.Tensor,
    idx: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`swiglu_mix` in plain ops on unsorted tokens with their experts idx [N, k] (what its tests compare)."""
    num = zg.shape[1]
    mixes, codes = [], []
    for s in range(idx.shape[1]):
        mask = F.one_hot(idx[:, s], num).to(g0.dtype)[:, :, None]
        act = F.silu(g0 + (zg * mask).flatten(1) @ bg) * (u0 + (zu * mask).flatten(1) @ bu)
        mixes.append(act * w[:, s : s + 1])
        codes.append(((act @ a_down.T).unflatten(1, (num, -1)) * mask).sum(1))
    return torch.stack(mixes).sum(0), torch.stack(codes)
