"""The released-code-faithful model: aliased and unscaled experts, a frozen router, all switches on together."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from h3fusion.artifacts import read_manifest
from h3fusion.config import ReleasedCodeSwitches, load_profile
from h3fusion.experts import align
from h3fusion.fusion import fuse, raw_dir, raw_hash, variant_hash
from h3fusion.moe.upcycle import ExpertAdapter, aliased, unscaled
from h3fusion.released_model import released_code_profile, released_code_variant

ROUTER = "model.layers.{}.block_sparse_moe.gate.weight"
EXPERT = "model.layers.0.block_sparse_moe.experts.{}.w1.weight"


def _adapter(name: str, scale: float, rank: int, seed: int) -> ExpertAdapter:
    g = torch.Generator().manual_seed(seed)
    factors = {
        (0, "up_proj"): (torch.randn(rank, 6, generator=g), torch.randn(10, rank, generator=g)),
        (1, "down_proj"): (torch.randn(rank, 10, generator=g), torch.randn(6, rank, generator=g)),
    }
    if seed == 2:  # an adapter that leaves one projection out
        factors.pop((1, "down_proj"))
    return ExpertAdapter(name, scale, factors)


def test_aliased_experts_are_each_the_sum_of_all_scaled_deltas():
    adapters = [_adapter("a", 2.0, 2, 0), _adapter("b", 0.5, 3, 1), _adapter("c", 1.0, 4, 2)]
    out = aliased(adapters)
    assert [a.name for a in out] == ["a", "b", "c"]
    for key in [(0, "up_proj"), (1, "down_proj")]:
        expected = sum(a.delta(*key) for a in adapters if a.delta(*key) is not None)
        for a in out:
            torch.testing.assert_close(a.delta(*key), expected)
    assert out[0].rank == 2 + 3 + 4


def test_unscaled_drops_alpha_over_r():
    a = _adapter("a", 2.0, 2, 0)
    A, B = a.factors[(0, "up_proj")]
    torch.testing.assert_close(unscaled(a).delta(0, "up_proj"), B @ A)
    torch.testing.assert_close(a.delta(0, "up_proj"), 2.0 * B @ A)


def test_released_profile_turns_every_switch_on_and_names_its_own_folders():
    profile = load_profile("smoke")
    released = released_code_profile(profile)
    assert all(getattr(released.fusion.released_code, k) for k in ReleasedCodeSwitches.model_fields)
    assert released.fusion.attention_lora
    assert released_code_variant(profile) == released.fusion.variant
    assert released.fusion.variant.startswith(profile.fusion.variant + "_rc-")
    assert released.fusion.variant.endswith("-att")
    assert raw_dir(released) != raw_dir(profile) and raw_hash(released) != raw_hash(profile)
    assert variant_hash(released) != variant_hash(profile)


def test_later_switches_enter_the_hash_only_when_on():
    profile = load_profile("smoke")
    payload = profile.fusion.hash_payload()["released_code"]
    assert not set(ReleasedCodeSwitches.ADDED_LATER) & set(payload)
    assert set(payload) == set(ReleasedCodeSwitches.model_fields) - set(ReleasedCodeSwitches.ADDED_LATER)
    for switch in ReleasedCodeSwitches.ADDED_LATER:
        on = load_profile("smoke", {f"fusion.released_code.{switch}": True})
        assert on.fusion.hash_payload()["released_code"][switch] is True
        assert variant_hash(on) != variant_hash(profile)


@pytest.fixture(scope="module")
def released_run(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """Smoke experts, then the released-code-faithful model trained from them."""
    runs = tmp_path_factory.mktemp("released") / "runs"
    profile = load_profile("smoke", {"runs_dir": str(runs)})
    align(profile, "all")
    released = released_code_profile(profile)
    folder = fuse(released)
    return profile, released, folder


def test_released_model_keeps_its_random_router_and_aliases_its_experts(released_run):
    profile, released, folder = released_run
    raw, trained = (
        load_file(str(raw_dir(released) / "model.safetensors")),
        load_file(str(folder / "model.safetensors")),
    )
    routers = [k for k in raw if k.endswith("block_sparse_moe.gate.weight")]
    assert routers and all(torch.equal(raw[k], trained[k]) for k in routers)
    # the raw experts are identical (base + the sum of all deltas); fusion's per-expert LoRA makes them differ
    experts = [raw[EXPERT.format(e)] for e in range(len(profile.tasks))]
    assert all(torch.equal(experts[0], x) for x in experts[1:])
    assert not torch.equal(trained[EXPERT.format(0)], trained[EXPERT.format(1)])
    # the raw MoE of the released code is its own folder; the profile's raw MoE is not touched
    assert not raw_dir(profile).exists()
    manifest = read_manifest(folder)
    assert manifest["global_step"] == profile.fusion.train.max_steps
    assert manifest["stage"] == "fusion"


def test_released_model_is_evaluable_and_its_raw_moe_is_not_listed(released_run):
    from h3fusion.evaluation.registry import known_models
    from h3fusion.report import display_names, model_groups

    profile, released, folder = released_run
    models = known_models(profile)
    assert models[folder.name].kind == "fused"
    assert raw_dir(released).name not in models
    assert folder.name in model_groups(profile)["fused"]
    assert "released-code" in display_names(profile)[folder.name]


def test_released_raw_moe_equals_base_plus_summed_unscaled_deltas(released_run):
    from h3fusion.experts import expert_dir
    from h3fusion.models import load_base
    from h3fusion.moe.upcycle import load_adapter

    profile, released, _ = released_run
    raw = load_file(str(raw_dir(released) / "model.safetensors"))
    adapters = [load_adapter(expert_dir(profile, t)) for t in profile.tasks]
    summed = sum(B.float() @ A.float() for A, B in (a.factors[(0, "gate_proj")] for a in adapters))
    base, _ = load_base(profile)
    dense = base.model.layers[0].mlp.gate_proj.weight.detach()
    torch.testing.assert_close(raw[EXPERT.format(0)], dense + summed, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("frozen_router", [False, True])
def test_attention_lora_adds_to_the_trainable_set_and_the_frozen_router_leaves_it(
    released_run, frozen_router
):
    from h3fusion.fusion import prepare_for_training, upcycle_profile

    profile, _, _ = released_run
    plain, _ = upcycle_profile(profile, show_progress=False)
    prepare_for_training(plain, profile)
    expected = {n for n, p in plain.named_parameters() if p.requires_grad}
    assert any("router" in n or "gate.weight" in n for n in expected)
    overrides = {"fusion.attention_lora": True, "fusion.released_code.frozen_router": frozen_router}
    other = load_profile("smoke", {"runs_dir": str(profile.runs_dir), **overrides})
    moe, _ = upcycle_profile(other, show_progress=False)
    prepare_for_training(moe, other)
    trainable = {n for n, p in moe.named_parameters() if p.requires_grad}
    attention = {n for n in trainable if ".self_attn." in n and "lora_" in n}
    routers = {n for n, p in moe.named_parameters() if any(p is r for r in moe.router_parameters())}
    assert attention and routers
    assert trainable == (expected - (routers if frozen_router else set())) | attention
