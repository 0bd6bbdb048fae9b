"""Shared matplotlib figures for the notebooks: one function per figure kind, arrays in, a Figure out.

One style everywhere: the Okabe-Ito colour-blind-safe palette for categories (experts, models, runs), with
distinct markers where points overlap, and the perceptually uniform `viridis` map for heat-maps. Every figure
has a title that says what is shown and axis labels with units.

Figures are made with pyplot, so they show inline in a notebook; assign the result (``fig = ...``) instead of
leaving the call as a cell's last expression, or Jupyter displays it twice. This module never selects a
backend (notebooks keep the inline one; tests pick Agg themselves).

A package: `style` (palette, rcParams, shared helpers, captions), `routing` (heat-maps, router-weight bars),
`curves` (sensitivity lines, training curves), `results` (result bars, t-SNE). The notebooks use it as
``from h3fusion import plots``.
"""

from h3fusion.plots.curves import sensitivity_lines, training_curves
from h3fusion.plots.results import results_bars, tsne_scatter
from h3fusion.plots.routing import router_weight_bars, routing_heatmap, routing_heatmap_grid
from h3fusion.plots.style import HEATMAP_CMAP, LOSS_TERMS, MARKERS, OKABE_ITO, STYLE, caption, color, marker

__all__ = [
    "HEATMAP_CMAP",
    "LOSS_TERMS",
    "MARKERS",
    "OKABE_ITO",
    "STYLE",
    "caption",
    "color",
    "marker",
    "results_bars",
    "router_weight_bars",
    "routing_heatmap",
    "routing_heatmap_grid",
    "sensitivity_lines",
    "training_curves",
    "tsne_scatter",
]
