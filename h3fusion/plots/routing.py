"""Routing figures: router probability per layer and expert as heat-maps, and per task as grouped bars."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from h3fusion.errors import H3FusionError

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

from h3fusion.plots.style import (
    HEATMAP_CMAP,
    as_matrix,
    color,
    names_for,
    styled,
    subplots,
    wrap_title,
)


def _layer_ticks(n_layers: int) -> np.ndarray:
    step = max(1, int(np.ceil(n_layers / 16)))
    return np.arange(0, n_layers, step)


def _colour_range(
    matrices: Sequence[np.ndarray], vmin: float | None, vmax: float | None
) -> tuple[float, float]:
    """The colour scale of heat-maps: the given bounds, else the data's range (widened when it is flat)."""
    low = float(min(m.min() for m in matrices)) if vmin is None else vmin
    high = float(max(m.max() for m in matrices)) if vmax is None else vmax
    if high - low < 1e-6:
        low, high = low - 0.01, high + 0.01
    return low, high


def _draw_heatmap(
    ax: Axes, matrix: np.ndarray, expert_names: list[str], vmin: float, vmax: float, annotate: bool
) -> Any:
    """Experts as rows, layers as columns (a wide strip fits 30 layers); returns the image for a colour bar."""
    grid = matrix.T
    image = ax.imshow(grid, aspect="auto", cmap=HEATMAP_CMAP, vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.set_yticks(range(len(expert_names)), expert_names)
    ticks = _layer_ticks(matrix.shape[0])
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.set_xlabel("decoder layer (index)")
    for side in ("top", "right", "left", "bottom"):
        ax.spines[side].set_visible(False)
    if annotate:
        mid = (vmin + vmax) / 2
        for (row, col), value in np.ndenumerate(grid):
            ax.text(
                col,
                row,
                f"{value:.2f}",
                ha="center",
                va="center",
                fontsize=7,
                color="white" if value < mid else "black",
            )
    return image


@styled
def routing_heatmap(
    matrix: Any,
    expert_names: Sequence[str] | None = None,
    title: str = "Mean router probability per layer and expert",
    vmin: float | None = None,
    vmax: float | None = None,
) -> Figure:
    """Heat-map of a routing profile [layers, experts] (from `analysis.routing_profile`); the colour scale
    spans the data unless `vmin`/`vmax` are given (router probabilities often span a few hundredths)."""
    m = as_matrix(matrix, "routing_heatmap")
    vmin, vmax = _colour_range([m], vmin, vmax)
    names = names_for(expert_names, m.shape[1], "expert", "routing_heatmap")
    fig, axes = subplots(
        figsize=(max(5.0, 0.35 * m.shape[0] + 2.5), 0.45 * m.shape[1] + 1.6), layout="constrained"
    )
    ax = axes[0, 0]
    image = _draw_heatmap(ax, m, names, vmin, vmax, annotate=m.shape[0] <= 16)
    ax.set_ylabel("expert")
    ax.set_title(wrap_title(title, fig, 0.85))
    fig.colorbar(image, ax=ax, label="mean router probability", fraction=0.05, pad=0.02)
    return fig


@styled
def routing_heatmap_grid(
    matrices: Mapping[str, Mapping[str, Any]],
    expert_names: Sequence[str] | None = None,
    title: str = "Mean router probability per layer and expert, by task of the prompts",
    vmin: float | None = None,
    vmax: float | None = None,
) -> Figure:
    """Panels of routing heat-maps, one per model variant and task, stacked in one column (each a full-width
    strip of layers, so its labels stay legible at the width the book shows a figure).

    `matrices` is ``{variant: {task: [layers, experts]}}``, e.g. ``{"without gating loss": ..., "with gating
    loss": ...}``: the variants one after the other, their tasks in the same order, make the effect of the
    gating loss visible task by task.
    """
    if not matrices or not all(matrices.values()):
        raise H3FusionError(
            "routing_heatmap_grid: pass {variant: {task: [layers, experts] matrix}}, not empty"
        )
    variants = list(matrices)
    tasks = list(next(iter(matrices.values())))
    for v in variants:
        if list(matrices[v]) != tasks:
            raise H3FusionError(
                f"routing_heatmap_grid: variant {v!r} has tasks {list(matrices[v])}, expected {tasks} (same order)"
            )
    first = as_matrix(matrices[variants[0]][tasks[0]], "routing_heatmap_grid")
    names = names_for(expert_names, first.shape[1], "expert", "routing_heatmap_grid")
    vmin, vmax = _colour_range(
        [as_matrix(matrices[v][t], "routing_heatmap_grid") for v in variants for t in tasks], vmin, vmax
    )
    panels = [(v, t) for v in variants for t in tasks]
    height = len(panels) * (0.28 * first.shape[1] + 0.75) + 1.0
    fig, axes = subplots(len(panels), 1, figsize=(8.5, height), sharex=True, layout="constrained")
    axes = np.asarray(axes).reshape(-1)
    image = None
    for i, (variant, task) in enumerate(panels):
        ax = axes[i]
        m = as_matrix(matrices[variant][task], "routing_heatmap_grid")
        if m.shape != first.shape:
            raise H3FusionError(
                f"routing_heatmap_grid: {variant}/{task} has shape {m.shape}, expected {first.shape}"
            )
        image = _draw_heatmap(ax, m, names, vmin, vmax, annotate=m.shape[0] <= 8)
        if task == tasks[0]:
            ax.set_title(variant, loc="left", fontweight="bold")
        if i < len(panels) - 1:
            ax.set_xlabel("")
        ax.set_ylabel(f"{task}\nprompts")
    fig.colorbar(image, ax=axes, label="mean router probability", fraction=0.04, pad=0.02)
    fig.suptitle(wrap_title(title, fig))
    return fig


@styled
def router_weight_bars(
    matrix: Any,
    task_names: Sequence[str] | None = None,
    expert_names: Sequence[str] | None = None,
    title: str = "Mean router weight per expert, by task of the prompts (averaged over layers and tokens)",
) -> Figure:
    """Grouped bars of a [tasks, experts] matrix (`analysis.task_expert_matrix`); the paper's Figure 2 analogue.

    A dashed line marks uniform routing (1 / experts): bars above it show a preference for that expert.
    """
    m = as_matrix(matrix, "router_weight_bars")
    tasks = names_for(task_names, m.shape[0], "task", "router_weight_bars")
    experts = names_for(expert_names, m.shape[1], "expert", "router_weight_bars")
    fig, axes = subplots(figsize=(max(5.0, 1.6 * len(tasks) + 2.5), 3.8), layout="constrained")
    ax = axes[0, 0]
    width = 0.8 / len(experts)
    x = np.arange(len(tasks))
    for j, name in enumerate(experts):
        offset = (j - (len(experts) - 1) / 2) * width
        bars = ax.bar(x + offset, m[:, j], width, color=color(j), label=f"{name} expert", edgecolor="white")
        ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=1)
    ax.axhline(1 / len(experts), color="0.4", linestyle="--", linewidth=1, label="uniform routing")
    ax.set_xticks(x, [f"{t} prompts" for t in tasks])
    ax.set_ylabel("mean router probability")
    ax.set_ylim(0, min(1.0, float(m.max()) * 1.15 + 0.05))
    ax.set_title(wrap_title(title, fig, 0.7))
    ax.legend(title="router weight of", loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
    return fig
