"""Experts as a list (`experts.members`): several experts on one dimension, validated, trained, fused, routed and
evaluated; the default list is one expert per task, named after it, and leaves every artifact's hash as it was."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from h3fusion import load_profile
from h3fusion.config import ConfigError
from h3fusion.losses import gating_loss
from h3fusion.routing import accuracy_rows

FOUR = [
    {"name": "helpful", "dimension": "helpful"},
    {"name": "helpful-b", "dimension": "helpful", "seed": 7, "lora": {"r": 2, "alpha": 2}},
    {"name": "harmless", "dimension": "harmless"},
    {"name": "honest", "dimension": "honest"},
]


def _four(tmp_path=None, **overrides):
    runs = {"runs_dir": str(tmp_path / "runs")} if tmp_path is not None else {}
    return load_profile("smoke", {"experts.members": FOUR, **runs, **overrides})


def test_the_default_is_one_expert_per_task_and_keeps_the_hashes():
    from h3fusion.artifacts import digest
    from h3fusion.experts import expert_hash

    smoke = load_profile("smoke")
    assert smoke.experts.members is None and smoke.default_experts
    assert smoke.expert_names == smoke.expert_dimensions == list(smoke.tasks)
    spelled_out = load_profile(
        "smoke", {"experts.members": [{"name": t, "dimension": t} for t in smoke.tasks]}
    )
    assert spelled_out.default_experts and spelled_out.expert_names == smoke.expert_names
    # the key enters a hash only when set: listing the experts re-trains them, leaving it out changes nothing
    assert expert_hash(spelled_out) != expert_hash(smoke)
    before = smoke.model_dump(mode="json")["experts"]
    del before["members"]  # the section as hashed before the key existed
    assert smoke.section_hash("experts") == digest({"experts": before})


@pytest.mark.parametrize(
    ("members", "overrides", "message"),
    [
        (
            [*FOUR, {"name": "honest", "dimension": "helpful", "seed": 3}],
            {},
            r"repeats the name\(s\) \['honest'\]",
        ),
        (
            [*FOUR, {"name": "helpful-c", "dimension": "helpful", "seed": 7}],
            {},
            r"\['helpful-b', 'helpful-c'\] have",
        ),
        (
            [*FOUR, {"name": "helpful-c", "dimension": "helpful", "seed": 42}],
            {},
            r"\['helpful', 'helpful-c'\] have",
        ),
        (FOUR[:2] + FOUR[3:], {}, r"the task\(s\) \['harmless'\] have no expert"),
        (
            FOUR,
            {"tasks": ["helpful", "honest"]},
            r"\['harmless'\] are aligned on a dimension that is not in `tasks`",
        ),
        (FOUR, {"fusion.drift_gammas": {"helpful-c": 1.0}}, r"names \['helpful-c'\], which are no experts"),
        ([{"name": "Helpful B", "dimension": "helpful"}], {}, "should match pattern"),
        ([{"name": "kind", "dimension": "kind"}], {}, r"unknown task name\(s\) \['kind'\]"),
        (FOUR, {"fusion.top_k": 5}, r"larger than the number of experts \(4\)"),
    ],
)
def test_a_bad_expert_list_is_refused_with_the_fix(members, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_profile("smoke", {"experts.members": members, "ablations.top_ks": [1], **overrides})


def _routing(batch: int, tokens: int, probs: list[float]) -> list[torch.Tensor]:
    """Router logits whose softmax is `probs` at every token of two layers."""
    return [torch.log(torch.tensor(probs)).expand(batch * tokens, len(probs)).clone() for _ in range(2)]


def test_the_gating_loss_routes_a_task_to_its_experts_together():
    mask, labels = torch.ones(2, 3), torch.tensor([0, 1])  # task 0 has experts 0 and 1, task 1 has expert 2
    groups = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    probs = [0.3, 0.5, 0.2]
    loss = gating_loss(_routing(2, 3, probs), mask, labels, expert_groups=groups)
    assert loss.item() == pytest.approx(-(np.log(0.3 + 0.5) + np.log(0.2)) / 2, rel=1e-6)
    # for sequences of task 0, how its mass splits between its experts does not matter; moving it to task 1's does
    first = torch.tensor([0, 0])
    base = gating_loss(_routing(2, 3, probs), mask, first, expert_groups=groups)
    shifted = gating_loss(_routing(2, 3, [0.7, 0.1, 0.2]), mask, first, expert_groups=groups)
    assert shifted.item() == pytest.approx(base.item(), rel=1e-6) == pytest.approx(-np.log(0.8), rel=1e-6)
    assert gating_loss(_routing(2, 3, [0.2, 0.5, 0.3]), mask, first, expert_groups=groups) > base
    # one expert per task: the groups are the identity and the loss is the paper's, bit for bit
    logits = [torch.randn(6, 3, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    plain = gating_loss(
        logits, mask, torch.tensor([0, 2]), prompt_mask=torch.tensor([[1.0, 1, 0], [1, 0, 0]])
    )
    same = gating_loss(
        logits,
        mask,
        torch.tensor([0, 2]),
        prompt_mask=torch.tensor([[1.0, 1, 0], [1, 0, 0]]),
        expert_groups=torch.eye(3),
    )
    assert torch.equal(plain, same)


def test_an_item_routed_to_any_expert_of_its_task_is_correct():
    dims = ["helpful", "helpful", "harmless", "honest"]
    rows = {
        r["task"]: r
        for r in accuracy_rows({"helpful": np.array([0, 1, 2]), "honest": np.array([3, 0])}, dims)
    }
    assert (rows["helpful"]["correct"], rows["honest"]["correct"], rows["all"]["correct"]) == (2, 1, 3)


class _Harmless:
    name = "fake-harmless"
    validation = {"accuracy": 0.9, "n_heldout": 10}

    def harmful_probability(self, prompts, answers):
        return np.array([0.8 if len(a) % 2 else 0.2 for a in answers])


def test_the_smoke_pipeline_runs_with_two_experts_on_one_dimension(tmp_path):
    """Four experts, two on helpfulness (different seeds): each trains on its own sample, the MoE has four experts
    routed by dimension, and every expert and the fused model evaluate like any model."""
    from types import SimpleNamespace

    from h3fusion.baselines.data_mix import step_budget
    from h3fusion.data import load_expert_examples
    from h3fusion.evaluation.run import evaluate_model
    from h3fusion.experts import align, load_expert_adapter_weights
    from h3fusion.fusion import fuse, fusion_dir, raw_dir
    from h3fusion.fusion_objective import expert_groups
    from h3fusion.models import load_base, load_tokenizer
    from h3fusion.moe import load_moe
    from h3fusion.routing import heldout_routing, routing_table
    from tests.helpers import FakeRefusal
    from tests.test_dimensions import _Judge

    profile = _four(tmp_path, **{"fusion.drift_gammas": {"helpful-b": 2.0e-3}})  # the others: smoke's 1e-3
    # the extra expert's gamma is in the variant's name
    assert profile.fusion.variant.endswith("_gam0.001-0.001-0.001-0.002_k2")
    assert load_expert_examples(profile, "helpful-b") != load_expert_examples(profile, "helpful")
    assert expert_groups(profile).tolist() == [[1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]
    assert set(align(profile, "all")) == {"helpful", "helpful-b", "harmless", "honest"}
    a, b = (load_expert_adapter_weights(profile, e).factors for e in ("helpful", "helpful-b"))
    # two experts, not one twice: its own LoRA (rank 2, scale 1 against the profile's rank 4, scale 2)
    ranks = [{f[0].shape[0] for f in factors.values()} for factors in (a, b)]
    assert a.keys() == b.keys() and ranks == [{4}, {2}]
    assert load_expert_adapter_weights(profile, "helpful-b").scale == 1.0

    folder = fuse(profile)
    assert folder == fusion_dir(profile, profile.fusion.variant)
    moe = load_moe(folder)
    assert moe.num_experts == 4 and list(moe.expert_names) == profile.expert_names
    # the upcycled experts are the trained ones, the rank-2 one included (zero-padded to rank 4)
    raw, base = load_moe(raw_dir(profile)).experts_modules()[0], load_base(profile)[0].model.layers[0].mlp
    for e, name in enumerate(profile.expert_names):
        upcycled = raw.expert_weight("down_proj")[e] - base.down_proj.weight
        torch.testing.assert_close(upcycled, load_expert_adapter_weights(profile, name).delta(0, "down_proj"))

    heldout = heldout_routing(moe, load_tokenizer(profile), profile, 3)
    table = routing_table({"moe": heldout}, profile.expert_dimensions, references=False)
    assert table.loc[("moe", "prompt", "all"), "n"] == 9

    judges = SimpleNamespace(helpful=_Judge(), harmless=_Harmless(), honest=_Judge(), refusal=FakeRefusal())
    for name in ("helpful-b", folder.name):
        metrics = evaluate_model(profile, name, judges=judges)
        assert set(metrics["scores"]) == {"helpful", "harmless", "honest"}
    assert set(step_budget(profile)) == {"helpful", "helpful-b", "harmless", "honest", "fusion", "total"}


def test_align_names_the_experts_of_the_profile(tmp_path):
    from h3fusion.experts import align

    with pytest.raises(
        ConfigError, match=r"'helpful-c' is not one of this profile's experts \['helpful', 'helpful-b'"
    ):
        align(_four(tmp_path), "helpful-c")
