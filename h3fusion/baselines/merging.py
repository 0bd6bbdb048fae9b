"""Model merging on FULL weight deltas (book chapter 3): weight averaging, task arithmetic, TIES, DARE.

Each expert i is a LoRA adapter on the same base; its task vector on a weight W is the full delta
Delta_i = (lora_alpha / r) * B_i @ A_i (never the factors A, B separately: merging factors does not
merge the functions). The merged model is base + merge(Delta_1..Delta_n), saved as an ordinary dense
Hugging Face folder. Deltas are formed one weight at a time from the factors, so memory stays near one
dense model plus one weight's n deltas, even at 7B scale.

Kernels (per weight tensor, task vectors stacked on dim 0):
- average:          sum_i w_i Delta_i with w_i = 1/n (a uniform model soup of models sharing one base);
- task arithmetic:  lambda * sum_i Delta_i;
- TIES:             trim each Delta_i to its top-`density` entries by magnitude (per tensor, as peft and
                    mergekit do; the TIES paper trims the whole task vector), elect the sign of
                    sum_i trimmed_i per entry, average the entries that are non-zero and agree with it
                    (disjoint mean), times lambda;
- DARE:             drop each entry with probability p (seeded torch.Generator), rescale survivors by
                    1/(1-p), then task arithmetic with lambda.
peft's `merge_utils` implements TIES with the weights inside the disjoint mean and DARE with the global
RNG; the sign election and disjoint mean below are peft's (`calculate_majority_sign_mask`,
`disjoint_merge`), the rest is written out so the semantics above hold exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from h3fusion.errors import ModelError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

MergeMethod = Literal["average", "task_arithmetic", "ties", "dare"]
MERGE_METHODS: tuple[str, ...] = ("average", "task_arithmetic", "ties", "dare")


class MergeError(ModelError):
    """Adapters that cannot be merged, or merge parameters out of range."""


@dataclass(frozen=True)
class LoraFactors:
    """One adapted weight of one adapter: Delta = scale * B @ A (transposed when fan_in_fan_out)."""

    a: torch.Tensor
    b: torch.Tensor
    scale: float
    fan_in_fan_out: bool = False

    def delta(self) -> torch.Tensor:
        d = self.scale * (self.b.float() @ self.a.float())
        return d.T if self.fan_in_fan_out else d


@dataclass(frozen=True)
class AdapterDeltas:
    """A peft LoRA adapter read from disk as factors keyed by the base model's weight name."""

    folder: Path
    base_model: str | None
    factors: dict[str, LoraFactors]


def _weight_key(peft_key: str) -> tuple[str, str] | None:
    """'base_model.model.model.layers.0.mlp.up_proj.lora_A.weight' -> ('model.layers.0.mlp.up_proj.weight', 'A')."""
    for part in ("A", "B"):
        marker = f".lora_{part}."
        if marker in peft_key:
            module = peft_key.split(marker)[0].removeprefix("base_model.model.")
            return f"{module}.weight", part
    return None


def read_adapter(folder: str | Path) -> AdapterDeltas:
    """Read a peft LoRA adapter folder (adapter_config.json + adapter_model.safetensors) as factors."""
    from h3fusion.lora_files import read_lora_folder

    lora = read_lora_folder(folder, missing_error=MergeError, invalid_error=MergeError)
    folder, cfg, scale, tensors = lora.folder, lora.config, lora.scale, lora.tensors
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        parsed = _weight_key(key)
        if parsed is not None:
            parts.setdefault(parsed[0], {})[parsed[1]] = t
    incomplete = [k for k, p in parts.items() if set(p) != {"A", "B"}]
    if incomplete or not parts:
        raise MergeError(
            f"{folder}: adapter weights are incomplete (no lora_A/lora_B pair for {incomplete[:3]})"
        )
    fifo = bool(cfg.get("fan_in_fan_out", False))
    factors = {k: LoraFactors(p["A"], p["B"], scale, fifo) for k, p in sorted(parts.items())}
    return AdapterDeltas(folder, cfg.get("base_model_name_or_path"), factors)


def check_mergeable(adapters: Sequence[AdapterDeltas], base_weights: dict[str, torch.Tensor]) -> list[str]:
    """The weight names to merge; refuses adapters of different bases or shapes that do not fit the base."""
    if not adapters:
        raise MergeError("no adapters to merge; give at least one expert")
    bases = {a.base_model for a in adapters if a.base_model}
    if len(bases) > 1:
        listing = "; ".join(f"{a.folder}: {a.base_model}" for a in adapters)
        raise MergeError(
            f"the adapters were trained on different base models ({listing}); merge only experts of one base "
            f"(re-run `h3fusion align` with the same `model.base`)"
        )
    keys = sorted({k for a in adapters for k in a.factors})
    for adapter in adapters:
        for key, f in adapter.factors.items():
            if key not in base_weights:
                raise MergeError(
                    f"{adapter.folder}: adapts {key!r}, which the base model does not have; the adapter was "
                    f"trained on another architecture"
                )
            shape = _delta_shape(f)
            if shape != tuple(base_weights[key].shape):
                raise MergeError(
                    f"{adapter.folder}: delta of {key!r} has shape {shape} but the base weight has "
                    f"{tuple(base_weights[key].shape)}; the adapter was trained on a different base model"
                )
    return keys


