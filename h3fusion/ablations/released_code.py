"""The released code's differences measured directly (book chapter 7): the labels its mixed dataset gets, and
both forms of the gating loss and of the drift penalty on the same batch and model."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from h3fusion.config import ConfigError, Profile, derived_profile

if TYPE_CHECKING:
    import pandas as pd
    import torch


def label_audit(profile: Profile) -> pd.DataFrame:
    """Per task of origin: examples, the labels the released code gives them, and the share mislabelled."""
    import pandas as pd

    from h3fusion.data import build_mixed_dataset
    from h3fusion.data.dataset import released_code_labels
    from h3fusion.models import load_tokenizer

    mixed = build_mixed_dataset(
        derived_profile(profile, {"fusion.released_code.labels": False}), load_tokenizer(profile)
    )
    sources = list(mixed.sources)
    sizes = [sources.count(t) for t in profile.tasks]
    released = released_code_labels(sizes)
    rows = []
    for i, task in enumerate(profile.tasks):
        labels = [lab for src, lab in zip(sources, released, strict=True) if src == task]
        row: dict[str, Any] = {"examples": len(labels)}
        row.update({f"labelled {t}": labels.count(j) for j, t in enumerate(profile.tasks)})
        row["mislabelled %"] = 100.0 * sum(lab != i for lab in labels) / max(len(labels), 1)
        rows.append(row)
    frame = pd.DataFrame(rows, index=pd.Index(list(profile.tasks), name="task of origin"))
    frame.loc["all"] = frame.sum(numeric_only=True)
    frame.loc["all", "mislabelled %"] = (
        100.0
        * sum(lab != profile.tasks.index(src) for src, lab in zip(sources, released, strict=True))
        / max(len(sources), 1)
    )
    return frame


def _synthetic_routing(
    num_layers: int, num_experts: int, labels: torch.Tensor, mask: torch.Tensor, perfect: bool, margin: float
) -> list[torch.Tensor]:
    """Router logits [B*T, E] per layer: all tokens to their sequence's expert (logit `margin`), or uniform."""
    import torch

    b, t = mask.shape
    logits = torch.zeros(b, t, num_experts)
    if perfect:
        logits[torch.arange(b), :, labels] = margin
    return [logits.reshape(b * t, num_experts).clone().requires_grad_(True) for _ in range(num_layers)]


def _loss_and_grad(
    logits: list[torch.Tensor], mask: torch.Tensor, labels: torch.Tensor, released: bool
) -> tuple[float, float]:
    import torch

    from h3fusion.losses import gating_loss

    loss = gating_loss(logits, mask, labels, released_code=released)
    grads = torch.autograd.grad(loss, logits)
    return float(loss.detach()), float(torch.sqrt(sum((g**2).sum() for g in grads)))


def gating_loss_forms(profile: Profile, margin: float = 20.0) -> pd.DataFrame:
    """Both gating-loss forms at perfect routing, uniform routing and the raw MoE's random router.

    The batch is a real mixed batch of the profile (its padding included); `margin` is the logit that makes
    routing perfect (probability ~ 1). Gradient norms are taken with respect to the router logits.
    """
    import pandas as pd
    import torch

    from h3fusion.analysis import router_logits as model_router_logits
    from h3fusion.data import PadCollator, build_mixed_dataset
    from h3fusion.fusion import upcycle_profile

    if not profile.default_experts:
        raise ConfigError(
            "the released code's gating-loss forms are measured with one expert per task (expert i for task i), "
            f"the released code's layout; this profile's experts are {profile.expert_names}: remove `experts.members`"
        )
    moe, tok = upcycle_profile(profile, show_progress=False)
    mixed = build_mixed_dataset(derived_profile(profile, {"fusion.released_code.labels": False}), tok)
    per_task = profile.fusion.train.batch_size // profile.num_experts or 1
    picks = [i for t in profile.tasks for i in [j for j, s in enumerate(mixed.sources) if s == t][:per_task]]
    batch = PadCollator(tok.pad_token_id)([mixed[i] for i in picks])
    mask, labels = batch["attention_mask"], batch["task_labels"]
    with torch.no_grad():
        moe.eval()
        real = [
            lg.detach().float().reshape(-1, moe.num_experts)
            for lg in model_router_logits(moe, {"input_ids": batch["input_ids"], "attention_mask": mask})
        ]
    layers = len(real)
    settings = {
        "perfect routing": _synthetic_routing(layers, moe.num_experts, labels, mask, True, margin),
        "uniform routing": _synthetic_routing(layers, moe.num_experts, labels, mask, False, margin),
        "raw MoE (random router)": [lg.clone().requires_grad_(True) for lg in real],
    }
    rows = []
    for name, logits in settings.items():
        fixed = _loss_and_grad(logits, mask, labels, released=False)
        released = _loss_and_grad(logits, mask, labels, released=True)
        rows.append(
            {
                "routing": name,
                "corrected loss": fixed[0],
                "released loss": released[0],
                "corrected |grad|": fixed[1],
                "released |grad|": released[1],
            }
        )
    frame = pd.DataFrame(rows).set_index("routing")
    frame.attrs["padding %"] = 100.0 * float(1 - mask.float().mean())
    frame.attrs["sequences"] = int(mask.shape[0])
    return frame


def drift_forms(profile: Profile) -> pd.DataFrame:
    """Both drift forms at the start of fusion training: value and gradient norm on the fusion LoRA."""
    import pandas as pd
    import torch

    from h3fusion.fusion import prepare_for_training, upcycle_profile
    from h3fusion.losses import drift_loss

    moe, _ = upcycle_profile(profile, show_progress=False)
    prepare_for_training(moe, profile)
    gammas = [profile.fusion.gamma(e) for e in profile.expert_names]
    params = [p for n, p in moe.named_parameters() if p.requires_grad and "router" not in n]
    rows = []
    for released in (False, True):
        loss = drift_loss(
            moe.drift_factors(),
            gammas,
            moe.fusion_lora_scale(),
            released_code=released,
            expert_sq_norms=moe.expert_sq_norms() if released else None,
        )
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        norm = (
            torch.sqrt(sum((g**2).sum() for g in grads if g is not None))
            if any(g is not None for g in grads)
            else torch.tensor(0.0)
        )
        rows.append(
            {
                "form": "released (weight-norm penalty)" if released else "corrected (drift from upcycled)",
                "value at init": loss.item(),
                "|grad| on fusion LoRA": float(norm),
            }
        )
    return pd.DataFrame(rows).set_index("form")
