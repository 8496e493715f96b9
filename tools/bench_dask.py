"""Benchmark of the Dask path: one analysis in process against the same analysis on a
2-worker LocalCluster (worker processes, one thread each), in the same run.

    python tools/bench_dask.py [--trace T] [--steps 800] [--workers 2] [--quick]

Without ``--trace`` it records the built-in digits autoencoder (64-50-30-20-30-50-64, no
download) with its default sampling, probe included. The analysis is the default one
(layer and neuron scales, ball domain, 16 checkpoints, exploration); network scale of this
model needs ``--max-dim 16384`` and is left out as on any CPU run. Prints the seconds of
each path (in process also with torch on one thread, the workers' setting), the cluster
start-up apart, the ratio, and the largest difference between the two results (0 where
they agree bit for bit). Not a test: timings depend on the machine and on its load (printed:
on a shared 2-core VM, one process with 2 BLAS threads suffers most from other jobs); the
Dask path pays off with more cores or machines than one process can use.
``run(quick)`` returns the rows for a master benchmark script.
"""

from __future__ import annotations

import argparse
import importlib
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ntrace.analyze import AnalysisOptions, analyze_trace
from ntrace.analyze.cluster import Cluster
from ntrace.tasks import get_task
from ntrace.tasks.runner import RunOptions, run_task


def record(path: Path, steps: int) -> None:
    """The digits autoencoder with its default sampling and probe."""
    run_task(get_task("digits-autoencoder"),
             RunOptions(out=str(path), steps=steps, optimizer="sgd", seed=0))


def differences(a: Any, b: Any) -> tuple[float, int]:
    """max |a − b| over every numeric variable (NaN where both are NaN counts as equal), and
    how many optima differ by more than the sum of their two certified gaps."""
    worst, outside = 0.0, 0
    assert sorted(a.data_vars) == sorted(b.data_vars)
    for k in a.data_vars:
        x, y = np.asarray(a[k].values), np.asarray(b[k].values)
        if x.dtype.kind not in "fiu":
            continue
        x, y = x.astype(np.float64), y.astype(np.float64)
        if not np.array_equal(np.isnan(x), np.isnan(y)):
            return float("inf"), -1
        d = np.abs(x - y)[~np.isnan(x)]
        worst = max(worst, float(d.max()) if d.size else 0.0)
        gap = str(k).replace("_optimum", "_gap")
        if str(k).endswith("_optimum") and gap in a:
            bound = (a[gap].values + b[gap].values)[~np.isnan(x)]
            outside += int((d > bound + 1e-12).sum())
    return worst, outside


def measure(trace: Path, workers: int, checkpoints: int, one_thread: bool
            ) -> dict[str, float]:
    """Seconds in process (torch's default threads, then, with ``one_thread``, one thread),
    on the cluster, and of the cluster's start-up; differences between the results."""
    opts = AnalysisOptions(checkpoints=checkpoints)
    t0 = time.perf_counter()
    ref = analyze_trace(trace, opts)
    out = {"local": time.perf_counter() - t0, "threads": torch.get_num_threads()}
    if one_thread:
        torch.set_num_threads(1)
        try:
            t0 = time.perf_counter()
            analyze_trace(trace, opts)
            out["local1"] = time.perf_counter() - t0
        finally:
            torch.set_num_threads(int(out["threads"]))
    t0 = time.perf_counter()
    with Cluster(workers=workers) as cl:
        cl.client.run(importlib.import_module, "ntrace.analyze.cluster")  # torch, ntrace
        out["start"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        got = analyze_trace(trace, replace(opts, workers=workers), cluster=cl)
        out["dask"] = time.perf_counter() - t0
    out["diff"], out["outside"] = differences(ref, got)
    return out


def run(quick: bool, trace: str | None = None, steps: int | None = None,
        workers: int = 2) -> list[dict[str, Any]]:
    """Rows (name, value, unit, note) of this benchmark; ``quick`` records fewer rounds,
    solves at fewer checkpoints and skips the one-thread in-process run."""
    steps = steps or (300 if quick else 800)
    checkpoints = 8 if quick else 16
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(trace) if trace else Path(tmp) / "digits.zarr"
        if trace is None:
            record(path, steps)
        load = os.getloadavg()[0]
        m = measure(path, workers, checkpoints, one_thread=not quick)
    what = (f"{trace}" if trace else f"digits autoencoder, {steps} rounds") + \
        f", {checkpoints} checkpoints; {os.cpu_count()} CPUs, load {load:.1f}"
    cl = f"{workers} worker processes x 1 thread"
    rows = [{"name": "dask analyze: in process", "value": round(m["local"], 2), "unit": "s",
             "note": f"{what}; torch on {m['threads']:.0f} threads"}]
    if "local1" in m:
        rows.append({"name": "dask analyze: in process, 1 thread",
                     "value": round(m["local1"], 2), "unit": "s", "note": what})
    return rows + [
        {"name": f"dask analyze: {workers}-worker LocalCluster", "value": round(m["dask"], 2),
         "unit": "s", "note": f"{what}; {cl}, start-up excluded"},
        {"name": "dask analyze: LocalCluster start", "value": round(m["start"], 2),
         "unit": "s", "note": f"{cl}, torch imported in each"},
        {"name": "dask analyze: speed-up", "value": round(m["local"] / m["dask"], 2),
         "unit": "x", "note": f"in process / {cl} (>1: the cluster is faster)"},
        {"name": "dask analyze: largest difference", "value": m["diff"], "unit": "",
         "note": "max |in process - cluster| over every result variable (neurons solved in "
                 "other batches stop elsewhere within --tol)"},
        {"name": "dask analyze: optima outside their gaps", "value": m["outside"], "unit": "",
         "note": "optima whose difference exceeds the sum of the two certified gaps "
                 "(expected 0)"},
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", default=None, help="analyse this trace instead of recording")
    ap.add_argument("--steps", type=int, default=None, help="training rounds to record")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="fewer rounds and checkpoints")
    args = ap.parse_args()
    rows = run(args.quick, args.trace, args.steps, args.workers)
    for r in rows:
        print(f"{r['name']:<42} {r['value']:>10g} {r['unit']:<2} {r['note']}")
    by = {r["name"]: r["value"] for r in rows}
    local = by["dask analyze: in process"]
    dask = by[f"dask analyze: {args.workers}-worker LocalCluster"]
    print(f"ratio: in process / {args.workers}-worker Dask = {local / dask:.2f}x "
          f"(start-up of {by['dask analyze: LocalCluster start']:g} s apart)")


if __name__ == "__main__":
    main()
