"""The page of ``ntrace view``: one Bokeh document per browser tab, fed by a :class:`Monitor`.

A table of the runs, a checkbox per run (the checked runs are overlaid on every chart) and the
charts: the minibatch loss; the Taylor loss at the iterates (running mean) against the
hindsight Taylor optima; regret ÷ √N per layer and per neuron (mean ± s.d. over a layer's
neurons), each with its fitted exponent in the legend; and the three exploration measures.
Every chart names its axes with their units and the comparator set H. A periodic callback
streams the new loss rows and replaces the analysis series when the monitor has new results,
so the page updates without reloading. Each data source has a name (``loss:K``,
``taylor:K``, ``layer_regret:K``, ``neuron_regret:K``, ``distance:K``, ``switches:K``,
``volume:K`` for run K) by which tests find it in the browser.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import xarray as xr
from bokeh.core.properties import value
from bokeh.core.validation import silence
from bokeh.core.validation.warnings import MISSING_RENDERERS
from bokeh.document import Document
from bokeh.layouts import column, gridplot, row
from bokeh.models import (
    CheckboxGroup,
    ColumnDataSource,
    DataTable,
    Div,
    GlyphRenderer,
    LegendItem,
    TableColumn,
    Title,
)
from bokeh.palettes import Category10_10
from bokeh.plotting import figure

from ntrace.view.runs import COLUMNS, Monitor, Run

silence(MISSING_RENDERERS, True)  # charts are empty until their runs have data

REFRESH_MS = 250
"""How often a page looks for new data (milliseconds)."""

LOSS_UNITS = {"mse": "mean squared error per output", "cross_entropy": "cross-entropy, nats",
              "bce_with_logits": "binary cross-entropy, nats per output",
              "nll": "negative log-likelihood, nats"}
DOMAIN_SHORT = {"none": "unconstrained (H = whole parameter space)",
                "ball": "ball around the mean iterate holding every iterate",
                "box": "coordinate range of the iterates"}
WIDTH, HEIGHT = 620, 330


def _figure(title: str, h: str, x: str, y: str, x_log: bool = False,
            y_log: bool = False) -> Any:
    """A chart titled ``title`` with the comparator set ``h`` on a second line."""
    fig = figure(width=WIDTH, height=HEIGHT, x_axis_label=x, y_axis_label=y,
                 x_axis_type="log" if x_log else "linear",
                 y_axis_type="log" if y_log else "linear",
                 tools="pan,wheel_zoom,box_zoom,reset,save,hover")
    fig.add_layout(Title(text=h, text_font_style="italic", text_font_size="9pt"), "above")
    fig.add_layout(Title(text=title, text_font_size="11pt"), "above")
    return fig


def _exponent(ds: xr.Dataset, name: str, idx: int | None) -> str:
    """``N^0.52 [0.41, 0.63]`` from the exponent variables ``name`` (at ``idx``), or ''."""
    if name not in ds:
        return ""
    vals = [ds[f"{name}{s}"].values for s in ("", "_low", "_high")]
    b, lo, hi = (float(v if idx is None else v[idx]) for v in vals)
    return f"  exponent {b:.2f} [{lo:.2f}, {hi:.2f}]" if np.isfinite(b) else "  exponent: —"


@dataclass
class _RunView:
    """The sources and renderers of one run on one page."""

    run: Run
    color: str
    sources: dict[str, ColumnDataSource]
    renderers: list[GlyphRenderer] = field(default_factory=list)
    items: dict[str, LegendItem] = field(default_factory=dict)  # series → its legend entry
    version: int = -1
    built: bool = False


class Page:
    """The document of one tab."""

    def __init__(self, monitor: Monitor, doc: Document) -> None:
        self.monitor = monitor
        self.doc = doc
        dom = monitor.options.domain
        h = f"H: {dom}, {DOMAIN_SHORT[dom]}"
        self.h = h
        self.table_version = -1
        self.table_src = ColumnDataSource(monitor.table(), name="runs")
        self.table = DataTable(source=self.table_src, columns=[
            TableColumn(field=k, title=t) for k, t in COLUMNS], height=150,
            sizing_mode="stretch_width", index_position=None)
        self.pick = CheckboxGroup(labels=[], active=[], inline=True, name="overlay")
        self.pick.on_change("active", lambda attr, old, new: self._visibility())
        none = "H: none (no comparator: measured on the probe set)"
        self.loss = _figure("Minibatch loss at every training round", "H: none (measured "
                            "loss)", "training round", "minibatch loss (MSE / nats)",
                            y_log=True)
        self.taylor = _figure("Taylor loss: running mean at the iterates (solid) vs "
                              "hindsight optimum (dashed)", h, "Taylor rounds N",
                              "mean Taylor loss per sample (loss units)", x_log=True)
        self.layer_regret = _figure("Regret / √N per layer (dotted: network)", h,
                                    "Taylor rounds N", "regret / √N (loss units × √rounds)",
                                    x_log=True)
        self.neuron_regret = _figure("Regret / √N per neuron: mean ± s.d. over a layer", h,
                                     "Taylor rounds N", "regret / √N (loss units × √rounds)",
                                     x_log=True)
        self.distance = _figure("Exploration (a): distance to the nearest earlier "
                                "configuration", none, "training round",
                                "Hamming distance / (probe points × units)")
        self.switches = _figure("Exploration (b): switches per probe point, sorted", none,
                                "probe points (rank, most switching first)",
                                "fraction of snapshot steps switched")
        self.volume = _figure("Exploration (c): log-volume per hidden unit, sorted", none,
                              "hidden units (rank, largest first)",
                              "log-volume (sum of log singular values)")
        self.views: dict[int, _RunView] = {}
        charts = [self.loss, self.taylor, self.layer_regret, self.neuron_regret, self.distance,
                  self.switches, self.volume]
        head = Div(text="<h2 style='margin:4px 0'>ntrace view</h2><p style='margin:0'>Runs "
                   "update as their writers commit rows. Checked runs are overlaid. Analysis: "
                   f"hindsight Taylor optima over {html.escape(h)}; regret exponent fitted "
                   "on log regret vs log N.</p>", sizing_mode="stretch_width")
        doc.title = "ntrace view"
        doc.add_root(column(head, self.table, row(Div(text="<b>overlay:</b>"), self.pick),
                            gridplot(charts, ncols=2, toolbar_location="right"),
                            sizing_mode="stretch_width"))
        self.refresh()
        doc.add_periodic_callback(self.refresh, REFRESH_MS)

    # -- keeping up with the monitor --------------------------------------------------------
    def refresh(self) -> None:
        mon = self.monitor
        if mon.table_version != self.table_version:
            self.table_version = mon.table_version
            self.table_src.data = mon.table()
        runs = list(mon.runs)
        if len(runs) != len(self.pick.labels):
            new = list(range(len(self.pick.labels), len(runs)))
            self.pick.labels = [r.label for r in runs]
            self.pick.active = [*self.pick.active, *new]
        for run in runs:
            rv = self.views.get(run.key)
            if rv is None:
                rv = self.views[run.key] = self._add_run(run)
            self._stream_loss(rv)
            ds = run.dataset
            if ds is not None and run.version != rv.version:
                rv.version = run.version
                self._analysis(rv, ds)

    def _add_run(self, run: Run) -> _RunView:
        color = Category10_10[run.key % 10]
        src = ColumnDataSource({"round": np.zeros(0, np.int64), "loss": np.zeros(0)},
                               name=f"loss:{run.key}")
        rv = _RunView(run, color, {"loss": src})
        self._keep(rv, self.loss, "loss", self.loss.line(
            "round", "loss", source=src, color=color, legend_label=run.label))
        return rv

    def _keep(self, rv: _RunView, fig: Any, series: str, r: GlyphRenderer) -> None:
        """Remember a renderer of the run (visibility) and the legend entry of its series."""
        rv.renderers.append(r)
        r.visible = rv.run.key in self.pick.active
        for item in fig.legend[0].items:
            if r in item.renderers:
                rv.items[series] = item
        fig.legend[0].click_policy = "hide"
        fig.legend[0].label_text_font_size = "8pt"
        fig.legend[0].location = "top_right"

    def _stream_loss(self, rv: _RunView) -> None:
        src = rv.sources["loss"]
        n = len(src.data["round"])
        rounds, loss = rv.run.rounds, rv.run.loss  # replaced, never changed, by the monitor
        m = min(len(rounds), len(loss))
        if m > n:
            src.stream({"round": rounds[n:m], "loss": loss[n:m]})

    def _visibility(self) -> None:
        for key, rv in self.views.items():
            for r in rv.renderers:
                r.visible = key in self.pick.active

    # -- the analysis charts ---------------------------------------------------------------
    def _analysis(self, rv: _RunView, ds: xr.Dataset) -> None:
        data = _series(ds)
        if not rv.built:
            self._build(rv, ds, data)
            rv.built = True
        for name, cols in data.items():
            if name in rv.sources:
                rv.sources[name].data = cols
        for series, label in _labels(rv.run.label, ds).items():
            if series in rv.items:
                rv.items[series].label = value(label)

    def _build(self, rv: _RunView, ds: xr.Dataset, data: dict[str, dict[str, Any]]) -> None:
        key, c, lab = rv.run.key, rv.color, rv.run.label
        for name, cols in data.items():
            rv.sources[name] = ColumnDataSource(cols, name=f"{name}:{key}")
        s = rv.sources
        labels = _labels(lab, ds)
        self._keep(rv, self.taylor, "running", self.taylor.line(
            "N", "running", source=s["taylor"], color=c, line_width=2,
            legend_label=labels["running"]))
        for col in data["taylor"]:
            if col.startswith("opt "):
                self._keep(rv, self.taylor, col, self.taylor.line(
                    "N", col, source=s["taylor"], color=c, line_dash="dashed",
                    legend_label=labels[col]))
        for col in data["layer_regret"]:
            if col != "N":
                dash = "dotted" if col == "network" else "solid"
                self._keep(rv, self.layer_regret, f"layer {col}", self.layer_regret.line(
                    "N", col, source=s["layer_regret"], color=c, line_dash=dash,
                    legend_label=labels[f"layer {col}"]))
        for col in data["neuron_regret"]:
            if col.startswith("mean "):
                layer = col[5:]
                band = self.neuron_regret.varea(
                    "N", f"lo {layer}", f"hi {layer}", source=s["neuron_regret"], color=c,
                    fill_alpha=0.15)
                rv.renderers.append(band)
                band.visible = key in self.pick.active
                self._keep(rv, self.neuron_regret, f"neuron {layer}", self.neuron_regret.line(
                    "N", col, source=s["neuron_regret"], color=c,
                    legend_label=labels[f"neuron {layer}"]))
        for fig, name, x, y in ((self.distance, "distance", "round", "fraction"),
                                (self.switches, "switches", "rank", "fraction"),
                                (self.volume, "volume", "rank", "log_volume")):
            if name in s:
                self._keep(rv, fig, name, fig.line(x, y, source=s[name], color=c,
                                                   legend_label=lab))


def _layers(ds: xr.Dataset) -> list[str]:
    return [str(v) for v in ds["layer"].values]


def _series(ds: xr.Dataset) -> dict[str, dict[str, Any]]:
    """The columns of every analysis source of one run, from its results Dataset."""
    N = ds["checkpoint"].values.astype(np.float64)
    taylor: dict[str, Any] = {"N": N, "running": ds["cumulative_loss"].values / N}
    regret: dict[str, Any] = {"N": N}
    neuron: dict[str, Any] = {"N": N}
    names = _layers(ds)
    if "network_optimum" in ds:
        taylor["opt network"] = ds["network_optimum"].values
        regret["network"] = ds["network_regret_over_sqrt_n"].values
    if "layer_optimum" in ds:
        for i, n in enumerate(names):
            if np.isfinite(ds["layer_optimum"].values[:, i]).any():
                taylor[f"opt {n}"] = ds["layer_optimum"].values[:, i]
                regret[n] = ds["layer_regret_over_sqrt_n"].values[:, i]
    if "neuron_regret_over_sqrt_n" in ds:
        reg = ds["neuron_regret_over_sqrt_n"].values
        of = np.asarray(ds["neuron_layer"].values).astype(str)
        for n in names:
            sel = reg[:, of == n]
            if sel.shape[1] == 0 or not np.isfinite(sel).any():
                continue
            with np.errstate(all="ignore"):
                m = np.nanmean(np.where(np.isfinite(sel), sel, np.nan), axis=1)
                sd = np.nanstd(np.where(np.isfinite(sel), sel, np.nan), axis=1)
            neuron[f"mean {n}"], neuron[f"lo {n}"], neuron[f"hi {n}"] = m, m - sd, m + sd
    out = {"taylor": taylor, "layer_regret": regret, "neuron_regret": neuron}
    if "min_distance_fraction" in ds:
        out["distance"] = {"round": ds["snapshot_round"].values.astype(np.float64),
                           "fraction": ds["min_distance_fraction"].values}
        sw = ds["switch_fraction_sorted"].values
        out["switches"] = {"rank": np.arange(1, len(sw) + 1), "fraction": sw}
        vol = ds["log_volume_sorted"].values
        out["volume"] = {"rank": np.arange(1, len(vol) + 1), "log_volume": vol}
    for cols in out.values():  # JSON has no NaN: Bokeh sends arrays binary, NaN kept
        for k, v in cols.items():
            cols[k] = np.asarray(v, dtype=np.float64)
    return out


def _labels(run: str, ds: xr.Dataset) -> dict[str, str]:
    """Legend text of every analysis series of the run, exponents included."""
    names = _layers(ds)
    out = {"running": f"{run}: at the iterates"}
    out["opt network"] = f"{run}: optimum, network"
    for i, n in enumerate(names):
        out[f"opt {n}"] = f"{run}: optimum, layer {n}"
        out[f"layer {n}"] = f"{run} · {n}" + _exponent(ds, "layer_regret_exponent", i)
        out[f"neuron {n}"] = f"{run} · {n}" + _exponent(ds, "neuron_mean_regret_exponent", i)
    out["layer network"] = f"{run} · network" + _exponent(ds, "network_regret_exponent", None)
    return out


def make_document(monitor: Monitor, doc: Document) -> None:
    """Bokeh's entry point for a new tab."""
    Page(monitor, doc)
