"""Figures from results Datasets: files in both formats, panels fed by the right data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ntrace.analyze import AnalysisOptions, analyze_trace
from ntrace.errors import UsageError
from ntrace.plot import exploration_figure, make_figures, regret_figure


@pytest.fixture(scope="module")
def results(mlp_mse, mlp_ce):
    a = analyze_trace(mlp_mse, AnalysisOptions(checkpoints=4))
    b = analyze_trace(mlp_ce, AnalysisOptions(checkpoints=4, exploration=False))
    return a, b


def test_single_and_compared_figures(results, tmp_path: Path) -> None:
    a, b = results
    one = make_figures([a], tmp_path / "one", ["sgd"])
    assert sorted(p.name for p in one) == ["fig3_regret.png", "fig3_regret.svg",
                                           "fig5_exploration.png", "fig5_exploration.svg"]
    two = make_figures([a, b], tmp_path / "two", ["mse", "ce"])
    assert {p.name for p in two} >= {"fig4_optimizers.png", "fig4_optimizers.svg"}
    for p in one + two:
        assert p.stat().st_size > 1000
    with pytest.raises(UsageError, match="labels"):
        make_figures([a], tmp_path, ["x", "y"])


def test_panels_plot_the_results(results) -> None:
    a, _ = results
    fig = regret_figure([a], ["sgd"])
    neuron_ax, layer_ax, loss_ax, _ = fig.axes[:4]
    layers = np.unique(a.neuron_layer.values)
    assert len(neuron_ax.lines) == len(layers)  # one mean curve (and band) per layer
    first = a.layer.values[0]
    mean0 = np.nanmean(a.neuron_regret_over_sqrt_n.sel(neuron_layer=first).values, 1)
    np.testing.assert_allclose(neuron_ax.lines[0].get_ydata(), mean0)
    np.testing.assert_allclose(layer_ax.lines[-1].get_ydata(), a.network_regret_over_sqrt_n)
    np.testing.assert_allclose(loss_ax.lines[0].get_ydata(), a.taylor_loss)
    ex = exploration_figure([a], ["sgd"])
    np.testing.assert_allclose(ex.axes[1].lines[0].get_ydata(), a.switch_fraction_sorted)
