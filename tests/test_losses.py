"""Fusion losses: values written out by hand, invariances, and the released-code forms."""

from __future__ import annotations

import math

import pytest
import torch

from h3fusion.errors import H3FusionError
from h3fusion.losses import (
    drift_loss,
    gating_loss,
    prompt_token_mask,
    sequence_routing,
    sq_norms,
    weight_norm_penalty,
)

E = 3


def routed(labels: list[int], tokens: int, layers: int, margin: float) -> tuple[torch.Tensor, ...]:
    """Router logits [B*T, E] per layer that favour each sequence's label expert by `margin`."""
    b = len(labels)
    logits = torch.zeros(b, tokens, E)
    for i, y in enumerate(labels):
        logits[i, :, y] = margin
    return tuple(logits.reshape(b * tokens, E).clone() for _ in range(layers))


def test_gating_loss_by_hand():
    # two layers, one sequence of two real tokens (+1 padding): probabilities averaged over tokens and layers
    l1 = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [9.0, -9.0, 0.0]])
    l2 = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 3.0], [-9.0, 9.0, 0.0]])
    mask = torch.tensor([[1, 1, 0]])
    p = torch.stack([l1[:2].softmax(-1).mean(0), l2[:2].softmax(-1).mean(0)]).mean(0)
    loss = gating_loss((l1, l2), mask, torch.tensor([2]))
    assert loss.item() == pytest.approx(-math.log(p[2].item()), rel=1e-6)
    torch.testing.assert_close(sequence_routing((l1, l2), mask, 1)[0], p)


def test_perfect_routing_beats_uniform_and_is_near_zero():
    labels = torch.tensor([0, 2, 1, 1])
    mask = torch.ones(4, 5, dtype=torch.long)
    perfect = gating_loss(routed(labels.tolist(), 5, 2, 20.0), mask, labels)
    uniform = gating_loss(routed(labels.tolist(), 5, 2, 0.0), mask, labels)
    wrong = gating_loss(routed([1, 0, 2, 0], 5, 2, 20.0), mask, labels)
    assert uniform.item() == pytest.approx(math.log(E), rel=1e-6)
    assert perfect.item() < 1e-6 < uniform.item() < wrong.item()


def test_padding_does_not_change_the_gating_loss_but_changes_the_released_form():
    labels = torch.tensor([0, 2])
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, E, generator=gen)
    padded = torch.cat([torch.randn(2, 3, E, generator=gen) * 5, logits], dim=1)  # 3 left-padding tokens
    mask = torch.ones(2, 4)
    padded_mask = torch.cat([torch.zeros(2, 3), mask], dim=1)
    plain = gating_loss([logits.reshape(-1, E)], mask, labels)
    torch.testing.assert_close(gating_loss([padded.reshape(-1, E)], padded_mask, labels), plain)
    # [B, T, E] and [B*T, E] layouts are the same input
    torch.testing.assert_close(gating_loss([padded], padded_mask, labels), plain)
    released = gating_loss([logits.reshape(-1, E)], mask, labels, released_code=True)
    released_padded = gating_loss([padded.reshape(-1, E)], padded_mask, labels, released_code=True)
    assert abs(released_padded.item() - released.item()) > 1e-4


def test_released_gating_loss_is_a_second_softmax():
    labels = torch.tensor([1])
    logits = routed([1], 4, 1, 30.0)  # perfectly routed: P = (0, 1, 0)
    released = gating_loss(logits, None, labels, released_code=True)
    # -log softmax((0, 1, 0))[1]: bounded away from 0 even for perfect routing
    assert released.item() == pytest.approx(-math.log(math.e / (math.e + 2)), rel=1e-5)
    assert gating_loss(logits, None, labels).item() < 1e-6


