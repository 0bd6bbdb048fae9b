"""An exported fused model (full Mixtral experts) run on the delta storage again (`h3fusion.moe.factored`)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.models.mixtral.modeling_mixtral import MixtralExperts

from h3fusion.moe import export_mixtral
from h3fusion.moe.experts import DeltaExperts
from h3fusion.moe.factored import factor_experts, factored_experts
from tests.test_moe import ATOL, LAYERS, VOCAB, fused, logits_of, tiny_llama, write_adapter

EXPERT_RANK, FUSION_RANK = 4, 2


@pytest.fixture(scope="module")
def base():
    return tiny_llama()


@pytest.fixture(scope="module")
def exported(base, tmp_path_factory):
    """A fused model with non-trivial experts and fusion LoRA, exported as a plain Mixtral folder."""
    root = tmp_path_factory.mktemp("factored")
    adapters = [write_adapter(base, root / name, seed) for seed, name in enumerate(("a", "b", "c"), start=1)]
    moe = fused(base, adapters, "delta", top_k=2, seed=2)
    moe.add_fusion_lora(rank=FUSION_RANK, alpha=4.0, seed=3)
    with torch.no_grad():
        for experts in moe.experts_modules():
            for p in experts.fusion_lora.targets:
                experts.fusion_lora.B[p].normal_(0, 0.1)
    return export_mixtral(moe, None, root / "fused")


@pytest.fixture()
def batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (3, 9), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    return {"input_ids": ids, "attention_mask": mask}


def load(folder) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(folder).eval()


def test_exported_experts_factor_back_into_base_plus_low_rank_deltas(base, exported, batch):
    full, factored = load(exported), load(exported)
    assert factor_experts(factored, base, max_rank=EXPERT_RANK + FUSION_RANK) == LAYERS
    for layer in factored.model.layers:
        experts = layer.mlp.experts
        assert isinstance(experts, DeltaExperts)
        assert (
            experts.expert_deltas.rank == EXPERT_RANK + FUSION_RANK
        )  # the expert's LoRA and the fusion LoRA
    torch.testing.assert_close(logits_of(factored, batch), logits_of(full, batch), atol=ATOL, rtol=0)
    prompt = {k: v[1:2] for k, v in batch.items()}
    with torch.no_grad():
        greedy = [m.generate(**prompt, max_new_tokens=6, do_sample=False) for m in (full, factored)]
    assert torch.equal(*greedy)


def test_experts_that_are_not_a_low_rank_change_of_the_base_stay_full(base, exported):
    model = load(exported)
    with torch.no_grad():  # a full-rank change of one expert in the first layer
        model.model.layers[0].mlp.experts.down_proj[1].add_(
            0.1 * torch.randn_like(model.model.layers[0].mlp.experts.down_proj[1])
        )
    assert factor_experts(model, base, max_rank=EXPERT_RANK + FUSION_RANK) == LAYERS - 1
    assert isinstance(model.model.layers[0].mlp.experts, MixtralExperts)
    assert isinstance(model.model.layers[1].mlp.experts, DeltaExperts)


def test_a_rank_above_the_cap_or_another_base_is_not_factored(base, exported):
    experts = load(exported).model.layers[0].mlp.experts
    assert factored_experts(experts, base.model.layers[0].mlp, max_rank=EXPERT_RANK + FUSION_RANK - 1) is None
    other = copy.deepcopy(base.model.layers[0].mlp)
    with torch.no_grad():
        other.up_proj.weight.add_(
            0.1 * torch.randn_like(other.up_proj.weight)
        )  # not the base it was fused from
    assert factored_experts(experts, other, max_rank=EXPERT_RANK + FUSION_RANK) is None
    wider = tiny_llama(hidden=48)
    assert factor_experts(load(exported), wider) == 0  # other shapes: nothing replaced
