"""Upcycling: a dense Llama or Mistral base + one LoRA adapter per task -> an MoE model (book: method.md).

Expert i's FFN = base FFN + (lora_alpha / r) * B_i A_i of adapter i, per projection and layer;
attention, embeddings, norms and LM head stay the base's. Every adapter is read and checked
against the base (family, shapes, layers, targets) before any layer is touched, so a wrong folder fails in
milliseconds with a message that says what to do.

The fused model is a `MixtralForCausalLM` (`MoECausalLM`) built on `base_model`'s tensors without a copy (delta
storage also reuses the base FFN tensors): pass ``copy.deepcopy(base)`` to keep using the dense model.

Router init: ``random`` (seeded normal, std = the config's initializer_range, as Mixtral/the paper)
or ``hidden`` (mergekit's hidden gate mode): row i of layer l's router is the unit-normalised mean,
over the non-padding tokens of task i's prompts, of the dense base model's FFN input at layer l.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import MixtralConfig, PretrainedConfig, PreTrainedModel

from h3fusion.errors import ModelError
from h3fusion.moe.experts import DeltaExperts, MaterialisedExperts, Storage, check_storage
from h3fusion.moe.low_rank import PROJECTIONS, check_top_k, projection_shapes
from h3fusion.moe.model import MoECausalLM, check_base_family, decoder_layers, mixtral_on_tensors, moe_config
from h3fusion.progress import progress

_KEY = re.compile(
    r"(?:^|\.)layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.lora_([AB])(?:\.[\w-]+)?\.weight$"
)

Batch = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class ExpertAdapter:
    """One expert's LoRA on the FFN: (layer, projection) -> (A [r, in], B [out, r]) and its scale."""

    name: str
    scale: float
    factors: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = field(repr=False)
    source: str = "<memory>"

    @property
    def rank(self) -> int:
        return max(a.shape[0] for a, _ in self.factors.values())

    def delta(self, layer: int, proj: str) -> torch.Tensor | None:
        """The full delta (alpha/r) B A in float32, or None when this projection was not adapted."""
        ab = self.factors.get((layer, proj))
        if ab is None:
            return None
        a, b = ab
        return (b.float() @ a.float()) * self.scale


def load_adapter(folder: str | Path, name: str | None = None) -> ExpertAdapter:
    """Read a peft LoRA folder (as written by `h3fusion.experts`) into an `ExpertAdapter`."""
    from h3fusion.lora_files import read_lora_folder

    lora = read_lora_folder(folder)
    return adapter_from_state_dict(lora.tensors, lora.scale, name or lora.folder.name, str(lora.folder))


def adapter_from_state_dict(
    state: Mapping[str, torch.Tensor], scale: float, name: str, source: str = "<memory>"
) -> ExpertAdapter:
    """Group peft LoRA keys (saved or in-memory names) by (layer, projection)."""
    parts: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    ignored = []
    for key, tensor in state.items():
        m = _KEY.search(key)
        if m is None:
            if "lora_" in key:
                ignored.append(key)
            continue
        parts.setdefault((int(m.group(1)), m.group(2)), {})[m.group(3)] = tensor
    if not parts:
        raise ModelError(
            f"adapter {source} has no LoRA weights on the FFN projections {list(PROJECTIONS)}; the experts must "
            "target gate_proj/up_proj/down_proj (profile key `experts.lora.target_modules`)"
        )
    if ignored:
        warnings.warn(
            f"adapter {source}: {len(ignored)} LoRA tensors outside the FFN (e.g. {ignored[0]}) are ignored; "
            "the experts share the base attention",
            stacklevel=2,
        )
    factors = {}
    for (layer, proj), ab in parts.items():
        if set(ab) != {"A", "B"}:
            raise ModelError(
                f"adapter {source}: layer {layer} {proj} has lora_{next(iter(ab))} without its partner"
            )
        factors[(layer, proj)] = (ab["A"], ab["B"])
    return ExpertAdapter(name=name, scale=scale, factors=factors, source=source)


