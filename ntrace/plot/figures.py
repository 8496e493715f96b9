"""Figures of an analysis, after the paper: Fig. 3 (regret), Fig. 4 (optimizers compared)
and Fig. 5 (exploration). Fed by results Datasets only; matplotlib without pyplot (no global
state, no display: figures render with the Agg canvas), saved as PNG and SVG.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import xarray as xr
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from ntrace.errors import UsageError

FORMATS = ("png", "svg")


def _colors(n: int) -> list[tuple[float, float, float, float]]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def _names(ds: xr.Dataset) -> list[str]:
    return list(ds.attrs["ntrace"]["layer_names"])


def _log(ax: Axes, axis: str) -> None:
    """A log scale on ``axis`` if something finite and positive was drawn along it; an axes
    with nothing to show (e.g. every optimum unbounded) says so instead."""
    vals = []
    for line in ax.get_lines():
        x, y = (np.asarray(v, dtype=np.float64) for v in line.get_data())
        ok = np.isfinite(x) & np.isfinite(y)
        vals.append((x if axis == "x" else y)[ok])
    v = np.concatenate(vals) if vals else np.zeros(0)
    if (v > 0).any():
        (ax.set_xscale if axis == "x" else ax.set_yscale)("log")
    elif not v.size:
        ax.text(0.5, 0.5, "no finite values (e.g. unbounded optima)", ha="center",
                va="center", transform=ax.transAxes, color="grey")


def _band(ax: Axes, x: np.ndarray, y: np.ndarray, color: object, label: str) -> None:
    """Mean over the last axis with a ±1 s.d. band (NaNs ignored)."""
    with np.errstate(invalid="ignore"):
        ok = np.isfinite(y)
        cnt = ok.sum(1)
        yz = np.where(ok, y, 0.0)
        m = np.where(cnt > 0, yz.sum(1) / np.maximum(cnt, 1), np.nan)
        sd = np.sqrt(np.where(cnt > 0, (np.where(ok, y - m[:, None], 0.0) ** 2).sum(1)
                              / np.maximum(cnt, 1), np.nan))
    ax.plot(x, m, color=color, label=label)
    ax.fill_between(x, m - sd, m + sd, color=color, alpha=0.2, linewidth=0)


def _neuron_panel(ax: Axes, dss: Sequence[xr.Dataset], labels: Sequence[str]) -> None:
    ax.set_title("neuron regret / √N (mean ± 1 s.d.)")
    single = len(dss) == 1
    for k, ds in enumerate(dss):
        if "neuron_regret_over_sqrt_n" not in ds:
            continue
        x = ds.checkpoint.values
        y = ds.neuron_regret_over_sqrt_n.values
        if single:
            layers = ds.neuron_layer.values
            names = _names(ds)
            cols = _colors(len(names))
            for li, name in enumerate(names):
                if (layers == name).any():
                    _band(ax, x, y[:, layers == name], cols[li], name)
        else:
            _band(ax, x, y, _colors(len(dss))[k], labels[k])
    _log(ax, "x")
    ax.set_xlabel("Taylor rounds N")


def _layer_panel(ax: Axes, dss: Sequence[xr.Dataset], labels: Sequence[str]) -> None:
    ax.set_title("layer / network regret / √N")
    single = len(dss) == 1
    for k, ds in enumerate(dss):
        x = ds.checkpoint.values
        c = _colors(len(dss))[k]
        if "layer_regret_over_sqrt_n" in ds:
            y = ds.layer_regret_over_sqrt_n.values
            if single:
                cols = _colors(y.shape[1])
                for li, name in enumerate(_names(ds)):
                    if np.isfinite(y[:, li]).any():
                        ax.plot(x, y[:, li], color=cols[li], label=name)
            else:
                _band(ax, x, y, c, f"{labels[k]} (layers)")
        if "network_regret_over_sqrt_n" in ds:
            ax.plot(x, ds.network_regret_over_sqrt_n.values, color="k" if single else c,
                    linestyle="--", label="network" if single else f"{labels[k]} (network)")
    _log(ax, "x")
    ax.set_xlabel("Taylor rounds N")


def _loss_panel(ax: Axes, dss: Sequence[xr.Dataset], labels: Sequence[str]) -> None:
    ax.set_title("loss at the iterate (recorded samples)")
    for k, ds in enumerate(dss):
        ax.plot(ds.round_index.values, ds.taylor_loss.values, color=_colors(len(dss))[k],
                label=labels[k], linewidth=0.8)
    _log(ax, "y")
    ax.set_xlabel("training round")


def _cumulative_panel(ax: Axes, dss: Sequence[xr.Dataset], labels: Sequence[str]) -> None:
    ax.set_title("cumulative loss and N × Taylor optimum, / √N")
    for k, ds in enumerate(dss):
        c = _colors(len(dss))[k]
        x = ds.checkpoint.values
        ax.plot(x, ds.cumulative_loss_over_sqrt_n.values, color=c,
                label=f"{labels[k]}: cumulative loss")
        for scale, style in (("network", "--"), ("layer", ":")):
            key = f"{scale}_optimum_total_over_sqrt_n"
            if key in ds:
                y = ds[key].values
                y = y if y.ndim == 1 else np.nanmean(np.where(np.isfinite(y), y, np.nan), 1)
                ax.plot(x, y, color=c, linestyle=style,
                        label=f"{labels[k]}: N × {scale} optimum"
                              + (" (mean over layers)" if scale == "layer" else ""))
                break
    _log(ax, "x")
    ax.set_xlabel("Taylor rounds N")


def _legend(ax: Axes) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="best")


def regret_figure(dss: Sequence[xr.Dataset], labels: Sequence[str]) -> Figure:
    """Fig. 3: neuron and layer regret / √N, loss, cumulative loss and Taylor optimum."""
    fig = Figure(figsize=(11, 8), layout="constrained")
    axes = fig.subplots(2, 2)
    _neuron_panel(axes[0, 0], dss, labels)
    _layer_panel(axes[0, 1], dss, labels)
    _loss_panel(axes[1, 0], dss, labels)
    _cumulative_panel(axes[1, 1], dss, labels)
    for ax in axes.flat:
        _legend(ax)
    fig.suptitle(f"Regret against the hindsight Taylor optimum (domain "
                 f"{dss[0].attrs['ntrace']['domain']})")
    return fig


def _exponents(ds: xr.Dataset) -> list[tuple[str, float, float, float]]:
    out = []
    if "network_regret_exponent" in ds:
        out.append(("network", float(ds.network_regret_exponent),
                    float(ds.network_regret_exponent_low),
                    float(ds.network_regret_exponent_high)))
    if "layer_regret_exponent" in ds:
        e = ds.layer_regret_exponent.values
        if np.isfinite(e).any():
            m, s = float(np.nanmean(e)), float(np.nanstd(e))
            out.append(("layers", m, m - s, m + s))
    if "neuron_regret_exponent" in ds:
        e = ds.neuron_regret_exponent.values
        if np.isfinite(e).any():
            m, s = float(np.nanmean(e)), float(np.nanstd(e))
            out.append(("neurons", m, m - s, m + s))
    return out


def optimizers_figure(dss: Sequence[xr.Dataset], labels: Sequence[str]) -> Figure:
    """Fig. 4: several traces (e.g. SGD, RMSProp, Adam) compared."""
    fig = Figure(figsize=(11, 8), layout="constrained")
    axes = fig.subplots(2, 2)
    _neuron_panel(axes[0, 0], dss, labels)
    _layer_panel(axes[0, 1], dss, labels)
    _loss_panel(axes[1, 0], dss, labels)
    ax = axes[1, 1]
    ax.set_title("regret exponent (network: CI; layers/neurons: mean ± s.d.)")
    cols = _colors(len(dss))
    kinds = ["network", "layers", "neurons"]
    width = 0.8 / max(len(dss), 1)
    for k, ds in enumerate(dss):
        for kind, m, lo, hi in _exponents(ds):
            xpos = kinds.index(kind) + (k - (len(dss) - 1) / 2) * width
            ax.bar(xpos, m, width=width * 0.9, color=cols[k],
                   label=labels[k] if kind == _exponents(ds)[0][0] else None)
            ax.errorbar(xpos, m, yerr=[[m - lo], [hi - m]], color="k", capsize=3)
    ax.axhline(0.5, color="grey", linestyle=":", label="0.5 (paper)")
    ax.set_xticks(range(3), kinds)
    for a in axes.flat:
        _legend(a)
    fig.suptitle("Optimizers compared")
    return fig


def exploration_figure(dss: Sequence[xr.Dataset], labels: Sequence[str]) -> Figure:
    """Fig. 5: (a) distance to the nearest earlier configuration, (b) switch fractions per
    probe point, sorted, (c) log-product of singular values per unit, sorted."""
    fig = Figure(figsize=(13, 4), layout="constrained")
    axes = fig.subplots(1, 3)
    cols = _colors(len(dss))
    for k, ds in enumerate(dss):
        if "min_distance" not in ds:
            continue
        axes[0].plot(ds.snapshot_round.values[1:], ds.min_distance_fraction.values[1:],
                     color=cols[k], label=labels[k], linewidth=0.8)
        axes[1].plot(ds.switch_fraction_sorted.values, color=cols[k], label=labels[k])
        axes[2].plot(ds.log_volume_sorted.values, color=cols[k], label=labels[k])
    axes[0].set_title("(a) min_{k<n} |A_n − A_k|² / (probe × units)")
    axes[0].set_xlabel("training round")
    axes[1].set_title("(b) activation switches / possible, per probe point")
    axes[1].set_xlabel("probe points (sorted)")
    axes[2].set_title("(c) Σ log σ_i (first singular values), per unit")
    axes[2].set_xlabel("hidden units (sorted)")
    for a in axes:
        _legend(a)
    return fig


def save_figure(fig: Figure, out_dir: str | os.PathLike[str], name: str) -> list[Path]:
    """Write ``name.png`` and ``name.svg`` into ``out_dir`` (created if needed)."""
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in FORMATS:
        p = d / f"{name}.{fmt}"
        fig.savefig(p, format=fmt, dpi=120)
        paths.append(p)
    return paths


def make_figures(dss: Sequence[xr.Dataset], out_dir: str | os.PathLike[str],
                 labels: Sequence[str] | None = None) -> list[Path]:
    """Every figure for one results Dataset (Fig. 3, 5) or several (Fig. 3, 4, 5 overlaid)."""
    if not dss:
        raise UsageError("no results to plot")
    labels = list(labels) if labels is not None else [f"trace {i}" for i in range(len(dss))]
    if len(labels) != len(dss):
        raise UsageError(f"{len(labels)} labels for {len(dss)} results")
    paths = save_figure(regret_figure(dss, labels), out_dir, "fig3_regret")
    if len(dss) > 1:
        paths += save_figure(optimizers_figure(dss, labels), out_dir, "fig4_optimizers")
    if any("min_distance" in ds for ds in dss):
        paths += save_figure(exploration_figure(dss, labels), out_dir, "fig5_exploration")
    return paths
