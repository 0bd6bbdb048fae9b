"""h3fusion.ablations on the smoke profile (tiny random Llama): short runs, caching, scores and the released-code
measurements. Artifacts go to a temporary runs folder; the experts are trained once per module."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from h3fusion import ablations as A
from h3fusion.config import ConfigError, load_profile
from h3fusion.routing import MASKS


@pytest.fixture(scope="module")
def P(tmp_path_factory: pytest.TempPathFactory):  # noqa: N802
    from h3fusion.experts import align

    profile = load_profile(
        "smoke",
        {
            "runs_dir": str(tmp_path_factory.mktemp("runs")),
            "ablations.steps": 2,
            "ablations.step_checkpoints": [1, 2],
            "ablations.score_examples": 2,
            "fusion.train.max_steps": 2,
        },
    )
    align(profile, "all")
    return profile


def test_ablation_profile_shortens_training_and_applies_overrides(P) -> None:
    run = A.ablation_profile(P, {"fusion.gate_weight": 0.0})
    assert run.fusion.train.max_steps == P.ablations.steps
    assert run.fusion.gate_weight == 0.0
    assert run.fusion.variant != P.fusion.variant
    raised = A.gamma_overrides(P, {"honest": 5.0})["fusion.drift_gammas"]
    assert raised["honest"] == 5.0 and raised["helpful"] == P.fusion.gamma("helpful")


def test_config_rejects_checkpoints_beyond_steps_and_bad_top_k() -> None:
    with pytest.raises(ConfigError, match="step_checkpoints"):
        load_profile("smoke", {"ablations.steps": 2, "ablations.step_checkpoints": [3]})
    with pytest.raises(ConfigError, match="released_code_runs"):
        load_profile("smoke", {"ablations.released_code_runs": ["typo"]})
    with pytest.raises(ConfigError, match=r"`ablations.top_ks` = \[4\] has k = \[4\] outside 1..3"):
        load_profile("smoke", {"ablations.top_ks": [4]})
    assert A.top_ks(load_profile("smoke", {"ablations.top_ks": None})) == [1, 2, 3]


def test_response_nll_is_the_mean_token_cross_entropy(P) -> None:
    """The scorer equals the model's own LM loss (mean CE over response tokens) for one example."""
    from h3fusion.data import PadCollator, tokenize_example
    from h3fusion.models import load_base

    model, tok = load_base(P)
    ex = A.heldout_responses(P, "honest", 1)
    nll = A.response_nll(model, tok, ex, P.data.max_length)
    batch = PadCollator(tok.pad_token_id)([tokenize_example(tok, ex[0], P.data.max_length)])
    with torch.no_grad():
        expected = float(model(**batch).loss)
    assert nll == pytest.approx(expected, rel=1e-5)


def test_heldout_harmless_responses_are_not_training_examples(P) -> None:
    from h3fusion.data import load_train_examples

    used = {(e.instruction, e.output) for e in load_train_examples(P, "harmless")}
    held = A.heldout_responses(P, "harmless", 3)
    assert len(held) == 3 and not {(e.instruction, e.output) for e in held} & used


def test_reference_run_scores_checkpoints_and_every_k_and_is_cached(P) -> None:
    ref = A.reference_run(P)
    tasks = list(P.tasks)
    assert set(ref["checkpoints"]) == {"1", "2"} and set(ref["by_top_k"]) == {"1", "2", "3"}
    assert [e["step"] for e in ref["loss_log"]][-1] == P.ablations.steps
    for scores in [ref["scores"], *ref["checkpoints"].values(), *ref["by_top_k"].values()]:
        assert set(scores["nll"]) == set(tasks) and all(
            math.isfinite(v) and v > 0 for v in scores["nll"].values()
        )
        matrix = A.router_matrix(scores)
        assert matrix.shape == (len(tasks), P.num_experts)
        np.testing.assert_allclose(matrix.sum(axis=1), 1.0, atol=1e-6)  # probabilities per task
        assert set(scores["routing_accuracy"]) == set(MASKS)
        for by_task in scores["routing_accuracy"].values():
            assert set(by_task) == {*tasks, "all"} and all(0 <= v <= 100 for v in by_task.values())
        assert scores["routing_items"] == dict.fromkeys(tasks, P.ablations.routing_examples)
    # the final checkpoint is the trained model: same scores as the end of the run (same k)
    assert ref["checkpoints"]["2"]["nll"] == pytest.approx(ref["scores"]["nll"])
    assert ref["by_top_k"][str(P.fusion.top_k)]["nll"] == pytest.approx(ref["scores"]["nll"])
    # cached: a second call (and a request for fewer checkpoints) returns the stored result without training
    assert A.run_ablation(P, checkpoints=[2])["wall_s"] == ref["wall_s"]
    assert len(list(A.ablations_dir(A.ablation_profile(P)).glob("*.json"))) == 1