def unscaled(adapter: ExpertAdapter) -> ExpertAdapter:
    """The adapter without LoRA's alpha / r scale: delta = B A (the released code's upcycling)."""
    return ExpertAdapter(adapter.name, 1.0, dict(adapter.factors), adapter.source)


def aliased(adapters: Sequence[ExpertAdapter]) -> list[ExpertAdapter]:
    """The released code's aliased experts: every expert is the base plus the sum of all adapters' deltas.

    The sum is one rank-(sum of ranks) adapter: A stacked, B concatenated with each adapter's scale folded in,
    so that sum_j s_j B_j A_j = [s_1 B_1 ... s_n B_n] [A_1; ...; A_n] exactly. Each expert gets that adapter
    under its own name."""
    keys = sorted({k for a in adapters for k in a.factors})
    summed = {}
    for key in keys:
        parts = [(a.factors[key], a.scale) for a in adapters if key in a.factors]
        summed[key] = (
            torch.cat([ab[0].float() for ab, _ in parts], dim=0),
            torch.cat([ab[1].float() * scale for ab, scale in parts], dim=1),
        )
    return [ExpertAdapter(a.name, 1.0, summed, f"{a.source} (aliased: sum of all experts)") for a in adapters]


def check_adapters(cfg: PretrainedConfig, adapters: Sequence[ExpertAdapter]) -> None:
    """Every adapter must fit the base of config `cfg`: layer indices and (out, in) shapes of each projection."""
    shapes = projection_shapes(cfg.hidden_size, cfg.intermediate_size)
    for ad in adapters:
        for (layer, proj), (a, b) in ad.factors.items():
            out_f, in_f = shapes[proj]
            if layer >= cfg.num_hidden_layers:
                raise ModelError(
                    f"adapter {ad.source} adapts layer {layer}, but the base model has {cfg.num_hidden_layers} layers; "
                    "it was trained on another base model: retrain the experts on this base (`h3fusion align`)"
                )
            if (
                a.ndim != 2
                or b.ndim != 2
                or a.shape[1] != in_f
                or b.shape[0] != out_f
                or a.shape[0] != b.shape[1]
            ):
                raise ModelError(
                    f"adapter {ad.source}: layer {layer} {proj} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, "
                    f"which do not fit the base's {proj} (out {out_f}, in {in_f}); it was trained on another base "
                    "model: retrain the experts on this base (`h3fusion align`) or set `model.base` to the experts' base"
                )


def _check_base(base_model: PreTrainedModel) -> None:
    check_base_family(base_model.config)
    for layer in decoder_layers(base_model):
        mlp = getattr(layer, "mlp", None)
        if mlp is None or not all(hasattr(mlp, p) for p in PROJECTIONS):
            raise ModelError(
                f"{type(base_model).__name__}'s MLP ({type(mlp).__name__}) is not a gated SwiGLU with "
                "gate_proj/up_proj/down_proj; upcycling supports Llama and Mistral models"
            )


# ------------------------------------------------------------------ router init
class _InputRecorder(nn.Module):
    """Wraps a dense MLP for the `hidden` router init: keeps its last input, returns its output."""

    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        self.mlp = mlp
        self.last_input: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.last_input = x
        return self.mlp(x)


