"""Builders shared by several test modules."""

from __future__ import annotations

import torch

from h3fusion.config import Profile


def random_upcycled_moe(profile: Profile, vocab_size: int):
    """The profile's tiny random Llama upcycled with one random rank-4 LoRA expert per task (seeded, non-trivial
    deltas: scale 2, factors 0.1 * N(0, 1)), in eval mode."""
    from h3fusion.models import tiny_random_llama
    from h3fusion.moe import ExpertAdapter, upcycle
    from h3fusion.moe.low_rank import PROJECTIONS, projection_shapes

    base = tiny_random_llama(profile.model.tiny, vocab_size, profile.seed)
    shapes = projection_shapes(base.config.hidden_size, base.config.intermediate_size)
    gen = torch.Generator().manual_seed(0)
    adapters = [
        ExpertAdapter(
            name=task,
            scale=2.0,
            factors={
                (layer, p): (
                    0.1 * torch.randn(4, shapes[p][1], generator=gen),
                    0.1 * torch.randn(shapes[p][0], 4, generator=gen),
                )
                for layer in range(base.config.num_hidden_layers)
                for p in PROJECTIONS
            },
        )
        for task in profile.tasks
    ]
    return upcycle(base, adapters, top_k=profile.fusion.top_k, seed=profile.seed, show_progress=False).eval()


class FakeRefusal:
    """A refusal judge for tests of the XSTest track: an even-length answer counts as a refusal."""

    name = "fake-refusal"
    validation = {"accuracy": 0.9, "n": 10}

    def refused(self, answers):
        import numpy as np

        return np.array([len(a) % 2 == 0 for a in answers])
