"""The released-code-faithful model: H3Fusion-MoE with every bug of the authors' released code that this companion
can reproduce switched on together (book: released_code_bugs.md), trained and evaluated like the other models.

Together the bugs make a different model from the paper's: the experts are aliased (each is the base plus the sum
of all unscaled deltas), so they differ only by their fusion LoRA; the router stays at its random initialisation;
the gating loss is the released form with the running-total labels (so it can only act through the LoRA of the
layers below each router); attention is LoRA-tuned; the drift term penalises weight norms. Not reproduced: the
experts trained on one base and fused into another (this companion has one `model.base`) and the ignored
`--expert_topk` (the released code's k = 2 is the profile's `fusion.top_k` here). Everything else (data, steps,
learning rate, lambda, gammas, k) is the profile's, so the row differs from H3Fusion-MoE's by the bugs alone.
"""

from __future__ import annotations

from typing import Any

from h3fusion.config import Profile, ReleasedCodeSwitches

NOT_REPRODUCED = (
    "experts trained on Llama-2-7b-hf but fused into Llama-2-7b-chat-hf (one `model.base` here)",
    "`--expert_topk` ignored (the released code's k = 2 is used through `fusion.top_k`)",
)


def released_code_overrides() -> dict[str, Any]:
    """Every `fusion.released_code` switch on, attention LoRA on, and the gating loss's paper form (the released
    loss ignores the masks anyway); the routers' own learning rate is moot with a frozen router."""
    switches = {f"fusion.released_code.{k}": True for k in ReleasedCodeSwitches.model_fields}
    return {
        **switches,
        "fusion.attention_lora": True,
        "fusion.router_lr": None,
        "fusion.gate_averages": ["sequence"],
        "fusion.gate_skip_template": False,
    }


def released_code_profile(profile: Profile) -> Profile:
    """The profile of the released-code-faithful model (its variant folder name ends in ``_rc-...-att``)."""
    from h3fusion.config import derived_profile

    return derived_profile(profile, released_code_overrides())


def released_code_variant(profile: Profile) -> str:
    """The evaluation name (fusion folder) of the released-code-faithful model of this profile."""
    return released_code_profile(profile).fusion.variant
