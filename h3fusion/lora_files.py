"""One reader of peft LoRA adapter folders for every consumer.

Upcycling groups the factors per layer and projection, merging per weight name; both need the same checks
(plain LoRA, one r and alpha, no DoRA) and the same scale of B A in the weight delta, so both read here.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from h3fusion.errors import ArtifactError, H3FusionError, ModelError

if TYPE_CHECKING:
    import torch

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass(frozen=True)
class LoraFolder:
    folder: Path
    config: dict[str, Any]
    scale: float
    """alpha / r (alpha / sqrt(r) with rsLoRA): the factor of B A in the weight delta."""
    tensors: dict[str, torch.Tensor]


def read_lora_folder(
    folder: str | Path,
    missing_error: type[H3FusionError] = ArtifactError,
    invalid_error: type[H3FusionError] = ModelError,
) -> LoraFolder:
    """Read and check a peft LoRA folder; `missing_error` when it is absent or incomplete, `invalid_error`
    when it is not an adapter whose delta is scale * B A."""
    from safetensors.torch import load_file

    folder = Path(folder)
    missing = [f for f in (ADAPTER_CONFIG, ADAPTER_WEIGHTS) if not (folder / f).is_file()]
    if missing:
        raise missing_error(
            f"{folder} is not a complete peft LoRA adapter folder (it lacks {', '.join(missing)}); train the "
            "experts with `h3fusion align --profile <profile>` or point to an existing peft LoRA folder"
        )
    cfg = json.loads((folder / ADAPTER_CONFIG).read_text())
    if cfg.get("peft_type", "LORA") != "LORA":
        raise invalid_error(
            f"{folder} holds a {cfg.get('peft_type')} adapter; only LoRA adapters are supported"
        )
    if cfg.get("use_dora"):
        raise invalid_error(
            f"{folder} is a DoRA adapter, whose delta is not (alpha/r) B A; train plain LoRA experts"
        )
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise invalid_error(f"{folder} uses per-module rank/alpha patterns; use one r and lora_alpha")
    r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    return LoraFolder(folder, cfg, scale, load_file(str(folder / ADAPTER_WEIGHTS)))
