"""Analysis of Taylor traces: hindsight Taylor optima, regret and exploration.

    from ntrace.analyze import AnalysisOptions, analyze_trace
    ds = analyze_trace("run.zarr", AnalysisOptions(domain="ball"), out="run.analysis.zarr")

The analyzer knows a trace only through the format reader (``spec/taylor-trace.md``), reads
it lazily and never writes to it. Results are an ``xarray.Dataset`` (see
:mod:`ntrace.analyze.results`).
"""

from __future__ import annotations

from ntrace.analyze.exploration import (
    log_volume,
    min_previous_distance,
    switch_fraction,
)
from ntrace.analyze.options import DOMAINS, SCALES, AnalysisOptions, parse_scales
from ntrace.analyze.regret import cumulative_loss, fit_exponent, regret
from ntrace.analyze.results import is_results_store, open_results, write_results
from ntrace.analyze.run import analyze_trace
from ntrace.analyze.taylor import neuron_taylor_loss, taylor_loss

__all__ = [
    "DOMAINS",
    "SCALES",
    "AnalysisOptions",
    "analyze_trace",
    "cumulative_loss",
    "fit_exponent",
    "is_results_store",
    "log_volume",
    "min_previous_distance",
    "neuron_taylor_loss",
    "open_results",
    "parse_scales",
    "regret",
    "switch_fraction",
    "taylor_loss",
    "write_results",
]
