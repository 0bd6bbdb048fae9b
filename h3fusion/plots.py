"""Shared matplotlib figures for the notebooks: one function per figure kind, arrays in, a Figure out.

One style everywhere: the Okabe-Ito colour-blind-safe palette for categories (experts, models, runs), with
distinct markers where points overlap, and the perceptually uniform `viridis` map for heat-maps. Every figure
has a title that says what is shown and axis labels with units.

Figures are made with pyplot, so they show inline in a notebook; assign the result (``fig = ...``) instead of
leaving the call as a cell's last expression, or Jupyter displays it twice. This module never selects a
backend (notebooks keep the inline one; tests pick Agg themselves).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from h3fusion.errors import H3FusionError

if TYPE_CHECKING:
    import pandas as pd
    from IPython.display import Markdown
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

OKABE_ITO: tuple[str, ...] = (
    "#0072B2",  # blue
    "#E69F00",  # orange
    "#009E73",  # bluish green
    "#CC79A7",  # reddish purple
    "#56B4E9",  # sky blue
    "#D55E00",  # vermillion
    "#F0E442",  # yellow
    "#000000",  # black
)
"""Okabe & Ito (2008): distinguishable with every common colour-vision deficiency."""
MARKERS: tuple[str, ...] = ("o", "s", "^", "D", "v", "P", "X", "*")
HEATMAP_CMAP = "viridis"
STYLE: dict[str, Any] = {
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "figure.titlesize": 12,
    "legend.fontsize": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": False,
    "grid.alpha": 0.3,
    "figure.dpi": 100,
    "savefig.dpi": 150,
    "savefig.bbox": "tight",
}

LOSS_TERMS: dict[str, str] = {
    "loss": "total loss",
    "lm_loss": "LM loss (nats/token)",
    "gate_loss": "gating loss (nats)",
    "drift_loss": "drift penalty (weighted squared norm)",
}
"""Default log keys of a fusion run -> panel labels (a key absent from every run gets no panel)."""


def color(i: int) -> str:
    """The i-th category colour (cycles after 8; pair it with `marker(i)` when there are more)."""
    return OKABE_ITO[i % len(OKABE_ITO)]


def marker(i: int) -> str:
    return MARKERS[i % len(MARKERS)]


def _pyplot() -> Any:
    import matplotlib.pyplot as plt

    return plt


def _subplots(nrows: int = 1, ncols: int = 1, **kwargs: Any) -> tuple[Figure, Any]:
    return _pyplot().subplots(nrows, ncols, squeeze=False, **kwargs)


def _styled(func: Any) -> Any:
    """Run a figure function under the shared rcParams (text artists take their style when created)."""
    import functools

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        plt = _pyplot()
        with plt.rc_context(STYLE):
            figure = func(*args, **kwargs)
            interactive = plt.isinteractive()
        # Jupyter's inline backend switches interactive mode on when the first figure activates it; if that
        # happened inside rc_context, leaving it would switch it off again and no later figure would be shown.
        plt.interactive(interactive)
        return figure

    return wrapper


def _wrap(text: str, fig: Figure, share: float = 1.0) -> str:
    """Wrap a title to the width it gets (about 13 characters per inch at 11 pt), so it is never cut off."""
    import textwrap

    width = max(20, int(fig.get_figwidth() * share * 13))
    return "\n".join(textwrap.wrap(text, width)) if len(text) > width else text


def _matrix(matrix: Any, what: str) -> np.ndarray:
    m = np.asarray(matrix, dtype=float)
    if m.ndim != 2 or 0 in m.shape:
        raise H3FusionError(f"{what}: expects a non-empty 2-d array, got shape {m.shape}")
    return m


def _names(names: Sequence[str] | None, n: int, default: str, what: str) -> list[str]:
    if names is None:
        return [f"{default} {i}" for i in range(n)]
    names = list(names)
    if len(names) != n:
        raise H3FusionError(
            f"{what}: {len(names)} names given for {n} {default}s; pass one name per {default}"
        )
    return names


# ---------------------------------------------------------------------------------------------- routing


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


@_styled
def routing_heatmap(
    matrix: Any,
    expert_names: Sequence[str] | None = None,
    title: str = "Mean router probability per layer and expert",
    vmin: float | None = None,
    vmax: float | None = None,
) -> Figure:
    """Heat-map of a routing profile [layers, experts] (from `analysis.routing_profile`); the colour scale
    spans the data unless `vmin`/`vmax` are given (router probabilities often span a few hundredths)."""
    m = _matrix(matrix, "routing_heatmap")
    vmin, vmax = _colour_range([m], vmin, vmax)
    names = _names(expert_names, m.shape[1], "expert", "routing_heatmap")
    fig, axes = _subplots(
        figsize=(max(5.0, 0.35 * m.shape[0] + 2.5), 0.45 * m.shape[1] + 1.6), layout="constrained"
    )
    ax = axes[0, 0]
    image = _draw_heatmap(ax, m, names, vmin, vmax, annotate=m.shape[0] <= 16)
    ax.set_ylabel("expert")
    ax.set_title(_wrap(title, fig, 0.85))
    fig.colorbar(image, ax=ax, label="mean router probability", fraction=0.05, pad=0.02)
    return fig


@_styled
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
    first = _matrix(matrices[variants[0]][tasks[0]], "routing_heatmap_grid")
    names = _names(expert_names, first.shape[1], "expert", "routing_heatmap_grid")
    vmin, vmax = _colour_range(
        [_matrix(matrices[v][t], "routing_heatmap_grid") for v in variants for t in tasks], vmin, vmax
    )
    panels = [(v, t) for v in variants for t in tasks]
    height = len(panels) * (0.28 * first.shape[1] + 0.75) + 1.0
    fig, axes = _subplots(len(panels), 1, figsize=(8.5, height), sharex=True, layout="constrained")
    axes = np.asarray(axes).reshape(-1)
    image = None
    for i, (variant, task) in enumerate(panels):
        ax = axes[i]
        m = _matrix(matrices[variant][task], "routing_heatmap_grid")
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
    fig.suptitle(_wrap(title, fig))
    return fig


@_styled
def router_weight_bars(
    matrix: Any,
    task_names: Sequence[str] | None = None,
    expert_names: Sequence[str] | None = None,
    title: str = "Mean router weight per expert, by task of the prompts (averaged over layers and tokens)",
) -> Figure:
    """Grouped bars of a [tasks, experts] matrix (`analysis.task_expert_matrix`); the paper's Figure 2 analogue.

    A dashed line marks uniform routing (1 / experts): bars above it show a preference for that expert.
    """
    m = _matrix(matrix, "router_weight_bars")
    tasks = _names(task_names, m.shape[0], "task", "router_weight_bars")
    experts = _names(expert_names, m.shape[1], "expert", "router_weight_bars")
    fig, axes = _subplots(figsize=(max(5.0, 1.6 * len(tasks) + 2.5), 3.8), layout="constrained")
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
    ax.set_title(_wrap(title, fig, 0.7))
    ax.legend(title="router weight of", loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
    return fig


# ---------------------------------------------------------------------------------------------- ablations


def _x_scale(ax: Axes, x: np.ndarray) -> None:
    """Log x for log-spaced values (gamma 1e-4 ... 1, lambda 0.1 ... 1); symlog when 0 is among them
    (lambda = 0), so that 0, 0.1 and 1 are evenly spaced rather than 0 and 0.1 on top of each other."""
    positive = x[x > 0]
    if len(positive) < 2 or (x < 0).any() or positive.max() / positive.min() < 10:
        return
    if (x == 0).any():
        ax.set_xscale("symlog", linthresh=float(positive.min()))
    else:
        ax.set_xscale("log")
    ax.set_xticks(x, [f"{v:g}" for v in x])
    ax.minorticks_off()


@_styled
def sensitivity_lines(
    x: Sequence[float],
    ys: Mapping[str, Sequence[float]],
    xlabel: str,
    ylabel: str = "score (%)",
    title: str | None = None,
) -> Figure:
    """One line per metric against a swept hyper-parameter (lambda, gamma, k, steps); the paper's Figure 3."""
    xs = np.asarray(x, dtype=float)
    if xs.ndim != 1 or len(xs) == 0 or not ys:
        raise H3FusionError("sensitivity_lines: pass a 1-d x and at least one {metric: values} series")
    fig, axes = _subplots(figsize=(6.0, 3.8), layout="constrained")
    ax = axes[0, 0]
    for i, (metric, values) in enumerate(ys.items()):
        v = np.asarray(values, dtype=float)
        if v.shape != xs.shape:
            raise H3FusionError(f"sensitivity_lines: {metric!r} has {v.size} values for {xs.size} x values")
        ax.plot(xs, v, marker=marker(i), color=color(i), label=metric, linewidth=1.5)
    _x_scale(ax, xs)
    ax.grid(True, axis="y")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(_wrap(title or f"Sensitivity of the metrics to {xlabel}", fig, 0.7))
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
    return fig


