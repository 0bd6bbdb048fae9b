"""The paper's Figure 4 analogue (book chapter 5): which models to embed, on which prompts, their mean-pooled
hidden states (`h3fusion.analysis.hidden_embeddings`, one model at a time), the mean L2 distance between two
models' embeddings of the same prompt, and a joint t-SNE map."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from h3fusion.analysis import task_prompts
from h3fusion.config import Profile
from h3fusion.errors import H3FusionError
from h3fusion.report import NO_GATE_WEIGHT, RAW_MOE, fused_variant


def embedding_prompts(profile: Profile, samples: int, split: str = "eval") -> tuple[list[str], list[str]]:
    """About `samples` prompts split evenly over the tasks (fewer when a task has fewer), with their task.

    The paper embeds 100 samples; a small profile has fewer evaluation items and then uses them all.
    """
    if samples < 1:
        raise H3FusionError(f"samples must be at least 1, got {samples}")
    per_task = task_prompts(profile, split)
    n, k = len(profile.tasks), samples // len(profile.tasks)
    quota = {t: k + (1 if i < samples - k * n else 0) for i, t in enumerate(profile.tasks)}
    prompts, tasks = [], []
    for t in profile.tasks:
        chosen = per_task[t][: quota[t]]
        prompts += chosen
        tasks += [t] * len(chosen)
    return prompts, tasks


def embedding_models(profile: Profile) -> tuple[list[str], list[str]]:
    """(models to embed, expected ones that do not exist yet): base, experts, raw MoE, H3Fusion-MoE, no gate."""
    from h3fusion.evaluation.registry import known_models

    wanted = ["base", *profile.expert_names, RAW_MOE, fused_variant(profile), fused_variant(profile, NO_GATE_WEIGHT)]
    wanted = list(dict.fromkeys(wanted))
    entries, present, missing = known_models(profile), [], []
    for name in wanted:
        try:
            entries[name].identity()  # raises when the artifact is missing or stale
            present.append(name)
        except (KeyError, H3FusionError):
            missing.append(name)
    return present, missing


def embed_models(
    profile: Profile, names: Sequence[str], prompts: Sequence[str], layer: int = -1
) -> dict[str, np.ndarray]:
    """{model: [prompts, hidden]} mean-pooled hidden states of `layer`, loading one model at a time."""
    import gc

    from h3fusion.analysis import hidden_embeddings
    from h3fusion.evaluation.registry import known_models

    entries, out = known_models(profile), {}
    for name in names:
        lm = entries[name].load()
        model, tok = getattr(lm, "model", None), getattr(lm, "tokenizer", None)
        if model is None or tok is None:
            raise H3FusionError(f"{name} is not a single Hugging Face model; hidden embeddings need one")
        out[name] = hidden_embeddings(
            model, tok, list(prompts), layer=layer, max_length=profile.data.max_length
        )
        del lm, model
        gc.collect()
    return out


def distance_table(embeddings: Mapping[str, np.ndarray], references: Sequence[str]) -> pd.DataFrame:
    """Mean L2 distance (same prompt, original hidden space) of every model to each reference model."""
    cols = {f"to {r}": distances_to(embeddings[r], embeddings) for r in references if r in embeddings}
    return pd.DataFrame(cols).reindex(list(embeddings))


def _paired(a: np.ndarray, b: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.ndim != 2 or a.shape != b.shape:
        raise H3FusionError(
            f"{what}: expects two [n, d] arrays of the same prompts, got shapes {a.shape} and {b.shape}"
        )
    return a, b


def mean_l2_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over prompts of the L2 distance between two models' embeddings of the same prompt (row i vs row i)."""
    a, b = _paired(a, b, "mean_l2_distance")
    return float(np.linalg.norm(a - b, axis=1).mean())


def distances_to(reference: np.ndarray, embeddings_by_model: Mapping[str, np.ndarray]) -> dict[str, float]:
    """{model: mean L2 distance to `reference`} (e.g. to the base model, or to one expert)."""
    return {name: mean_l2_distance(emb, reference) for name, emb in embeddings_by_model.items()}


def tsne_2d(
    embeddings_by_model: Mapping[str, np.ndarray], seed: int, perplexity: float | None = None
) -> dict[str, np.ndarray]:
    """One joint t-SNE of all models' embeddings -> {model: [n, 2]} on comparable coordinates.

    Fitting each model separately would give unrelated axes; stacking them puts all points in one map.
    Perplexity defaults to min(30, (N - 1) / 3) for N points in all, as t-SNE needs perplexity < N.
    """
    from sklearn.manifold import TSNE

    if not embeddings_by_model:
        raise H3FusionError("tsne_2d: no embeddings given")
    arrays = {k: np.asarray(v, dtype=float) for k, v in embeddings_by_model.items()}
    dims = {a.shape[1] for a in arrays.values() if a.ndim == 2}
    if len(dims) != 1 or any(a.ndim != 2 for a in arrays.values()):
        raise H3FusionError(
            f"tsne_2d: every model needs [n, d] embeddings of the same width d, got "
            f"{ {k: a.shape for k, a in arrays.items()} }"
        )
    stacked = np.concatenate(list(arrays.values()), axis=0)
    if len(stacked) < 4:
        raise H3FusionError(f"tsne_2d: needs at least 4 points in all, got {len(stacked)}")
    perplexity = perplexity if perplexity is not None else min(30.0, (len(stacked) - 1) / 3)
    coords = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(stacked)
    out, start = {}, 0
    for name, a in arrays.items():
        out[name] = coords[start : start + len(a)]
        start += len(a)
    return out
