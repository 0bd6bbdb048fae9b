"""The MoE model of H3Fusion: layer, upcycling, Mixtral export (see each module's docstring)."""

from h3fusion.moe.export import (
    MIXTRAL_EXACT_FAMILIES,
    check_base_family,
    export_mixtral,
    from_mixtral,
    load_moe,
    mixtral_config,
    to_mixtral,
)
from h3fusion.moe.layer import MoEFeedForward
from h3fusion.moe.low_rank import PROJECTIONS, LowRankExperts
from h3fusion.moe.model import MoECausalLM
from h3fusion.moe.upcycle import ExpertAdapter, adapter_from_state_dict, load_adapter, upcycle

__all__ = [
    "MIXTRAL_EXACT_FAMILIES",
    "PROJECTIONS",
    "ExpertAdapter",
    "LowRankExperts",
    "MoECausalLM",
    "MoEFeedForward",
    "adapter_from_state_dict",
    "check_base_family",
    "export_mixtral",
    "from_mixtral",
    "load_adapter",
    "load_moe",
    "mixtral_config",
    "to_mixtral",
    "upcycle",
]
