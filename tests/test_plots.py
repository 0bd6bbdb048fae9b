"""Every figure function returns a Figure with the expected panels and artists on small inputs."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from h3fusion import plots  # noqa: E402
from h3fusion.errors import H3FusionError  # noqa: E402

EXPERTS = ["helpful", "harmless", "honest"]


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _profile(layers: int, experts: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).random((layers, experts))
    return x / x.sum(axis=1, keepdims=True)


def _legend_texts(fig: Figure) -> list[str]:
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend()] + list(fig.legends)
    return [t.get_text() for legend in legends for t in legend.get_texts()]


def test_routing_heatmap_one_cell_per_layer_and_expert():
    m = _profile(5, 3)
    fig = plots.routing_heatmap(m, EXPERTS, title="routing")
    assert isinstance(fig, Figure)
    heat, bar = fig.axes  # the heat-map and its colour bar
    image = heat.get_images()[0]
    np.testing.assert_array_equal(image.get_array(), m.T)  # experts as rows, layers as columns
    assert [t.get_text() for t in heat.get_yticklabels()] == EXPERTS
    assert len(heat.texts) == m.size  # small maps are annotated with their values
    assert bar.get_ylabel() == "mean router probability"
    assert image.get_clim() == pytest.approx((m.min(), m.max()))  # the scale spans the data, not 0-1


def test_heatmap_grid_shares_one_colour_scale_spanning_every_panel():
    near = {"a": {"t": np.full((4, 3), 0.33) + np.arange(3) * 0.01}, "b": {"t": np.full((4, 3), 0.30)}}
    fig = plots.routing_heatmap_grid(near, EXPERTS)
    clims = [ax.get_images()[0].get_clim() for ax in fig.axes if ax.get_images()]
    assert len(clims) == 2 and all(c == pytest.approx((0.30, 0.35)) for c in clims)


def test_a_sweep_with_zero_and_a_tenfold_range_gets_a_symlog_axis():
    fig = plots.sensitivity_lines([0.0, 0.1, 1.0], {"m": [1, 2, 3]}, xlabel="lambda")
    assert fig.axes[0].get_xscale() == "symlog"


def test_tsne_draws_highlighted_models_on_top_with_task_markers():
    rng = np.random.default_rng(0)
    coords = {"base": rng.normal(size=(6, 2)), "fused": rng.normal(size=(6, 2))}
    fig = plots.tsne_scatter(coords, prompt_tasks=["a", "a", "b", "b", "c", "c"], highlight=["fused"])
    ax = fig.axes[0]
    fused = [c for c in ax.collections if len(c.get_offsets()) and c.get_zorder() == 3]
    others = [c for c in ax.collections if len(c.get_offsets()) and c.get_zorder() == 2]
    assert len(fused) == 3 and len(others) == 3  # one scatter per task and model
    assert all(c.get_alpha() == 1.0 for c in fused) and all(c.get_alpha() < 1.0 for c in others)
    with pytest.raises(H3FusionError, match="prompt tasks"):
        plots.tsne_scatter(coords, prompt_tasks=["a"])


def test_routing_heatmap_rejects_wrong_names():
    with pytest.raises(H3FusionError, match="one name per expert"):
        plots.routing_heatmap(_profile(4, 3), ["a", "b"])


def test_routing_heatmap_grid_panels():
    tasks = ["helpful", "harmless", "honest"]
    matrices = {v: {t: _profile(6, 3, i) for i, t in enumerate(tasks)} for v in ("no gate loss", "gate loss")}
    fig = plots.routing_heatmap_grid(matrices, EXPERTS)
    assert isinstance(fig, Figure)
    assert len(fig.axes) == len(tasks) * 2 + 1  # panels + one shared colour bar
    assert sum(len(ax.get_images()) for ax in fig.axes) == len(tasks) * 2
    assert {ax.get_title(loc="left") for ax in fig.axes} >= {"no gate loss", "gate loss"}  # above its panels
    matrices["gate loss"] = dict(reversed(list(matrices["gate loss"].items())))
    with pytest.raises(H3FusionError, match="same order"):
        plots.routing_heatmap_grid(matrices, EXPERTS)


def test_router_weight_bars_groups():
    m = _profile(3, 4)
    fig = plots.router_weight_bars(m, ["a", "b", "c"], ["e0", "e1", "e2", "e3"])
    (ax,) = fig.axes
    assert len(ax.containers) == 4  # one bar group per expert
    heights = np.array([[bar.get_height() for bar in c] for c in ax.containers]).T
    np.testing.assert_allclose(heights, m)
    assert "uniform routing" in _legend_texts(fig)


def test_sensitivity_lines_one_line_per_metric_and_log_x():
    gammas = [1e-4, 1e-3, 1e-2, 1e-1]
    fig = plots.sensitivity_lines(gammas, {"MC1": [1, 2, 3, 4], "MC2": [2, 3, 4, 5]}, xlabel="gamma")
    (ax,) = fig.axes
    assert len(ax.get_lines()) == 2
    assert ax.get_xscale() == "log"
    with_zero = plots.sensitivity_lines([0, 1e-3, 1e-1], {"x": [1, 2, 3]}, xlabel="lambda")
    assert with_zero.axes[0].get_xscale() == "symlog"
    linear = plots.sensitivity_lines([1, 2, 3], {"x": [1, 2, 3]}, xlabel="k")
    assert linear.axes[0].get_xscale() == "linear"
    with pytest.raises(H3FusionError, match="values for 3 x"):
        plots.sensitivity_lines([1, 2, 3], {"x": [1, 2]}, xlabel="k")


def test_tsne_scatter_legend_carries_distances():
    rng = np.random.default_rng(0)
    coords = {name: rng.normal(size=(10, 2)) for name in ("base", "fused", "expert")}
    fig = plots.tsne_scatter(coords, {"fused": 1.234, "expert": 0.5})
    (ax,) = fig.axes
    assert len(ax.collections) == 3
    texts = _legend_texts(fig)
    assert texts[0] == "base"
    assert "1.23" in texts[1] and "fused" in texts[1]
    with pytest.raises(H3FusionError, match=r"\[n, 2\]"):
        plots.tsne_scatter({"bad": np.zeros((4, 3))})


def test_training_curves_one_panel_per_logged_term():
    history = [{"step": s, "loss": 2.0 / s, "lm_loss": 1.5 / s, "gate_loss": 0.5 / s} for s in range(1, 6)]
    history.append({"step": 5, "train_runtime": 3.0})  # the Trainer's summary entry has no loss
    runs = {"a": history, "b": history[:3]}
    fig = plots.training_curves(runs)
    assert len(fig.axes) == 3  # drift_loss was never logged: no panel for it
    assert all(len(ax.get_lines()) == 2 for ax in fig.axes)
    assert len(fig.axes[0].get_lines()[1].get_xdata()) == 3
    with pytest.raises(H3FusionError, match="none of the keys"):
        plots.training_curves({"a": [{"step": 1, "eval_loss": 1.0}]})


def test_results_bars_one_panel_per_dimension():
    table = pd.DataFrame(
        {"helpful": [40.0, 50.0], "harmless": [20.0, np.nan], "honest": [30.0, 35.0]},
        index=["base", "H3Fusion"],
    )
    fig = plots.results_bars(table, higher_is_better={"harmless": False}, highlight=["H3Fusion"])
    assert len(fig.axes) == 3
    assert all(len(ax.patches) == 2 for ax in fig.axes)
    assert "lower is better" in fig.axes[1].get_title()
    assert fig.axes[0].patches[1].get_edgecolor() == (
        0.0,
        0.0,
        0.0,
        1.0,
    )  # highlighted model outlined in black
    assert fig.axes[0].patches[0].get_edgecolor()[3] == 0.0  # the others have no outline
    assert [t.get_text() for t in fig.axes[1].texts] == ["20.0", "n/a"]
    with pytest.raises(H3FusionError, match="empty"):
        plots.results_bars(pd.DataFrame())


def test_long_titles_are_wrapped():
    fig = plots.router_weight_bars(_profile(2, 2), title="word " * 40)
    assert "\n" in fig.axes[0].get_title()


def test_caption_displays_a_numbered_figure_caption(monkeypatch):
    import IPython.display

    shown = []
    monkeypatch.setattr(IPython.display, "display", shown.append)
    fig = plots.results_bars({"x": {"a": 1.0}})
    md = plots.caption("1.2", "What the figure shows.")
    assert md.data == "**Figure 1.2.** What the figure shows."
    assert shown == [md]
    assert plt.fignum_exists(fig.number)  # outside the inline backend the figure is left alone
