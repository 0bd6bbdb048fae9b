"""`h3fusion bench` sections 1 and 2: the MoE FFN layer against the dense FFN (forward, forward+backward) at
SmolLM2-135M and LLaMA-2-7B widths, and the fused model's parameter bytes against its dense base."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from h3fusion.bench_common import (
    LAYER_SHAPES,
    MODEL_CONFIGS,
    Plan,
    fuse_random,
    interleaved_medians,
    random_adapters,
)
from h3fusion.config import Profile


class _Mlp(nn.Module):
    """transformers' LlamaMLP (the dense FFN) with given weights."""

    def __init__(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> None:
        from transformers import LlamaConfig
        from transformers.models.llama.modeling_llama import LlamaMLP

        super().__init__()
        cfg = LlamaConfig(hidden_size=gate.shape[1], intermediate_size=gate.shape[0], hidden_act="silu")
        with torch.device("meta"):
            self.mlp = LlamaMLP(cfg)
        for name, w in (("gate_proj", gate), ("up_proj", up), ("down_proj", down)):
            getattr(self.mlp, name).weight = nn.Parameter(w, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


def _ffn_pair(
    hidden: int, ffn: int, profile: Profile, seed: int
) -> tuple[dict[str, torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """Random base FFN weights, per-expert rank-r deltas (A, B) for each projection, a router weight."""
    from h3fusion.moe.low_rank import projection_shapes

    gen = torch.Generator().manual_seed(seed)
    num, r = profile.num_experts, profile.experts.lora.r
    shapes = projection_shapes(hidden, ffn)
    base = {p: torch.randn(shape, generator=gen) / math.sqrt(shape[1]) for p, shape in shapes.items()}
    deltas = [torch.randn(num, r, shapes[p][1], generator=gen) / math.sqrt(shapes[p][1]) for p in shapes] + [
        torch.randn(num, shapes[p][0], r, generator=gen) * 0.01 for p in shapes
    ]
    router = torch.randn(num, hidden, generator=gen) * 0.02
    return base, deltas, router


def _moe_layer(
    storage: str,
    base: dict[str, torch.Tensor],
    deltas: list[torch.Tensor],
    router: torch.Tensor,
    profile: Profile,
) -> nn.Module:
    """An upcycled Mixtral MoE block sharing the dense base tensors (delta) or holding base + delta (materialised)."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    from h3fusion.moe import PROJECTIONS, DeltaExperts, MaterialisedExperts

    f, d = base["gate_proj"].shape
    num, r = router.shape[0], deltas[0].shape[1]
    cfg = MixtralConfig(
        hidden_size=d,
        intermediate_size=f,
        num_local_experts=num,
        num_experts_per_tok=profile.fusion.top_k,
        router_jitter_noise=0.0,
        experts_implementation="eager",  # what a model would set; a standalone block has no model to set it
    )
    with torch.device("meta"):
        block = MixtralSparseMoeBlock(cfg)
    block.gate.weight = nn.Parameter(router.clone())
    a_of, b_of = (
        dict(zip(PROJECTIONS, deltas[:3], strict=True)),
        dict(zip(PROJECTIONS, deltas[3:], strict=True)),
    )
    with torch.no_grad():
        if storage == "delta":
            experts = DeltaExperts(d, f, num, r)
            for p in PROJECTIONS:
                experts.register_parameter(f"base_{p}", nn.Parameter(base[p], requires_grad=False))
                experts.expert_deltas.A[p].copy_(a_of[p])
                experts.expert_deltas.B[p].copy_(b_of[p])
        else:
            with torch.device("meta"):
                experts = MaterialisedExperts(cfg)
            w = {p: base[p] + torch.bmm(b_of[p], a_of[p]) for p in PROJECTIONS}
            experts.gate_up_proj = nn.Parameter(
                torch.cat([w["gate_proj"], w["up_proj"]], 1), requires_grad=False
            )
            experts.down_proj = nn.Parameter(w["down_proj"], requires_grad=False)
    block.experts = experts
    return block


def _train_setting(module: nn.Module, profile: Profile, dense: bool) -> nn.Module:
    """Fusion training (MoE: fusion LoRA + router trainable) or dense LoRA training (peft LoRA on the FFN)."""
    lora = profile.fusion.lora
    # a copy that shares the frozen weight tensors (peft wraps Linear modules in place)
    module = copy.deepcopy(module, memo={id(p): p for p in module.parameters() if not p.requires_grad})
    if dense:
        from peft import LoraConfig, inject_adapter_in_model

        module.requires_grad_(False)
        cfg = LoraConfig(r=lora.r, lora_alpha=lora.alpha, target_modules=list(lora.target_modules))
        inject_adapter_in_model(cfg, module)
        for name, p in module.named_parameters():
            p.requires_grad_("lora_" in name)
        return module
    module.experts.add_fusion_lora(lora.r, lora.alpha, lora.target_modules)
    module.requires_grad_(False)
    module.gate.requires_grad_(True)
    module.experts.fusion_lora.requires_grad_(True)
    return module


def _fwd(module: nn.Module, x: torch.Tensor) -> Callable[[], Any]:
    def run() -> None:
        with torch.no_grad():
            module(x)

    return run


def _fwd_bwd(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> Callable[[], Any]:
    params = [p for p in module.parameters() if p.requires_grad]

    def run() -> None:
        for p in (*params, x):
            p.grad = None
        module(x).backward(grad)

    return run


def bench_ffn(profile: Profile, plan: Plan) -> list[dict[str, Any]]:
    """MoE FFN (delta, materialised) vs dense FFN, fwd and fwd+bwd, at each layer shape."""
    rows = []
    for shape_name, (hidden, ffn) in LAYER_SHAPES.items():
        tokens = plan.tokens[shape_name] or profile.fusion.train.batch_size * profile.data.max_length
        base, deltas, router = _ffn_pair(hidden, ffn, profile, profile.seed)
        dense = _Mlp(base["gate_proj"], base["up_proj"], base["down_proj"])
        moes = {s: _moe_layer(s, base, deltas, router, profile) for s in ("delta", "materialised")}
        gen = torch.Generator().manual_seed(profile.seed + 1)
        x = torch.randn(1, tokens, hidden, generator=gen)
        x_grad = x.clone().requires_grad_(True)
        grad = torch.randn(1, tokens, hidden, generator=gen)
        fwd = interleaved_medians(
            {"dense": _fwd(dense, x), **{s: _fwd(m, x) for s, m in moes.items()}},
            plan.warmup,
            plan.repeats,
            f"FFN {shape_name} fwd",
        )
        trained = {"dense": _train_setting(dense, profile, dense=True)}
        trained.update({s: _train_setting(m, profile, dense=False) for s, m in moes.items()})
        fwd_bwd = interleaved_medians(
            {n: _fwd_bwd(m, x_grad, grad) for n, m in trained.items()},
            plan.warmup,
            plan.repeats,
            f"FFN {shape_name} fwd+bwd",
        )
        for mode, med in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
            for storage in moes:
                rows.append(
                    {
                        "shape": shape_name,
                        "hidden": hidden,
                        "ffn": ffn,
                        "tokens": tokens,
                        "experts": router.shape[0],
                        "top_k": profile.fusion.top_k,
                        "storage": storage,
                        "mode": mode,
                        "dense_ms": 1e3 * med["dense"],
                        "moe_ms": 1e3 * med[storage],
                        "ratio": med[storage] / med["dense"],
                    }
                )
        del dense, moes, trained, base, deltas
    return rows


def _param_bytes(model: nn.Module) -> int:
    """Bytes of the distinct parameters and buffers (shared tensors counted once; works on meta)."""
    seen: dict[int, int] = {}
    for t in (*model.parameters(), *model.buffers()):
        seen.setdefault(id(t), t.numel() * t.element_size())
    return sum(seen.values())


def bench_params(profile: Profile, configs: dict[str, Any]) -> list[dict[str, Any]]:
    """Parameter bytes of the fused model in both storages vs the dense base, on the meta device."""
    from transformers import AutoModelForCausalLM

    rows = []
    for name, config in configs.items():
        with torch.device("meta"):
            dense = AutoModelForCausalLM.from_config(config)
        dense_bytes = _param_bytes(dense)
        adapters = random_adapters(config, profile.num_experts, profile.experts.lora.r)
        for storage in ("delta", "materialised"):
            with torch.device("meta"):
                fused = fuse_random(copy.deepcopy(dense), profile, storage, adapters)
            fused_bytes = _param_bytes(fused)
            rows.append(
                {
                    "model": name,
                    "storage": storage,
                    "dense_gb": dense_bytes / 1e9,
                    "fused_gb": fused_bytes / 1e9,
                    "ratio": fused_bytes / dense_bytes,
                }
            )
    return rows


def param_configs() -> dict[str, Any]:
    """The whole-model configs whose parameter bytes are counted (on meta: instant at any size)."""
    from transformers import LlamaConfig

    return {name: LlamaConfig(**cfg) for name, cfg in MODEL_CONFIGS.items()}
