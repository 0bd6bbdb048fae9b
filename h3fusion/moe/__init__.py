"""The MoE model of H3Fusion: experts modules, the Mixtral model, upcycling, export (see each module's docstring)."""

from h3fusion.moe.experts import DeltaExperts, MaterialisedExperts
from h3fusion.moe.export import check_round_trip, export_mixtral, load_moe, plain_mixtral
from h3fusion.moe.low_rank import PROJECTIONS, LowRankExperts
from h3fusion.moe.model import MIXTRAL_EXACT_FAMILIES, MoECausalLM, check_base_family, moe_config
from h3fusion.moe.upcycle import ExpertAdapter, adapter_from_state_dict, load_adapter, upcycle

__all__ = [
    "MIXTRAL_EXACT_FAMILIES",
    "PROJECTIONS",
    "DeltaExperts",
    "ExpertAdapter",
    "LowRankExperts",
    "MaterialisedExperts",
    "MoECausalLM",
    "adapter_from_state_dict",
    "check_base_family",
    "check_round_trip",
    "export_mixtral",
    "load_adapter",
    "load_moe",
    "moe_config",
    "plain_mixtral",
    "upcycle",
]