# ---------------------------------------------------------------------------------------------- embeddings


@_styled
def tsne_scatter(
    coords_by_model: Mapping[str, Any],
    distances_to_base: Mapping[str, float] | None = None,
    title: str = "t-SNE of mean-pooled last-layer hidden states (one point per prompt)",
    reference: str = "base",
    prompt_tasks: Sequence[str] | None = None,
    highlight: Sequence[str] = (),
) -> Figure:
    """Joint t-SNE map of several models (`analysis.tsne_2d`); the paper's Figure 4 analogue.

    Colour = model; with `prompt_tasks` (the task of each prompt, the same order for every model) the marker
    shape is the prompt's task. Models in `highlight` (the fused ones) are drawn last, opaque and outlined, so
    they are not hidden under the others. Each legend entry carries the model's mean L2 distance to the
    `reference` model in the original hidden space (t-SNE distances are not meaningful across clusters).
    """
    if not coords_by_model:
        raise H3FusionError("tsne_scatter: no coordinates given")
    distances = distances_to_base or {}
    fig, axes = _subplots(figsize=(6.5, 5.0), layout="constrained")
    ax = axes[0, 0]
    tasks = list(dict.fromkeys(prompt_tasks)) if prompt_tasks is not None else []
    order = sorted(enumerate(coords_by_model.items()), key=lambda item: item[1][0] in highlight)
    for i, (name, coords) in order:
        c = np.asarray(coords, dtype=float)
        if c.ndim != 2 or c.shape[1] != 2:
            raise H3FusionError(f"tsne_scatter: coordinates of {name!r} must be [n, 2], got {c.shape}")
        if prompt_tasks is not None and len(prompt_tasks) != len(c):
            raise H3FusionError(f"tsne_scatter: {len(prompt_tasks)} prompt tasks for {len(c)} points of {name!r}")
        label = name if name not in distances else f"{name} (mean L2 to {reference}: {distances[name]:.2f})"
        strong = name in highlight
        style = {"s": 34 if strong else 18, "alpha": 1.0 if strong else 0.45, "color": color(i),
                 "edgecolors": "black" if strong else "none", "linewidths": 0.6, "zorder": 3 if strong else 2}
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
    ax.set_title(_wrap(title, fig, 0.9))
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=1, frameon=False)
    return fig


