"""The analysis entry points: one trace → results Dataset (and optionally its store)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np
import torch
import xarray as xr

from ntrace.analyze.assemble import Exploration, build_dataset
from ntrace.analyze.exploration import (
    LogVolume,
    log_volume,
    min_previous_distance,
    probe_readers,
    switch_fraction,
)
from ntrace.analyze.hindsight import Hindsight, hindsight
from ntrace.analyze.options import AnalysisOptions
from ntrace.analyze.plan import AnalysisPlan, make_plan
from ntrace.analyze.results import check_output, write_results
from ntrace.errors import UsageError
from ntrace.format.reader import Trace, open_trace

if TYPE_CHECKING:
    from ntrace.analyze.cluster import Cluster


def check_device(device: str) -> torch.device:
    """The torch device named by ``device``, refused with a clear message if unusable."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise UsageError(f"unknown device {device!r}; use 'cpu' or 'cuda[:N]'") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {device!r} was asked for but CUDA is not available here; "
                         "use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise UsageError(f"device {device!r} is not supported; use 'cpu' or 'cuda[:N]'")
    return dev


def explore(trace: Trace, opts: AnalysisOptions) -> Exploration | None:
    """Exploration measures of the committed probe snapshots, or None without a probe."""
    units = trace.probe_units
    K = trace.snapshots
    if units is None or not trace.has("probe/config") or K < 2:
        return None
    Q = trace.zarr_array("probe/config").shape[1]
    M = units.total
    rows, cols = probe_readers(trace, K)
    opts.progress("exploration", 0, 3)
    dist = min_previous_distance(rows, K, opts.block_bytes)
    opts.progress("exploration", 1, 3)
    sw = switch_fraction(rows, K, M, opts.block_bytes)
    opts.progress("exploration", 2, 3)
    lv = log_volume(cols, K, Q, M, opts.svd_rank, opts.sv_floor, opts.block_bytes,
                    opts.device)
    opts.progress("exploration", 3, 3)
    return exploration(trace, K, dist, sw, lv)


def exploration(trace: Trace, K: int, dist: np.ndarray, sw: np.ndarray, lv: LogVolume
                ) -> Exploration:
    """The exploration measures of snapshots [0, K) with their coordinates."""
    units = trace.probe_units
    assert units is not None
    lay = np.concatenate([np.full(c, i) for i, c in enumerate(units.counts)])
    idx = np.concatenate([np.arange(c) for c in units.counts])
    return Exploration(snapshot_round=trace.read("probe/round_index", slice(0, K)
                                                 ).astype(np.int64),
                       min_distance=dist, bits=int(trace.zarr_array("probe/config").shape[1])
                       * units.total, switch_fraction=sw, log_volume=lv,
                       unit_layer=lay, unit_index=idx, unit_layer_names=units.layers)


def analyze_trace(path: str | os.PathLike[str], options: AnalysisOptions | None = None,
                  out: str | os.PathLike[str] | None = None,
                  cluster: Cluster | None = None) -> xr.Dataset:
    """Analyse the trace at ``path``: hindsight Taylor optima, regret and exploration.

    Reads the trace lazily (committed rows only, so a trace still being written works) and
    returns the results Dataset; with ``out`` also writes it to that Zarr store. With
    ``options.scheduler`` or ``options.workers`` the solves and exploration kernels run as
    Dask tasks, on ``cluster`` when given (:class:`ntrace.analyze.cluster.Cluster`, reused
    across analyses) or on one opened and closed for this call; the results are the same.
    """
    opts = options or AnalysisOptions()
    check_device(opts.device)
    if cluster is not None and not opts.distributed:
        raise UsageError("a cluster was passed but the options ask for none; set scheduler "
                         "or workers in AnalysisOptions")
    if opts.distributed:
        from ntrace.analyze.cluster import task_location

        task_location(path)  # refuse what workers cannot read before anything starts
    trace = open_trace(path)
    plan = make_plan(trace, opts)
    if out is not None:
        check_output(out, trace.path)
    notes: list[str] = []
    if opts.distributed:
        hs, expl = _distributed(path, trace, plan, opts, cluster)
    else:
        with torch.no_grad():
            hs = hindsight(trace, plan, opts)
            expl = explore(trace, opts) if opts.exploration else None
    if opts.exploration and expl is None:
        notes.append("no exploration measures: the trace has no probe group or fewer than 2 "
                     "committed snapshots")
    ds = build_dataset(trace, plan, opts, hs, expl, notes)
    if out is not None:
        write_results(ds, out, trace.path)
    return ds


def _distributed(path: str | os.PathLike[str], trace: Trace, plan: AnalysisPlan,
                 opts: AnalysisOptions, cluster: Cluster | None
                 ) -> tuple[Hindsight, Exploration | None]:
    from ntrace.analyze.cluster import open_cluster, run_on_cluster

    own = cluster is None
    cl = open_cluster(opts) if cluster is None else cluster
    try:
        hs, ex = run_on_cluster(cl, path, trace, plan, opts, opts.exploration)
    finally:
        if own:
            cl.close()
    expl = None if ex is None else exploration(trace, len(ex.min_distance), ex.min_distance,
                                               ex.switch_fraction, ex.log_volume)
    return hs, expl