@torch.no_grad()
def hidden_router_weights(
    base_model: PreTrainedModel, batches_per_expert: Sequence[Iterable[Batch]], show_progress: bool = True
) -> list[torch.Tensor]:
    """Per layer, an [E, d] router weight: unit-normalised mean FFN input of each expert's prompts.

    `batches_per_expert[i]` yields dicts with ``input_ids`` [B, T] and optionally ``attention_mask``.
    """
    layers = decoder_layers(base_model)
    recorders = [_InputRecorder(layer.mlp) for layer in layers]
    device = next(base_model.parameters()).device
    rows: list[list[torch.Tensor]] = [[] for _ in layers]
    was_training = base_model.training
    base_model.eval()
    for layer, rec in zip(layers, recorders, strict=True):
        layer.mlp = rec
    try:
        for i, batches in enumerate(batches_per_expert):
            sums = [torch.zeros(base_model.config.hidden_size, dtype=torch.float64) for _ in layers]
            count = 0.0
            for batch in progress(batches, desc=f"router init: expert {i}", show=show_progress, leave=False):
                ids = batch["input_ids"].to(device)
                mask = batch.get("attention_mask")
                mask = torch.ones_like(ids) if mask is None else mask.to(device)
                base_model(input_ids=ids, attention_mask=mask)
                m = mask.unsqueeze(-1).double()
                for s, rec in zip(sums, recorders, strict=True):
                    assert rec.last_input is not None
                    s += (rec.last_input.double() * m).sum(dim=(0, 1)).cpu()
                count += float(mask.sum())
            if count == 0:
                raise ModelError(
                    f"router init `hidden`: expert {i} got no prompt tokens; pass non-empty batches"
                )
            for layer_rows, s in zip(rows, sums, strict=True):
                mean = s / count
                layer_rows.append(mean / mean.norm().clamp_min(1e-12))
    finally:
        for layer, rec in zip(layers, recorders, strict=True):
            layer.mlp = rec.mlp
        base_model.train(was_training)
    return [torch.stack(r).float() for r in rows]


def random_router_weights(
    num_layers: int, num_experts: int, hidden_size: int, std: float, seed: int
) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(num_experts, hidden_size, generator=generator) * std for _ in range(num_layers)]


# ----------------------------------------------------------------------- upcycle
def delta_experts(
    mlp: nn.Module, layer_idx: int, adapters: Sequence[ExpertAdapter], hidden_act: str
) -> DeltaExperts:
    """The base FFN's own tensors (no copy) and every adapter's factors, scale folded into B."""
    f, d = mlp.gate_proj.weight.shape
    ref = mlp.gate_proj.weight
    rank = max(1, max((ad.rank for ad in adapters), default=1))
    experts = DeltaExperts(d, f, len(adapters), rank, hidden_act, dtype=ref.dtype, device=ref.device)
    for p in PROJECTIONS:
        experts.register_parameter(
            f"base_{p}", nn.Parameter(getattr(mlp, p).weight.detach(), requires_grad=False)
        )
    with torch.no_grad():
        for e, ad in enumerate(adapters):
            for p in PROJECTIONS:
                ab = ad.factors.get((layer_idx, p))
                if ab is None:
                    continue
                a, b = ab
                r = a.shape[0]  # ranks may differ across experts: zero padding is exact
                experts.expert_deltas.A[p][e, :r].copy_(a)
                experts.expert_deltas.B[p][e, :, :r].copy_(b.float() * ad.scale)
    return experts


def _materialised_experts(
    mlp: nn.Module, layer_idx: int, adapters: Sequence[ExpertAdapter], config: MixtralConfig
) -> MaterialisedExperts:
    """Mixtral's experts, expert i = base + adapter i's delta, each in its own slice (experts never alias)."""
    ref = mlp.gate_proj.weight
    with torch.device(ref.device):
        experts = MaterialisedExperts(config).to(ref.dtype)
    with torch.no_grad():
        for p in PROJECTIONS:
            base = getattr(mlp, p).weight
            target = experts.stored_weight(p)
            for e, ad in enumerate(adapters):
                delta = ad.delta(layer_idx, p)
                target[e].copy_(base.float() + delta.to(ref.device) if delta is not None else base)
    return experts


def _mixtral_shell(base_model: PreTrainedModel, config: MixtralConfig) -> MoECausalLM:
    """An `MoECausalLM` holding the base's attention, norms, embeddings and LM head (the same tensors, no copy)."""
    state = {k: v for k, v in base_model.state_dict().items() if ".mlp." not in k}
    moe, missing, unexpected = mixtral_on_tensors(MoECausalLM, config, state, base_model)
    tied = config.tie_word_embeddings
    if unexpected or any(".mlp." not in k and not (tied and k == "lm_head.weight") for k in missing):
        raise ModelError(
            f"the base model's weights do not map onto a Mixtral (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}); report this with the base model's config.json"
        )
    return moe.train(base_model.training)


