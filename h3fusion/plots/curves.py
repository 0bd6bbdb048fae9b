"""Line figures: a metric against a swept setting (the ablations) and loss terms against the training step."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from h3fusion.errors import H3FusionError

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

from h3fusion.plots.style import (
    LOSS_TERMS,
    color,
    marker,
    styled,
    subplots,
    wrap_title,
)


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


@styled
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
    fig, axes = subplots(figsize=(6.0, 3.8), layout="constrained")
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
    ax.set_title(wrap_title(title or f"Sensitivity of the metrics to {xlabel}", fig, 0.7))
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
    return fig


def _series(history: Sequence[Mapping[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of one key in a Trainer log history (eval and summary entries lack it)."""
    rows = [(r["step"], r[key]) for r in history if key in r and "step" in r and np.isfinite(r[key])]
    if not rows:
        return np.array([]), np.array([])
    steps, values = zip(*rows, strict=True)
    return np.asarray(steps, dtype=float), np.asarray(values, dtype=float)


@styled
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
    fig, axes = subplots(rows, cols, figsize=(5.0 * cols + 1.5, 3.2 * rows), layout="constrained")
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
    fig.suptitle(wrap_title(title, fig))
    return fig