# ---------------------------------------------------------------------------------------------- training


def _series(history: Sequence[Mapping[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of one key in a Trainer log history (eval and summary entries lack it)."""
    rows = [(r["step"], r[key]) for r in history if key in r and "step" in r and np.isfinite(r[key])]
    if not rows:
        return np.array([]), np.array([])
    steps, values = zip(*rows, strict=True)
    return np.asarray(steps, dtype=float), np.asarray(values, dtype=float)


@_styled
def training_curves(
    log_history_by_run: Mapping[str, Sequence[Mapping[str, Any]]],
    terms: Mapping[str, str] | None = None,
    title: str = "Fusion training: loss terms per step",
) -> Figure:
    """One panel per loss term (total, LM, gate, drift), one line per run (e.g. with / without gating loss).

    `log_history_by_run` maps a run's name to its ``trainer.state.log_history``; `terms` maps log keys to panel
    labels (default `LOSS_TERMS`). Terms that no run logged are left out.
    """
    terms = dict(terms or LOSS_TERMS)
    if not log_history_by_run:
        raise H3FusionError("training_curves: no runs given; pass {run name: trainer.state.log_history}")
    present = [k for k in terms if any(_series(h, k)[0].size for h in log_history_by_run.values())]
    if not present:
        raise H3FusionError(
            f"training_curves: none of the keys {list(terms)} is in the log histories; pass `terms` with the "
            f"keys the trainer logged"
        )
    cols = min(len(present), 2)
    rows = (len(present) + cols - 1) // cols
    fig, axes = _subplots(rows, cols, figsize=(5.0 * cols + 1.5, 3.2 * rows), layout="constrained")
    for idx, key in enumerate(present):
        ax = axes[idx // cols, idx % cols]
        for i, (run, history) in enumerate(log_history_by_run.items()):
            steps, values = _series(history, key)
            if steps.size:
                ax.plot(
                    steps, values, color=color(i), marker=marker(i), markersize=3, linewidth=1.3, label=run
                )
        ax.set_xlabel("training step")
        ax.set_ylabel(terms[key])
        ax.grid(True, axis="y")
    for idx in range(len(present), rows * cols):
        axes[idx // cols, idx % cols].remove()
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, title="run", loc="outside right upper", frameon=False)
    fig.suptitle(_wrap(title, fig))
    return fig


# ---------------------------------------------------------------------------------------------- results


def _table(table: Any) -> pd.DataFrame:
    import pandas as pd

    frame = table if isinstance(table, pd.DataFrame) else pd.DataFrame(table)
    if frame.empty:
        raise H3FusionError("results_bars: the table is empty; pass models as rows and dimensions as columns")
    return frame.apply(pd.to_numeric, errors="coerce")


@_styled
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
    fig, axes = _subplots(
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
            ax.errorbar(np.nan_to_num(values), y, xerr=err, fmt="none", ecolor="black", elinewidth=0.9, capsize=2)
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
        ax.set_title(_wrap(f"{column}{direction}", fig, 1 / len(frame.columns)))
        ax.set_xlabel(xlabel)
        ax.set_xlim(0, max(1.0, float(np.nanmax(top)) if np.isfinite(top).any() else 1.0) * 1.18)
        ax.grid(True, axis="x")
    axes[0, 0].set_yticks(y, models)
    axes[0, 0].invert_yaxis()
    fig.suptitle(_wrap(title, fig))
    return fig


# ---------------------------------------------------------------------------------------------- captions


def caption(number: str, text: str) -> Markdown:
    """Show ``**Figure {number}.** {text}`` under the figure(s) the cell drew so far, and return the Markdown.

    Under the notebooks' inline backend, pyplot figures are only shown when the cell ends, i.e. *after* any
    caption; so open figures are shown first (``plt.show()``, which also closes them) when that backend is on.
    """
    import sys

    from IPython.display import Markdown, display

    plt = sys.modules.get("matplotlib.pyplot")
    if plt is not None and "inline" in plt.get_backend() and plt.get_fignums():
        plt.show()
    markdown = Markdown(f"**Figure {number}.** {text}")
    display(markdown)
    return markdown