@torch.no_grad()
def _check_shell(base_model: PreTrainedModel, moe: MoECausalLM) -> None:
    """The Mixtral around the base's tensors, with the base's own MLPs in place of the MoE blocks, must give the
    base's logits: a family whose norms, embeddings or attention Mixtral computes differently is caught here."""
    from h3fusion.moe.export import logit_gap

    layers = decoder_layers(moe)
    blocks = [layer.mlp for layer in layers]
    for layer, dense in zip(layers, decoder_layers(base_model), strict=True):
        layer.mlp = dense.mlp
    try:
        diff, tol = logit_gap(base_model, moe)
    finally:
        for layer, block in zip(layers, blocks, strict=True):
            layer.mlp = block
    if not diff <= tol:
        raise ModelError(
            f"the Mixtral built on the {base_model.config.model_type!r} base does not reproduce the base: logits "
            f"differ by up to {diff:.3g} (tolerance {tol:.3g}); report this as a bug with the base's config.json"
        )


def upcycle(
    base_model: PreTrainedModel,
    adapters: Sequence[str | Path | ExpertAdapter],
    top_k: int,
    storage: Storage = "delta",
    router_init: str = "random",
    seed: int = 0,
    hidden_batches: Sequence[Iterable[Batch]] | None = None,
    expert_names: Sequence[str] | None = None,
    show_progress: bool = True,
) -> MoECausalLM:
    """Fuse `base_model` and one LoRA adapter per expert into an `MoECausalLM` (a Mixtral; built on the base's
    tensors, so the base is consumed: its MLPs become the experts' base or are dropped).

    adapters: peft folders (``runs/<p>/experts/<name>/``) or loaded `ExpertAdapter`s, in expert order.
    router_init: ``random`` (seeded by `seed`) or ``hidden`` (needs `hidden_batches`, one iterable of
    token batches per expert, e.g. each task's training prompts).
    """
    if not adapters:
        raise ModelError("upcycling needs at least one expert adapter")
    check_top_k(top_k, len(adapters))
    check_storage(storage)
    if router_init not in ("random", "hidden"):
        raise ModelError(
            f"unknown router init {router_init!r}; use 'random' or 'hidden' (profile key `fusion.router_init`)"
        )
    if router_init == "hidden" and (hidden_batches is None or len(hidden_batches) != len(adapters)):
        raise ModelError(
            "router init `hidden` needs `hidden_batches`: one iterable of token batches per expert"
        )
    _check_base(base_model)
    loaded = [a if isinstance(a, ExpertAdapter) else load_adapter(a) for a in adapters]
    check_adapters(base_model.config, loaded)
    names = list(expert_names) if expert_names else [a.name for a in loaded]

    cfg = base_model.config
    layers = decoder_layers(base_model)
    if router_init == "hidden":
        assert hidden_batches is not None
        routers = hidden_router_weights(base_model, hidden_batches, show_progress)
    else:
        routers = random_router_weights(
            len(layers), len(loaded), cfg.hidden_size, cfg.initializer_range, seed
        )
    config = moe_config(cfg, len(loaded), top_k, names, base_model.dtype)
    moe = _mixtral_shell(base_model, config)
    if base_model.device.type != "meta":  # shapes only (the bench's parameter count): nothing to compute
        _check_shell(base_model, moe)
    hidden_act = getattr(cfg, "hidden_act", "silu")
    for i, (layer, block) in enumerate(
        progress(
            list(zip(layers, moe.moe_layers(), strict=True)),
            desc=f"upcycling ({storage})",
            show=show_progress,
            leave=False,
        )
    ):
        ref = layer.mlp.gate_proj.weight
        block.gate.weight = nn.Parameter(routers[i].to(device=ref.device, dtype=ref.dtype))
        block.experts = (
            _materialised_experts(layer.mlp, i, loaded, config)
            if storage == "materialised"
            else delta_experts(layer.mlp, i, loaded, hidden_act)
        )
    return moe
