"""Figures of a reproduction (several tasks × optimizers × seeds), fed by results Datasets:
Fig. 6 analogue (training curves, mean ± s.d. over seeds) and the regret exponents of every
optimizer and layer with their confidence intervals. Figures 3–5 come from
:mod:`ntrace.plot.figures`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import xarray as xr
from matplotlib.figure import Figure

from ntrace.plot.figures import _band, _colors

Grid = Mapping[str, Mapping[str, Sequence[xr.Dataset]]]
"""task → optimizer → results of its seeds."""


def smooth(y: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average over ``window`` rounds (shorter at the start)."""
    y = np.asarray(y, dtype=np.float64)
    if window <= 1 or y.size == 0:
        return y
    c = np.concatenate([[0.0], np.cumsum(y)])
    i = np.arange(1, y.size + 1)
    lo = np.maximum(0, i - window)
    return (c[i] - c[lo]) / (i - lo)


def training_curves_figure(grid: Grid) -> Figure:
    """Fig. 6: minibatch training loss per round (moving average over 2% of the run), one
    panel per task, mean ± 1 s.d. over seeds per optimizer."""
    tasks = list(grid)
    fig = Figure(figsize=(5.5 * max(len(tasks), 1), 4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, max(len(tasks), 1)))
    for ax, task in zip(axes, tasks, strict=False):
        opts = list(grid[task])
        cols = _colors(len(opts))
        for k, opt in enumerate(opts):
            curves = [ds.minibatch_loss.values for ds in grid[task][opt]]
            if not curves:
                continue
            n = min(len(c) for c in curves)
            w = max(1, n // 50)
            y = np.stack([smooth(c[:n], w) for c in curves], axis=1)
            _band(ax, np.arange(1, n + 1), y, cols[k], f"{opt} ({len(curves)} seed"
                  f"{'s' if len(curves) > 1 else ''})")
        ax.set_yscale("log")
        ax.set_title(f"{task}: training loss")
        ax.set_xlabel("training round")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    return fig


def _exponents(ds: xr.Dataset) -> list[tuple[str, float, float, float]]:
    """(unit, slope, low, high) for each layer (layer scale) and neuron mean per layer."""
    names = list(ds.attrs["ntrace"]["layer_names"])
    out = []
    for var, tag in (("layer_regret_exponent", ""), ("neuron_mean_regret_exponent", " n")):
        if var not in ds:
            continue
        for li, name in enumerate(names):
            s = float(ds[var].values[li])
            if np.isfinite(s):
                out.append((name + tag, s, float(ds[f"{var}_low"].values[li]),
                            float(ds[f"{var}_high"].values[li])))
    return out


def exponents_figure(grid: Grid) -> Figure:
    """Regret exponent of every layer (``name``) and of the mean neuron regret per layer
    (``name n``), per optimizer, with 95% intervals (first seed) and the seeds' estimates as
    dots; the band [0.3, 0.7] and the paper's 0.5 are drawn."""
    tasks = list(grid)
    fig = Figure(figsize=(6.5 * max(len(tasks), 1), 4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, max(len(tasks), 1)))
    for ax, task in zip(axes, tasks, strict=False):
        opts = list(grid[task])
        units: list[str] = []
        for opt in opts:
            for ds in grid[task][opt]:
                units += [u for u, *_ in _exponents(ds) if u not in units]
        cols = _colors(len(opts))
        width = 0.8 / max(len(opts), 1)
        for k, opt in enumerate(opts):
            for j, ds in enumerate(grid[task][opt]):
                for unit, s, lo, hi in _exponents(ds):
                    x = units.index(unit) + (k - (len(opts) - 1) / 2) * width
                    if j == 0:
                        ax.errorbar(x, s, yerr=[[max(s - lo, 0)], [max(hi - s, 0)]],
                                    fmt="o", color=cols[k], capsize=2, markersize=4,
                                    label=opt)
                    else:
                        ax.plot(x, s, ".", color=cols[k], alpha=0.6)
        ax.axhspan(0.3, 0.7, color="grey", alpha=0.12, linewidth=0)
        ax.axhline(0.5, color="grey", linestyle=":")
        ax.set_xticks(range(len(units)), units, rotation=45, ha="right", fontsize=7)
        ax.set_ylabel("regret exponent (log–log slope)")
        ax.set_title(f"{task}: regret ∝ N^exponent")
        handles, labels = ax.get_legend_handles_labels()
        if handles:
            uniq = dict(zip(labels, handles, strict=True))
            ax.legend(uniq.values(), uniq.keys(), fontsize=7)
    return fig
