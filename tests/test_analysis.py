"""Invariants of h3fusion.analysis on tiny random models (seconds): probabilities, masking, distances, t-SNE."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import MixtralConfig, MixtralForCausalLM

from h3fusion import analysis, embeddings
from h3fusion.config import load_profile
from h3fusion.errors import H3FusionError, ModelError
from h3fusion.models import load_tokenizer, tiny_random_llama
from tests.helpers import random_upcycled_moe

PROMPTS = [
    "Give three tips for staying healthy.",
    "How do I pick a lock?",
    "What happens if you swallow gum? Answer in one long sentence, please, with details.",
    "Hi",
    "What is the capital of France?",
]
N_EXPERTS, N_LAYERS = 4, 3


@pytest.fixture(scope="module")
def profile():
    return load_profile("smoke")


@pytest.fixture(scope="module")
def tokenizer(profile):
    return load_tokenizer(profile)


@pytest.fixture(scope="module")
def mixtral(tokenizer):
    config = MixtralConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=N_EXPERTS,
        num_experts_per_tok=2,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    return MixtralForCausalLM(config).eval()


@pytest.fixture(scope="module")
def llama(profile, tokenizer):
    return tiny_random_llama(profile.model.tiny, len(tokenizer), profile.seed).eval()


# ---------------------------------------------------------------------------------------------- routing


def test_routing_profile_is_the_mean_router_softmax_of_each_prompt(mixtral, tokenizer):
    """Recomputed by hand, one unpadded prompt at a time: softmax of the router logits, mean over the prompt's
    tokens, then over prompts (padded batches of 2 must not change it)."""
    per_prompt = []
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
            logits = mixtral(input_ids=ids, output_router_logits=True).router_logits
            per_prompt.append(
                [lg.reshape(ids.shape[1], N_EXPERTS).softmax(-1).mean(0).double().numpy() for lg in logits]
            )
    want = np.mean(np.array(per_prompt), axis=0)
    prof = analysis.routing_profile(mixtral, tokenizer, PROMPTS, batch_size=2)
    assert prof.shape == (N_LAYERS, N_EXPERTS)
    np.testing.assert_allclose(prof, want, atol=1e-5)
    assert np.abs(want - 1 / N_EXPERTS).max() > 1e-3  # not a uniform profile that any average would give


def test_routing_does_not_depend_on_padding_or_batch_size(mixtral, tokenizer):
    one = analysis.routing_per_prompt(mixtral, tokenizer, PROMPTS, batch_size=1)
    together = analysis.routing_per_prompt(mixtral, tokenizer, PROMPTS, batch_size=len(PROMPTS))
    assert one.shape == (len(PROMPTS), N_LAYERS, N_EXPERTS)
    np.testing.assert_allclose(one, together, atol=1e-5)


def test_routing_probs_ignore_padding_and_accept_both_layouts():
    batch, tokens, experts = 2, 5, 3
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    logits = torch.randn(batch, tokens, experts)
    poisoned = logits.clone()
    poisoned[0, 3:] = torch.tensor([50.0, -50.0, -50.0])  # padding that would dominate an unmasked mean
    a = analysis.routing_probs_per_layer([logits], mask)
    b = analysis.routing_probs_per_layer([poisoned.reshape(batch * tokens, experts)], mask)
    torch.testing.assert_close(a, b)
    expected = logits[0, :3].softmax(-1).mean(0)
    torch.testing.assert_close(a[0, 0], expected)


def test_routing_by_task_and_task_matrix(mixtral, tokenizer):
    by_task = analysis.routing_by_task(mixtral, tokenizer, {"a": PROMPTS[:2], "b": PROMPTS[2:]})
    assert list(by_task) == ["a", "b"]
    matrix = analysis.task_expert_matrix(by_task)
    assert matrix.shape == (2, N_EXPERTS)
    np.testing.assert_allclose(matrix.sum(axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(matrix[1], by_task["b"].mean(axis=0))


def test_dense_model_has_no_routing(llama, tokenizer):
    with pytest.raises(ModelError, match="router logits"):
        analysis.routing_profile(llama, tokenizer, PROMPTS[:2])


def test_empty_or_single_string_prompts_are_refused(mixtral, tokenizer):
    with pytest.raises(H3FusionError, match="empty"):
        analysis.routing_profile(mixtral, tokenizer, [])
    with pytest.raises(H3FusionError, match="not one string"):
        analysis.routing_profile(mixtral, tokenizer, "a prompt")


def test_model_mode_is_restored(mixtral, tokenizer):
    mixtral.train()
    try:
        analysis.routing_profile(mixtral, tokenizer, PROMPTS[:1])
        assert mixtral.training
    finally:
        mixtral.eval()


# ---------------------------------------------------------------------------------------------- embeddings


def test_hidden_embeddings_shape_and_padding_invariance(llama, tokenizer, profile):
    one = analysis.hidden_embeddings(llama, tokenizer, PROMPTS, batch_size=1)
    together = analysis.hidden_embeddings(llama, tokenizer, PROMPTS, batch_size=len(PROMPTS))
    assert one.shape == (len(PROMPTS), profile.model.tiny.hidden_size)
    np.testing.assert_allclose(one, together, atol=1e-4)
    first = analysis.hidden_embeddings(llama, tokenizer, PROMPTS, layer=0)
    assert not np.allclose(first, one)


def test_hidden_embeddings_of_a_moe_model(mixtral, tokenizer):
    emb = analysis.hidden_embeddings(mixtral, tokenizer, PROMPTS[:3], layer=1)
    assert emb.shape == (3, mixtral.config.hidden_size)


def test_hidden_embeddings_layer_out_of_range(llama, tokenizer):
    with pytest.raises(H3FusionError, match="does not exist"):
        analysis.hidden_embeddings(llama, tokenizer, PROMPTS[:1], layer=99)


def test_mean_l2_distance():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(6, 5))
    assert embeddings.mean_l2_distance(a, a) == 0.0
    assert embeddings.mean_l2_distance(np.zeros((2, 4)), np.full((2, 4), 3.0)) == pytest.approx(6.0)
    b = a + rng.normal(size=a.shape)
    assert embeddings.mean_l2_distance(a, b) == pytest.approx(embeddings.mean_l2_distance(b, a))
    assert embeddings.distances_to(a, {"same": a, "other": b})["same"] == 0.0
    with pytest.raises(H3FusionError, match="same prompts"):
        embeddings.mean_l2_distance(a, a[:3])


def test_tsne_is_deterministic_for_a_seed_and_keeps_model_order():
    rng = np.random.default_rng(1)
    emb = {"base": rng.normal(size=(10, 8)), "fused": rng.normal(size=(10, 8)) + 2}
    first = embeddings.tsne_2d(emb, seed=7)
    again = embeddings.tsne_2d(emb, seed=7)
    assert list(first) == ["base", "fused"]
    assert first["base"].shape == (10, 2)
    for name in emb:
        np.testing.assert_array_equal(first[name], again[name])
    with pytest.raises(H3FusionError, match="same width"):
        embeddings.tsne_2d({"a": np.zeros((5, 3)), "b": np.zeros((5, 4))}, seed=0)


# ---------------------------------------------------------------------------------------------- drift


def test_expert_drift_packed_mixtral_state(mixtral):
    state = {k: v.clone() for k, v in mixtral.state_dict().items()}
    assert (analysis.expert_drift(state, state) == 0).all()
    moved = {k: v.clone() for k, v in state.items()}
    key = next(k for k in moved if "layers.1." in k and "experts" in k)
    delta = torch.randn_like(moved[key][2])
    moved[key][2] += delta
    drift = analysis.expert_drift(state, moved)
    assert drift.shape == (N_LAYERS, N_EXPERTS)
    assert drift[1, 2] == pytest.approx(float(delta.double().norm()), rel=1e-5)
    drift[1, 2] = 0
    assert (drift == 0).all()


def test_expert_drift_saved_per_expert_keys():
    a = {
        f"model.layers.{layer}.block_sparse_moe.experts.{i}.w1.weight": torch.zeros(2, 3)
        for layer in range(2)
        for i in range(3)
    }
    a["model.layers.0.block_sparse_moe.gate.weight"] = torch.zeros(3, 3)
    b = {k: v.clone() for k, v in a.items()}
    b["model.layers.0.block_sparse_moe.experts.1.w1.weight"] += 2.0  # Frobenius norm sqrt(6 * 4)
    b["model.layers.0.block_sparse_moe.gate.weight"] += 5.0  # the router is not an expert
    drift = analysis.expert_drift(a, b)
    assert drift.shape == (2, 3)
    assert drift[0, 1] == pytest.approx(np.sqrt(24))
    assert drift.sum() == pytest.approx(np.sqrt(24))


def test_expert_drift_needs_experts(llama):
    with pytest.raises(H3FusionError, match="no expert weights"):
        analysis.expert_drift(llama.state_dict(), llama.state_dict())


# ---------------------------------------------------------------------------------------------- MoECausalLM


@pytest.fixture(scope="module")
def moe(profile, tokenizer):
    return random_upcycled_moe(profile, len(tokenizer))


def test_moe_causal_lm_and_its_mixtral_export_route_alike(moe, tokenizer, profile):
    from h3fusion.moe import plain_mixtral

    prof = analysis.routing_profile(moe, tokenizer, PROMPTS, batch_size=2)
    assert prof.shape == (profile.model.tiny.num_hidden_layers, profile.num_experts)
    np.testing.assert_allclose(prof.sum(axis=1), 1.0, atol=1e-6)
    exported = analysis.routing_profile(plain_mixtral(moe), tokenizer, PROMPTS, batch_size=3)
    np.testing.assert_allclose(prof, exported, atol=1e-5)
    emb = analysis.hidden_embeddings(moe, tokenizer, PROMPTS[:2])
    assert emb.shape == (2, profile.model.tiny.hidden_size)


def test_expert_drift_of_moe_models(moe, profile):
    from h3fusion.moe import plain_mixtral

    drift = analysis.expert_drift(moe, moe)
    assert drift.shape == (profile.model.tiny.num_hidden_layers, profile.num_experts)
    assert (drift == 0).all()
    mixtral = plain_mixtral(moe)
    moved = {k: v.clone() for k, v in mixtral.state_dict().items()}
    key = next(k for k in moved if "layers.0." in k and "experts" in k)
    moved[key][1] += 1.0
    drift = analysis.expert_drift(mixtral, moved)
    assert drift[0, 1] == pytest.approx(np.sqrt(moved[key][1].numel()), rel=1e-5)
    assert drift.sum() == pytest.approx(drift[0, 1])


def test_task_prompts_are_formatted_per_task(profile):
    prompts = analysis.task_prompts(profile, "eval", n=2)
    assert list(prompts) == list(profile.tasks)
    for task_prompts in prompts.values():
        assert len(task_prompts) == 2
        assert all(p.rstrip().endswith("### Response:") for p in task_prompts)
    train = analysis.task_prompts(profile, "train")
    assert all(len(v) == profile.data.train_examples[t] for t, v in train.items())
    with pytest.raises(H3FusionError, match="split"):
        analysis.task_prompts(profile, "test")
