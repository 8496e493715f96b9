"""The analysis entry points: one trace → results Dataset (and optionally its store)."""

from __future__ import annotations

import os
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
import xarray as xr

from ntrace.analyze.assemble import build_dataset
from ntrace.analyze.exploration import Exploration
from ntrace.analyze.graph import build_graph, run_here
from ntrace.analyze.hindsight import Hindsight
from ntrace.analyze.options import AnalysisOptions
from ntrace.analyze.plan import AnalysisPlan, make_plan
from ntrace.analyze.results import check_output, write_results
from ntrace.errors import UsageError
from ntrace.format.reader import Trace, open_trace
from ntrace.format.summary import batchnorm_note

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
    """Every exploration metric of the committed probe snapshots, in process, or None
    without a probe or with fewer than 2 snapshots."""
    return _run(trace, None, replace(opts, exploration=True), None, None)[1]


def analyze_trace(path: str | os.PathLike[str], options: AnalysisOptions | None = None,
                  out: str | os.PathLike[str] | None = None,
                  cluster: Cluster | Any = None) -> xr.Dataset:
    """Analyse the trace at ``path``: hindsight Taylor optima, regret and exploration.

    Reads the trace lazily (committed rows only, so a trace still being written works) and
    returns the results Dataset; with ``out`` also writes it to that Zarr store. The
    analysis is a set of tasks (:mod:`ntrace.analyze.graph`) run in this process, or as Dask
    tasks with ``options.scheduler`` or ``options.workers`` (on a cluster opened and closed
    for this call) or on ``cluster``: a :class:`ntrace.analyze.cluster.Cluster` or a
    ``distributed.Client`` of the caller's, reused across analyses and left open. The
    results are the same.
    """
    opts = options or AnalysisOptions()
    check_device(opts.device)
    if cluster is not None or opts.distributed:
        from ntrace.analyze.cluster import task_location

        task_location(path)  # refuse what workers cannot read before anything starts
    trace = open_trace(path)
    plan = make_plan(trace, opts)
    if out is not None:
        check_output(out, trace.path)
    hs, expl = _run(trace, plan, opts, path, cluster)
    assert hs is not None
    ds = build_dataset(trace, plan, opts, hs, expl, result_notes(trace, opts, expl))
    if out is not None:
        write_results(ds, out, trace.path)
    return ds


def result_notes(trace: Trace, opts: AnalysisOptions, expl: Exploration | None) -> list[str]:
    """The notes of a results Dataset that depend on the trace rather than on a solve."""
    notes: list[str] = []
    approximation = batchnorm_note(trace)
    if approximation is not None:
        notes.append(f"the Taylor data approximates {approximation}")
    if opts.exploration and expl is None:
        notes.append("no exploration measures: the trace has no probe group or fewer than 2 "
                     "committed snapshots")
    return notes


def _run(trace: Trace, plan: AnalysisPlan | None, opts: AnalysisOptions,
         path: str | os.PathLike[str] | None, cluster: Cluster | Any
         ) -> tuple[Hindsight | None, Exploration | None]:
    """The tasks of ``plan`` and the exploration, run in process or on Dask, combined."""
    if path is None or (cluster is None and not opts.distributed):
        graph = build_graph(trace, plan, opts, 1)
        return graph.combine(trace, run_here(trace, graph, opts.progress))
    from ntrace.analyze.cluster import (
        as_cluster,
        open_cluster,
        run_on_cluster,
        task_location,
        worker_options,
    )

    cl = open_cluster(opts) if cluster is None else as_cluster(cluster)
    try:
        graph = build_graph(trace, plan, worker_options(opts), cl.tasks)
        results = run_on_cluster(cl, task_location(path), graph, opts.progress)
    finally:
        if cluster is None:
            cl.close()
    return graph.combine(trace, results)