def test_gating_loss_lowers_the_gating_loss_it_trains(P) -> None:
    """Same seed and data: the run with a large lambda ends with a lower gating loss than the run without it (the
    tiny random smoke model routes at chance on held-out items either way after two steps)."""
    big = A.run_ablation(P, {"fusion.gate_weight": 50.0, "fusion.train.lr": 0.05})
    off = A.run_ablation(P, {"fusion.gate_weight": 0.0, "fusion.train.lr": 0.05})
    assert big["loss_log"][-1]["gate_loss"] < off["loss_log"][-1]["gate_loss"]
    table = A.scores_table({"big": big, "off": off})
    assert list(table.index) == ["big", "off"]
    assert {A.ROUTING_ALL, A.ROUTING_SEQUENCE} <= set(table.columns)
    assert table[A.ROUTING_ALL].between(0, 100).all()


def test_exported_variant_with_the_same_config_is_reused(P) -> None:
    from h3fusion.fusion import fuse

    no_gate = {"fusion.gate_weight": 0.0}
    folder = fuse(
        A.derived_profile(P, no_gate)
    )  # P's fusion is as long as the ablation runs: the same config
    run = A.run_ablation(P, no_gate)
    assert run["reused_from"] == str(folder) and run["loss_log"]


def test_label_audit_counts_the_released_code_labels(P) -> None:
    audit = A.label_audit(P)
    n = P.data.train_examples
    assert audit.loc["all", "examples"] == sum(n[t] for t in P.tasks)
    # running-total labels: the first task is labelled right, the last one (honest) all as the second task
    assert audit.loc[P.tasks[0], "mislabelled %"] == 0
    assert audit.loc["honest", "mislabelled %"] == 100
    assert audit.loc["honest", "labelled harmless"] == n["honest"]


def test_gating_loss_forms(P) -> None:
    forms = A.gating_loss_forms(P)
    assert forms.loc["perfect routing", "corrected loss"] == pytest.approx(0.0, abs=1e-6)
    assert forms.loc["uniform routing", "corrected loss"] == pytest.approx(math.log(P.num_experts), rel=1e-5)
    # the released double softmax cannot go below the CE of softmax(one-hot) even at perfect routing
    e = P.num_experts
    floor = -math.log(math.e / (math.e + e - 1))
    assert forms.loc["perfect routing", "released loss"] >= floor - 1e-4
    assert forms.loc["uniform routing", "released |grad|"] < forms.loc["uniform routing", "corrected |grad|"]


def test_drift_forms(P) -> None:
    forms = A.drift_forms(P)
    corrected, released = forms.iloc[0], forms.iloc[1]
    assert corrected["value at init"] == 0 and corrected["|grad| on fusion LoRA"] == 0
    assert released["value at init"] > 0 and released["|grad| on fusion LoRA"] > 0




@pytest.mark.parametrize("skip_header", [True, False])
def test_router_ablation_changes_one_setting_per_run_and_flips_the_header_either_way(
    P, monkeypatch: pytest.MonkeyPatch, skip_header: bool
) -> None:
    """Every run of the router ablation is the profile at its full fusion length with one setting changed; the
    header variant is the opposite of the profile's choice, whichever it is (no training: run_ablation stubbed)."""
    from h3fusion.ablations import studies
    from h3fusion.config import derived_profile

    profile = derived_profile(
        P, {"fusion.gate_skip_template": skip_header, "fusion.router_lr": 0.05, "fusion.train.max_steps": 8}
    )
    calls = []
    monkeypatch.setattr(
        studies, "run_ablation", lambda prof, over, label, checkpoints=(): calls.append((over, checkpoints)) or {}
    )
    runs = A.router_ablation(profile)
    full = {"fusion.train.max_steps": 8, "fusion.train.epochs": None}
    assert calls[0] == (full, [2, 4, 6, 8])  # the profile's own run, scored at a quarter, half, ... of its steps
    changed = [{k: v for k, v in over.items() if k not in full} for over, _ in calls[1:]]
    assert all(over.items() >= full.items() for over, _ in calls) and all(len(c) == 1 for c in changed)
    assert {"fusion.gate_skip_template": not skip_header} in changed
    assert {"fusion.router_lr": None} in changed and {"fusion.router_init": "hidden"} in changed
    header_run = next(name for name in runs if "template header" in name)
    assert ("kept in" if skip_header else "left out of") in header_run
    assert ("header skipped" if skip_header else "header kept") in next(iter(runs))