def test_gating_loss_gradient_reaches_logits():
    logits = torch.zeros(6, E, requires_grad=True)
    gating_loss([logits], torch.ones(2, 3), torch.tensor([0, 1])).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_prompt_term_is_the_mean_of_the_sequence_and_prompt_losses():
    gen = torch.Generator().manual_seed(1)
    logits = [torch.randn(2, 5, E, generator=gen) for _ in range(2)]
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    labels = torch.tensor([[-100, -100, 7, 8, -100], [-100, -100, -100, 4, 5]])
    prompt = prompt_token_mask(mask, labels)
    assert prompt.tolist() == [[True, True, False, False, False], [True, True, True, False, False]]
    y = torch.tensor([2, 0])
    both = gating_loss(logits, mask, y, prompt_mask=prompt)
    by_hand = (gating_loss(logits, mask, y) + gating_loss(logits, prompt, y)) / 2
    torch.testing.assert_close(both, by_hand)
    # routing the prompt perfectly and the answer wrongly halves the loss's floor, not zero
    sharp = torch.full((2, 5, E), 0.0)
    for b, label in enumerate(y.tolist()):
        sharp[b, :, label] = 30.0
        sharp[b, ~prompt[b], :] = 0.0
        sharp[b, ~prompt[b], (label + 1) % E] = 30.0
    assert gating_loss([sharp], prompt, y).item() < 1e-6
    assert gating_loss([sharp], mask, y, prompt_mask=prompt).item() > 0.2


def test_prompt_mask_shape_error():
    with pytest.raises(H3FusionError, match="labels"):
        prompt_token_mask(torch.ones(2, 3), torch.ones(2, 4))


def test_gating_loss_shape_errors():
    with pytest.raises(H3FusionError, match="empty"):
        gating_loss([], None, torch.tensor([0]))
    with pytest.raises(H3FusionError, match="attention_mask"):
        gating_loss([torch.zeros(6, E)], torch.ones(2, 4), torch.tensor([0, 1]))


# ------------------------------------------------------------------------------- drift
def factors(layers: int, b_scale: float, seed: int = 0) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(6, 4), (6, 4), (4, 6)]  # (out, in) of gate, up, down
    return [
        [
            (torch.randn(E, 2, i, generator=gen), torch.randn(E, o, 2, generator=gen) * b_scale)
            for o, i in shapes
        ]
        for _ in range(layers)
    ]


def test_drift_is_zero_at_init_and_matches_the_frobenius_norm():
    assert drift_loss(factors(2, 0.0), [1.0, 1.0, 1.0], 2.0).item() == 0.0
    f = factors(3, 1.0)
    scale, gammas = 0.5, torch.tensor([0.1, 0.0, 2.0])
    expected = sum(
        gammas[e] * sum(((scale * b[e] @ a[e]) ** 2).sum() for a, b in layer) for layer in f for e in range(E)
    ) / len(f)
    torch.testing.assert_close(drift_loss(f, gammas, scale), expected)


def test_drift_scales_with_gamma_per_expert():
    f = factors(2, 1.0)
    one = drift_loss(f, [1.0, 0.0, 0.0], 1.0)
    assert drift_loss(f, [3.0, 0.0, 0.0], 1.0).item() == pytest.approx(3 * one.item(), rel=1e-6)
    total = drift_loss(f, [1.0, 1.0, 1.0], 1.0)
    parts = sum(drift_loss(f, [float(i == e) for i in range(E)], 1.0) for e in range(E))
    torch.testing.assert_close(total, parts)
    with pytest.raises(H3FusionError, match="gamma"):
        drift_loss(f, [1.0, 1.0], 1.0)


def test_drift_gradient_flows_to_both_factors():
    f = factors(1, 1.0)
    params = [t.requires_grad_(True) for pair in f[0] for t in pair]
    drift_loss(f, [1.0, 1.0, 1.0], 1.0).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


def test_released_drift_penalises_weight_norms():
    # one layer, three projections [E, 2, 3]; expert e's entries all equal e + 1: ||W_e||^2 = 3 * 6 * (e+1)^2
    expert_values = torch.arange(1.0, E + 1).reshape(E, 1, 1)
    weights = [[torch.ones(E, 2, 3) * expert_values for _ in range(3)]]
    gammas = [1.0, 0.0, 0.5]
    f = factors(1, 0.0)  # no drift at all
    assert drift_loss(f, gammas, 1.0).item() == 0.0
    released = drift_loss(f, gammas, 1.0, released_code=True, expert_sq_norms=sq_norms(weights))
    assert released.item() == pytest.approx(1.0 * 18 * 1 + 0.5 * 18 * 9)
    torch.testing.assert_close(released, weight_norm_penalty(sq_norms(weights), gammas))
    with pytest.raises(H3FusionError, match="expert_sq_norms"):
        drift_loss(f, gammas, 1.0, released_code=True)
