"""The one style of every figure (palette, markers, heat-map map, rcParams), the helpers the figure modules share,
and numbered captions."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from h3fusion.errors import H3FusionError

if TYPE_CHECKING:
    from IPython.display import Markdown
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


def pyplot() -> Any:
    import matplotlib.pyplot as plt

    return plt


def subplots(nrows: int = 1, ncols: int = 1, **kwargs: Any) -> tuple[Figure, Any]:
    return pyplot().subplots(nrows, ncols, squeeze=False, **kwargs)


def styled(func: Any) -> Any:
    """Run a figure function under the shared rcParams (text artists take their style when created)."""
    import functools

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        plt = pyplot()
        with plt.rc_context(STYLE):
            figure = func(*args, **kwargs)
            interactive = plt.isinteractive()
        # Jupyter's inline backend switches interactive mode on when the first figure activates it; if that
        # happened inside rc_context, leaving it would switch it off again and no later figure would be shown.
        plt.interactive(interactive)
        return figure

    return wrapper


def wrap_title(text: str, fig: Figure, share: float = 1.0) -> str:
    """Wrap a title to the width it gets (about 13 characters per inch at 11 pt), so it is never cut off."""
    import textwrap

    width = max(20, int(fig.get_figwidth() * share * 13))
    return "\n".join(textwrap.wrap(text, width)) if len(text) > width else text


def as_matrix(matrix: Any, what: str) -> np.ndarray:
    m = np.asarray(matrix, dtype=float)
    if m.ndim != 2 or 0 in m.shape:
        raise H3FusionError(f"{what}: expects a non-empty 2-d array, got shape {m.shape}")
    return m


def names_for(names: Sequence[str] | None, n: int, default: str, what: str) -> list[str]:
    if names is None:
        return [f"{default} {i}" for i in range(n)]
    names = list(names)
    if len(names) != n:
        raise H3FusionError(
            f"{what}: {len(names)} names given for {n} {default}s; pass one name per {default}"
        )
    return names


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