def _delta_shape(f: LoraFactors) -> tuple[int, int]:
    shape = (f.b.shape[0], f.a.shape[1])
    return (shape[1], shape[0]) if f.fan_in_fan_out else shape


# ---------------------------------------------------------------------------------------------- kernels


def check_density(density: float, what: str = "density") -> None:
    if not 0 < density <= 1:
        raise MergeError(
            f"{what} must be in (0, 1], got {density}; e.g. 0.2 keeps the largest 20 % of entries"
        )


def check_drop_rate(drop_rate: float) -> None:
    if not 0 <= drop_rate < 1:
        raise MergeError(
            f"DARE drop rate must be in [0, 1), got {drop_rate} (0 = no drop; survivors are rescaled by 1/(1-p), "
            f"undefined at 1); e.g. 0.5"
        )


def average(deltas: torch.Tensor) -> torch.Tensor:
    """Uniform weight average of models sharing one base = base + mean of the deltas."""
    return deltas.mean(dim=0)


def task_arithmetic(deltas: torch.Tensor, scale: float) -> torch.Tensor:
    return scale * deltas.sum(dim=0)


def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ceil(density * numel) largest-magnitude entries of one task vector, zero the rest."""
    import torch

    check_density(density)
    if density == 1:
        return delta
    k = max(1, math.ceil(density * delta.numel()))
    flat = delta.reshape(-1)
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[flat.abs().topk(k).indices] = True
    return (flat * mask).reshape(delta.shape)


def ties(deltas: torch.Tensor, density: float, scale: float) -> torch.Tensor:
    """TIES: trim, elect sign (sign of the sum), disjoint mean over agreeing non-zero entries, times lambda."""
    import torch
    from peft.utils.merge_utils import calculate_majority_sign_mask, disjoint_merge

    trimmed = torch.stack([trim(d, density) for d in deltas])
    mask = calculate_majority_sign_mask(trimmed, method="total")
    return scale * disjoint_merge(trimmed, mask)


def dare(deltas: torch.Tensor, drop_rate: float, scale: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: Bernoulli(1-p) keep mask per entry (seeded), survivors / (1-p), then task arithmetic."""
    import torch

    check_drop_rate(drop_rate)
    if drop_rate == 0:
        return task_arithmetic(deltas, scale)
    keep = torch.rand(deltas.shape, generator=generator, device=deltas.device) >= drop_rate
    return task_arithmetic(deltas * keep / (1 - drop_rate), scale)


@dataclass(frozen=True)
class MergeSpec:
    """A merge method and its parameters (validated on construction)."""

    method: MergeMethod
    scale: float = 1.0
    density: float = 1.0
    drop_rate: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in MERGE_METHODS:
            raise MergeError(f"unknown merge method {self.method!r}; known: {', '.join(MERGE_METHODS)}")
        if not self.scale > 0:
            raise MergeError(f"merge scale (lambda) must be > 0, got {self.scale}")
        check_density(self.density, "TIES density")
        check_drop_rate(self.drop_rate)

    def kernel(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """The per-weight function of the stacked deltas (DARE's generator is seeded once per merge)."""
        import torch

        if self.method == "average":
            return average
        if self.method == "task_arithmetic":
            return lambda d: task_arithmetic(d, self.scale)
        if self.method == "ties":
            return lambda d: ties(d, self.density, self.scale)
        gen = torch.Generator().manual_seed(self.seed)
        return lambda d: dare(d, self.drop_rate, self.scale, gen)


# ---------------------------------------------------------------------------------------------- models


def merge_into(
    model: PreTrainedModel, adapters: Sequence[AdapterDeltas], spec: MergeSpec
) -> dict[str, float]:
    """Add merge(Delta_1..Delta_n) to `model`'s weights in place; returns the merged delta's norm per weight.

    Weights are visited in sorted name order so DARE's random masks depend only on the seed.
    """
    import torch

    from h3fusion.progress import progress

    params = dict(model.named_parameters())
    keys = check_mergeable(adapters, {k: p for k, p in params.items()})
    kernel = spec.kernel()
    norms: dict[str, float] = {}
    with torch.no_grad():
        for key in progress(keys, desc=f"merge ({spec.method})", leave=False):
            weight = params[key]
            deltas = torch.stack(
                [a.factors[key].delta() if key in a.factors else _zeros(weight) for a in adapters]
            )
            merged = kernel(deltas)
            weight.copy_((weight.float() + merged).to(weight.dtype))
            norms[key] = float(merged.norm())
    return norms


def _zeros(weight: torch.Tensor) -> torch.Tensor:
    import torch

    return torch.zeros(weight.shape, dtype=torch.float32)
