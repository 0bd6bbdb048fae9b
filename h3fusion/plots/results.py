"""Result figures: per-dimension bars with intervals, and the t-SNE of hidden-state embeddings."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from h3fusion.errors import H3FusionError

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

from h3fusion.plots.style import (
    color,
    marker,
    styled,
    subplots,
    wrap_title,
)


def _table(table: Any) -> pd.DataFrame:
    import pandas as pd

    frame = table if isinstance(table, pd.DataFrame) else pd.DataFrame(table)
    if frame.empty:
        raise H3FusionError("results_bars: the table is empty; pass models as rows and dimensions as columns")
    return frame.apply(pd.to_numeric, errors="coerce")


@styled
def results_bars(
    table: Any,
    higher_is_better: Mapping[str, bool] | None = None,
    highlight: Sequence[str] = (),
    xlabel: str = "score (%)",
    title: str = "Every model on the three alignment dimensions",
    low: Any = None,
    high: Any = None,
) -> Figure:
    """One horizontal bar panel per dimension (column), models as rows in the table's order.

    `table`: a DataFrame (or {column: {model: value}}) with models as the index. `higher_is_better` adds
    "(higher/lower is better)" to a panel's title; models in `highlight` (e.g. H3Fusion) get a dark outline;
    `low` / `high` (frames like `table`) draw each bar's 95 % interval as an error bar.
    """
    frame = _table(table)
    better = higher_is_better or {}
    models = [str(m) for m in frame.index]
    fig, axes = subplots(
        1,
        len(frame.columns),
        figsize=(3.3 * len(frame.columns) + 1.8, 0.32 * len(models) + 1.6),
        sharey=True,
        layout="constrained",
    )
    y = np.arange(len(models))
    for j, column in enumerate(frame.columns):
        ax = axes[0, j]
        values = frame[column].to_numpy(dtype=float)
        edges = ["black" if m in highlight else "none" for m in models]
        bars = ax.barh(y, np.nan_to_num(values), color=color(j), edgecolor=edges, linewidth=1.4)
        top = values
        if low is not None and high is not None:
            lo = _table(low)[column].to_numpy(dtype=float)
            hi = _table(high)[column].to_numpy(dtype=float)
            err = np.nan_to_num(np.vstack([values - lo, hi - values]))
            ax.errorbar(
                np.nan_to_num(values), y, xerr=err, fmt="none", ecolor="black", elinewidth=0.9, capsize=2
            )
            top = hi
        labels = ["n/a" if np.isnan(v) else f"{v:.1f}" for v in values]
        if top is values:
            ax.bar_label(bars, labels=labels, fontsize=7, padding=2)
        else:  # after the interval's end, so the label never sits on the error bar
            span = max(1.0, float(np.nanmax(top)) if np.isfinite(top).any() else 1.0)
            for yi, x, text in zip(y, np.nan_to_num(top), labels, strict=True):
                ax.text(x + 0.015 * span, yi, text, va="center", fontsize=7)
        direction = (
            ""
            if column not in better
            else (" (higher is better)" if better[column] else " (lower is better)")
        )
        ax.set_title(wrap_title(f"{column}{direction}", fig, 1 / len(frame.columns)))
        ax.set_xlabel(xlabel)
        ax.set_xlim(0, max(1.0, float(np.nanmax(top)) if np.isfinite(top).any() else 1.0) * 1.18)
        ax.grid(True, axis="x")
    axes[0, 0].set_yticks(y, models)
    axes[0, 0].invert_yaxis()
    fig.suptitle(wrap_title(title, fig))
    return fig


@styled
def tsne_scatter(
    coords_by_model: Mapping[str, Any],
    distances_to_base: Mapping[str, float] | None = None,
    title: str = "t-SNE of mean-pooled last-layer hidden states (one point per prompt)",
    reference: str = "base",
    prompt_tasks: Sequence[str] | None = None,
    highlight: Sequence[str] = (),
) -> Figure:
    """Joint t-SNE map of several models (`embeddings.tsne_2d`); the paper's Figure 4 analogue.

    Colour = model; with `prompt_tasks` (the task of each prompt, the same order for every model) the marker
    shape is the prompt's task. Models in `highlight` (the fused ones) are drawn last, opaque and outlined, so
    they are not hidden under the others. Each legend entry carries the model's mean L2 distance to the
    `reference` model in the original hidden space (t-SNE distances are not meaningful across clusters).
    """
    if not coords_by_model:
        raise H3FusionError("tsne_scatter: no coordinates given")
    distances = distances_to_base or {}
    fig, axes = subplots(figsize=(6.5, 5.0), layout="constrained")
    ax = axes[0, 0]
    tasks = list(dict.fromkeys(prompt_tasks)) if prompt_tasks is not None else []
    order = sorted(enumerate(coords_by_model.items()), key=lambda item: item[1][0] in highlight)
    for i, (name, coords) in order:
        c = np.asarray(coords, dtype=float)
        if c.ndim != 2 or c.shape[1] != 2:
            raise H3FusionError(f"tsne_scatter: coordinates of {name!r} must be [n, 2], got {c.shape}")
        if prompt_tasks is not None and len(prompt_tasks) != len(c):
            raise H3FusionError(
                f"tsne_scatter: {len(prompt_tasks)} prompt tasks for {len(c)} points of {name!r}"
            )
        label = name if name not in distances else f"{name} (mean L2 to {reference}: {distances[name]:.2f})"
        strong = name in highlight
        style = {
            "s": 34 if strong else 18,
            "alpha": 1.0 if strong else 0.45,
            "color": color(i),
            "edgecolors": "black" if strong else "none",
            "linewidths": 0.6,
            "zorder": 3 if strong else 2,
        }
        if not tasks:
            ax.scatter(c[:, 0], c[:, 1], marker=marker(i), label=label, **style)
            continue
        for j, task in enumerate(tasks):
            rows = np.asarray([t == task for t in prompt_tasks])
            ax.scatter(c[rows, 0], c[rows, 1], marker=marker(j), label=label if j == 0 else None, **style)
    if tasks:
        for j, task in enumerate(tasks):
            ax.scatter([], [], marker=marker(j), color="0.4", label=f"marker: {task} prompts")
    ax.set_xlabel("t-SNE dimension 1 (arbitrary units)")
    ax.set_ylabel("t-SNE dimension 2 (arbitrary units)")
    ax.set_title(wrap_title(title, fig, 0.9))
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=1, frameon=False)
    return fig
