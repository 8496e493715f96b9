"""The numbers the claims are judged on, taken from one run's analysis results.

Everything here reads a results Dataset (:mod:`ntrace.analyze.results`) and returns plain
numbers, so that the claim rules (:mod:`ntrace.reproduce.claims`) can be tested on synthetic
measurements.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Exponent:
    """A fitted regret exponent with its confidence interval. ``unit`` names the layer;
    ``scale`` is ``layer`` (one layer's weights vary) or ``neurons`` (mean regret of the
    layer's neurons, each neuron's row varying)."""

    unit: str
    scale: str
    slope: float
    low: float
    high: float


@dataclass(frozen=True)
class Gap:
    """Running-average loss minus the hindsight Taylor optimum of one layer, at the checkpoint
    nearest N/10 (``early``) and at the last one (``late``), with the running-average loss at
    the last checkpoint."""

    unit: str
    early: float
    late: float
    n_early: int
    n_late: int
    average_loss: float


@dataclass(frozen=True)
class RunMeasures:
    """What one traced run measured. ``exploration`` maps ``min_distance`` (mean over
    snapshots of the distance to the nearest earlier configuration, as a fraction of the
    bits), ``switch`` (mean switch fraction over probe points) and ``log_volume`` (median
    over hidden units) to their values; empty without probe snapshots."""

    kind: str
    optimizer: str
    seed: int
    final_loss: float
    exponents: tuple[Exponent, ...] = ()
    neuron_exponents: tuple[float, ...] = ()
    gaps: tuple[Gap, ...] = ()
    exploration: dict[str, float] = field(default_factory=dict)


EXPLORATION_MEASURES = ("min_distance", "switch", "log_volume")


def _f(x: Any) -> float:
    return float(np.asarray(x, dtype=np.float64))


def measure(ds: Any, kind: str, optimizer: str, seed: int, final_loss: float) -> RunMeasures:
    """The measurements of one analysed run."""
    names = list(ds.attrs["ntrace"]["layer_names"])
    exps: list[Exponent] = []
    if "layer_regret_exponent" in ds:
        for li, name in enumerate(names):
            if name in ds.attrs["ntrace"]["layer_scale_layers"]:
                exps.append(Exponent(name, "layer", _f(ds.layer_regret_exponent[li]),
                                     _f(ds.layer_regret_exponent_low[li]),
                                     _f(ds.layer_regret_exponent_high[li])))
    if "neuron_mean_regret_exponent" in ds:
        present = set(np.unique(ds.neuron_layer.values).tolist())
        for li, name in enumerate(names):
            if name in present:
                exps.append(Exponent(name, "neurons", _f(ds.neuron_mean_regret_exponent[li]),
                                     _f(ds.neuron_mean_regret_exponent_low[li]),
                                     _f(ds.neuron_mean_regret_exponent_high[li])))
    neuron = (tuple(float(v) for v in ds.neuron_regret_exponent.values)
              if "neuron_regret_exponent" in ds else ())
    return RunMeasures(kind, optimizer, seed, final_loss, tuple(exps), neuron, gaps(ds, names),
                       exploration(ds))


def gaps(ds: Any, names: list[str]) -> tuple[Gap, ...]:
    """Per layer: running-average loss − Taylor optimum, early and late (layer scale where
    solved, else the mean over the layer's neurons)."""
    counts = ds.checkpoint.values.astype(np.int64)
    if not counts.size:
        return ()
    avg = ds.cumulative_loss.values / counts
    late = len(counts) - 1
    early = int(np.searchsorted(counts, counts[-1] / 10.0))
    early = min(early, late)
    out = []
    for li, name in enumerate(names):
        opt = None
        if "layer_optimum" in ds and name in ds.attrs["ntrace"]["layer_scale_layers"]:
            opt = ds.layer_optimum.values[:, li]
        elif "neuron_optimum" in ds and (ds.neuron_layer.values == name).any():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                opt = np.nanmean(ds.neuron_optimum.values[:, ds.neuron_layer.values == name], 1)
        if opt is None:
            continue
        out.append(Gap(name, float(avg[early] - opt[early]), float(avg[late] - opt[late]),
                       int(counts[early]), int(counts[late]), float(avg[late])))
    return tuple(out)


def exploration(ds: Any) -> dict[str, float]:
    """The three exploration measures of Sec. 3.3 (empty without probe snapshots)."""
    if "min_distance" not in ds:
        return {}
    return summarize_exploration(ds.min_distance_fraction.values, ds.switch_fraction.values,
                                 ds.log_volume.values)


def summarize_exploration(min_distance_fraction: np.ndarray, switch_fraction: np.ndarray,
                          log_volume: np.ndarray) -> dict[str, float]:
    """Mean distance to the nearest earlier configuration (fraction of bits, snapshots after
    the first), mean switch fraction over probe points, median log-volume over units."""
    frac = np.asarray(min_distance_fraction, dtype=np.float64)[1:]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        md = float(np.nanmean(frac)) if frac.size else math.nan
    return {"min_distance": md, "switch": float(np.mean(switch_fraction)),
            "log_volume": float(np.median(log_volume))}


def trace_exploration(trace: Any) -> dict[str, float]:
    """The same three measures straight from an open trace's probe snapshots (no optima
    solved), for the short sweep runs; empty without at least two snapshots."""
    from ntrace.analyze.options import AnalysisOptions
    from ntrace.analyze.run import explore

    e = explore(trace, AnalysisOptions())
    if e is None:
        return {}
    v = e.variables()[0]
    return summarize_exploration(v["min_distance_fraction"].values,
                                 v["switch_fraction"].values, v["log_volume"].values)
