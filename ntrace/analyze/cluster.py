"""Running an analysis as Dask tasks: on a running ``distributed`` cluster or a LocalCluster.

The work splits where the mathematics does. Hindsight optima: the network family is one
task, each layer-scale family one task, and the selected neurons of each layer are cut into
blocks, one task each; every task accumulates its own statistics over all Taylor rounds and
solves at every checkpoint (:func:`ntrace.analyze.hindsight.hindsight` on a part of the
plan). Exploration: row blocks of the nearest-earlier-configuration pass, snapshot ranges of
the switch counts and unit blocks of the log-volumes (:mod:`ntrace.analyze.exploration`),
combined exactly (minima, integer sums, concatenation).

A task receives only the trace location (a path or fsspec URL, which every worker must be
able to open) and small descriptors (a sub-plan: layer geometry and neuron indices;
snapshot or unit ranges); it opens the trace itself, reads the Zarr chunks it needs and
returns small result arrays. No trace data passes through the scheduler. Each part reads
its rounds in the blocks the whole plan would use, so its sums are formed in the same order
as in process. ``dask`` and ``distributed`` are imported only here, and only when a cluster
is asked for (``pip install 'ntrace[dask]'``).
"""

from __future__ import annotations

import logging
import math
import os
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Any

import numpy as np
import torch

from ntrace.analyze.domain import Domain, IterateStats
from ntrace.analyze.exploration import (
    LogVolume,
    distance_rows,
    log_volume,
    log_volume_bytes,
    min_previous_distance,
    probe_readers,
    switch_counts,
)
from ntrace.analyze.hindsight import Family, Hindsight, hindsight
from ntrace.analyze.options import AnalysisOptions
from ntrace.analyze.plan import AnalysisPlan, LayerPlan
from ntrace.analyze.source import TaylorSource
from ntrace.errors import UsageError
from ntrace.format.reader import Trace, open_trace
from ntrace.format.store import is_url

CONNECT_TIMEOUT = 10.0
"""Seconds to wait for a scheduler (and for its first worker) before giving up."""

TASKS_PER_WORKER = 2
"""Hindsight and exploration work is cut into about this many tasks per worker."""

MIN_NEURON_BLOCK = 4
"""Fewest neurons in one neuron-scale task (each task reads its layer's data)."""


def _distributed() -> Any:
    """The ``distributed`` module, or a usage error naming the extra to install."""
    try:
        import distributed
    except ImportError as exc:
        raise UsageError(f"--scheduler and --workers need dask and distributed ({exc}); "
                         "pip install 'ntrace[dask]'") from None
    return distributed


class Cluster:
    """A Dask client for analyses: connected to the scheduler at ``scheduler``, or to a new
    LocalCluster of ``workers`` worker processes (one thread each; ``processes=False`` runs
    them as threads of this process). Closing it closes what it started."""

    def __init__(self, scheduler: str | None = None, workers: int | None = None,
                 processes: bool = True) -> None:
        if (scheduler is None) == (workers is None):
            raise UsageError("a cluster needs exactly one of a scheduler address and a "
                             "worker count")
        d = _distributed()
        self.local: Any = None
        self.address = scheduler
        if scheduler is not None:
            try:
                self.client = d.Client(scheduler, timeout=CONNECT_TIMEOUT,
                                       set_as_default=False)
            except (OSError, TimeoutError, ValueError, TypeError) as exc:
                raise UsageError(f"cannot reach the Dask scheduler at {scheduler} within "
                                 f"{CONNECT_TIMEOUT:g} s ({_one_line(exc)}); check --scheduler, "
                                 "or use --workers N for a local cluster") from None
            try:
                self.client.wait_for_workers(1, timeout=CONNECT_TIMEOUT)
            except (OSError, TimeoutError) as exc:
                self.client.close()
                raise UsageError(f"the Dask scheduler at {scheduler} has no workers "
                                 f"({_one_line(exc)}); start some with 'dask worker "
                                 f"{scheduler}'") from None
        else:
            assert workers is not None
            self.local = d.LocalCluster(n_workers=workers, threads_per_worker=1,
                                        processes=processes, dashboard_address=None,
                                        silence_logs=logging.ERROR)
            self.client = d.Client(self.local, set_as_default=False)
            self.address = self.local.scheduler_address

    @property
    def workers(self) -> int:
        """Workers connected now (at least 1)."""
        return max(1, len(self.client.scheduler_info(n_workers=-1)["workers"]))

    def close(self) -> None:
        self.client.close()
        if self.local is not None:
            self.local.close()

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def open_cluster(opts: AnalysisOptions) -> Cluster:
    """The cluster ``opts`` asks for (``scheduler`` or ``workers``)."""
    if not opts.distributed:
        raise UsageError("no cluster was asked for: set scheduler or workers")
    what = (f"Dask scheduler {opts.scheduler}" if opts.scheduler is not None
            else f"{opts.workers} Dask workers")
    opts.progress(f"starting {what}", 0, 1)
    cl = Cluster(opts.scheduler, opts.workers)
    opts.progress(f"starting {what}", 1, 1)
    return cl


def task_location(path: str | os.PathLike[str]) -> str:
    """What a task opens: an fsspec URL as it is, a local path made absolute. ``memory://``
    lives in this process only and is refused."""
    text = os.fspath(path)
    if is_url(text):
        if text.startswith("memory://"):
            raise UsageError(f"{text} lives in this process only, so Dask workers cannot read "
                             "it; write the trace to a directory or a shared URL, or drop "
                             "--scheduler/--workers")
        return text
    return os.path.abspath(text)


# -- what each task does --------------------------------------------------------------------
@dataclass(frozen=True)
class Part:
    """One hindsight task: ``plan`` is a part of the whole plan (one family or one block of
    neurons); ``layout`` holds the whole plan's layers, which set the block boundaries of
    the rounds; ``stats`` says whether the task returns its layers' iterate statistics."""

    label: str
    plan: AnalysisPlan
    layout: tuple[LayerPlan, ...]
    cost: float
    stats: bool = True


class _LayoutSource(TaylorSource):
    """Reads the layers of a part in the blocks of rounds the whole plan would read."""

    def __init__(self, trace: Trace, layers: Sequence[LayerPlan], device: torch.device,
                 block_bytes: int, layout: Sequence[LayerPlan]) -> None:
        super().__init__(trace, layers, device, block_bytes)
        self._whole = TaylorSource(trace, layout, device, block_bytes)

    def block_rounds(self, jacobian: bool = True, weights_only: bool = False) -> int:
        return self._whole.block_rounds(jacobian, weights_only)


def _worker_options(opts: AnalysisOptions) -> AnalysisOptions:
    """The options a task runs with: no progress callback, no cluster of its own."""
    return replace(opts, scheduler=None, workers=None,
                   progress=AnalysisOptions().progress)


def _open(location: str, T: int = 0, K: int = 0) -> Trace:
    trace = open_trace(location)
    if trace.taylor_rounds < T or trace.snapshots < K:
        _close(trace)
        raise UsageError(f"a Dask worker sees {trace.taylor_rounds} Taylor rounds and "
                         f"{trace.snapshots} snapshots in {location}, fewer than the "
                         f"{T} and {K} planned; every worker must read the same trace")
    return trace


def _close(trace: Trace) -> None:
    if trace.location is not None:
        trace.location.close()


_SIZES = False  # whether _register_sizes ran in this process


def _nbytes(obj: object) -> int:
    """Bytes held by the arrays of a result object (numpy, torch, nested containers)."""
    if isinstance(obj, np.ndarray):
        return int(obj.nbytes)
    if isinstance(obj, torch.Tensor):
        return obj.element_size() * obj.numel()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    if hasattr(obj, "__dict__"):
        return 64 + sum(_nbytes(v) for v in vars(obj).values())
    return 8


def _register_sizes() -> None:
    """Tell Dask the size of the results (it would count an unknown object as ~56 bytes),
    for its memory accounting and dashboards."""
    global _SIZES
    if not _SIZES:
        from dask.sizeof import sizeof

        sizeof.register((Hindsight, LogVolume))(_nbytes)
        _SIZES = True


def hindsight_task(location: str, part: Part, opts: AnalysisOptions) -> Hindsight:
    """Run on a worker: the hindsight solves of one part, read from the trace itself."""
    _register_sizes()
    trace = _open(location, part.plan.taylor_rounds)
    try:
        src = _LayoutSource(trace, part.plan.layers, torch.device(opts.device),
                            opts.block_bytes, part.layout)
        with torch.no_grad():
            hs = hindsight(trace, part.plan, opts, source=src)
    finally:
        _close(trace)
    if not part.stats:
        hs.stats = _no_stats(hs.stats.count)
    return hs


def distance_task(location: str, K: int, part: tuple[int, int], block_bytes: int
                  ) -> np.ndarray:
    """Run on a worker: nearest earlier configurations of snapshots [n0, n1)."""
    trace = _open(location, K=K)
    try:
        return min_previous_distance(probe_readers(trace, K)[0], K, block_bytes, part=part)
    finally:
        _close(trace)


def switch_task(location: str, K: int, part: tuple[int, int], block_bytes: int) -> np.ndarray:
    """Run on a worker: switches into snapshots [k0, k1), per probe point."""
    trace = _open(location, K=K)
    try:
        return switch_counts(probe_readers(trace, K)[0], K, block_bytes, part=part)
    finally:
        _close(trace)


def volume_task(location: str, K: int, Q: int, M: int, part: tuple[int, int],
                opts: AnalysisOptions) -> LogVolume:
    """Run on a worker: log-volumes of the units of unit bytes [b0, b1)."""
    _register_sizes()
    trace = _open(location, K=K)
    try:
        return log_volume(probe_readers(trace, K)[1], K, Q, M, opts.svd_rank, opts.sv_floor,
                          opts.block_bytes, opts.device, part=part)
    finally:
        _close(trace)


# -- cutting the work ----------------------------------------------------------------------
def _no_stats(count: int) -> IterateStats:
    return IterateStats(mean={}, lower={}, upper={}, neuron_radius={}, layer_radius={},
                        network_radius=torch.zeros((), dtype=torch.float64), count=count)


def _family_cost(units: int, dim: int, rows: int, n_cp: int) -> float:
    """Rough flops of one family: Gram accumulation over all rows, one dense solve per
    checkpoint."""
    return float(units) * (rows * dim * dim + n_cp * dim ** 3)


def split_plan(plan: AnalysisPlan, rows: int, tasks: int) -> list[Part]:
    """Cut ``plan`` into parts: the network family, each layer family, and blocks of each
    layer's selected neurons of about equal cost, about ``tasks`` blocks in all (at least
    ``MIN_NEURON_BLOCK`` neurons each). ``rows`` = Taylor rounds × samples."""
    n_cp = len(plan.checkpoints)
    none: dict[str, Any] = {"scales": (), "layer_scale": (), "neuron_scale": ()}
    parts: list[Part] = []
    if "network" in plan.scales:
        parts.append(Part("network", replace(plan, **{**none, "scales": ("network",)}),
                          plan.layers, _family_cost(1, plan.network_dim, rows, n_cp)))
    if "layer" in plan.scales:
        for lp in plan.layers:
            if lp.name in plan.layer_scale:
                sub = replace(plan, **{**none, "scales": ("layer",),
                                       "layer_scale": (lp.name,)}, layers=(lp,))
                parts.append(Part(f"layer {lp.name}", sub, plan.layers,
                                  _family_cost(1, lp.dim, rows, n_cp)))
    neuron = [lp for lp in plan.layers if "neuron" in plan.scales
              and lp.name in plan.neuron_scale]
    costs = {lp.name: _family_cost(len(lp.selected), lp.d_aug, rows, n_cp) for lp in neuron}
    share = sum(costs.values()) / max(1, tasks)  # neurons alone fill the tasks: the
    # network and layer families are indivisible and run beside them
    for lp in neuron:
        n = len(lp.selected)
        blocks = max(1, min(round(costs[lp.name] / share) if share > 0 else 1,
                            n // MIN_NEURON_BLOCK))
        for i, sel in enumerate(np.array_split(lp.selected, blocks)):
            sub_lp = replace(lp, selected=sel, stored=sel)
            sub = replace(plan, **{**none, "scales": ("neuron",), "neuron_scale": (lp.name,)},
                          layers=(sub_lp,))
            parts.append(Part(f"neurons {lp.name}[{i + 1}/{blocks}]", sub, plan.layers,
                              costs[lp.name] * len(sel) / max(1, n), stats=i == 0))
    if not parts:  # nothing to solve: the losses at the iterates are still measured
        parts.append(Part("taylor losses", replace(plan, **none), plan.layers, 0.0))
    return parts


def _even(weights: Sequence[float], parts: int) -> list[tuple[int, int]]:
    """Consecutive index ranges of ``weights`` with about equal sums, at most ``parts``."""
    n = len(weights)
    if n == 0:
        return []
    cum = np.cumsum(np.asarray(weights, dtype=np.float64))
    cuts = {0, n}
    for k in range(1, max(1, min(parts, n))):
        cuts.add(int(np.searchsorted(cum, cum[-1] * k / parts)) + 1)
    edges = sorted(c for c in cuts if 0 <= c <= n)
    return [(a, b) for a, b in zip(edges[:-1], edges[1:], strict=True) if b > a]


def exploration_parts(trace: Trace, K: int, opts: AnalysisOptions, tasks: int
                      ) -> dict[str, list[tuple[int, int]]]:
    """Ranges of the three exploration tasks: snapshot ranges of the distance pass (whole
    row blocks, cut so each part compares about as many pairs), of the switch counts, and
    unit-byte ranges of the log-volumes (whole blocks)."""
    shape = trace.zarr_array("probe/config").shape
    Q, nbytes = int(shape[1]), int(shape[2])
    units = trace.probe_units
    assert units is not None
    bb = opts.block_bytes
    rows = distance_rows(Q * math.ceil(nbytes / 8), K, bb)
    n_blk = math.ceil(K / rows)
    dist = [(a * rows, min(b * rows, K)) for a, b in
            _even([i + 1 for i in range(n_blk)], tasks)]
    sw = [(int(a), int(b)) for a, b in _even([1.0] * K, max(1, tasks // 2))]
    per = log_volume_bytes(K, Q, units.total, bb)
    total = (units.total + 7) // 8
    n_vb = math.ceil(total / per)
    vol = [(a * per, min(b * per, total)) for a, b in _even([1.0] * n_vb, tasks)]
    return {"distance": dist, "switch": sw, "volume": vol}


# -- running and combining -----------------------------------------------------------------
@dataclass
class Submitted:
    """The futures of one analysis on a cluster, and how to combine their results."""

    parts: list[Part]
    hindsight: list[Any]
    distance: list[Any]
    switch: list[Any]
    volume: list[Any]
    K: int
    Q: int
    M: int
    client: Any = None

    @property
    def futures(self) -> list[Any]:
        return self.hindsight + self.distance + self.switch + self.volume


def submit(cluster: Cluster, path: str | os.PathLike[str], trace: Trace, plan: AnalysisPlan,
           opts: AnalysisOptions, explore: bool) -> Submitted:
    """Submit every task of the analysis of ``trace`` (opened here only for its metadata);
    larger parts first."""
    location = task_location(path)
    wopts = _worker_options(opts)
    client = cluster.client
    tasks = TASKS_PER_WORKER * cluster.workers
    rows = plan.taylor_rounds * trace.attrs.sampling.samples_per_round
    parts = split_plan(plan, rows, tasks)
    tag = uuid.uuid4().hex[:8]
    order = sorted(range(len(parts)), key=lambda i: -parts[i].cost)
    prio = {i: len(parts) - r for r, i in enumerate(order)}
    hs = [client.submit(hindsight_task, location, p, wopts, pure=False, priority=prio[i],
                        key=f"ntrace-{tag}-{i}-{re.sub(r'[^A-Za-z0-9_.-]+', '-', p.label)}")
          for i, p in enumerate(parts)]
    sub = Submitted(parts, hs, [], [], [], 0, 0, 0, client)
    K = trace.snapshots
    if explore and trace.probe_units is not None and trace.has("probe/config") and K >= 2:
        ranges = exploration_parts(trace, K, opts, tasks)
        Q = int(trace.zarr_array("probe/config").shape[1])
        M = trace.probe_units.total
        sub.K, sub.Q, sub.M = K, Q, M
        bb = opts.block_bytes
        sub.distance = [client.submit(distance_task, location, K, r, bb, pure=False,
                                      key=f"ntrace-{tag}-distance-{r[0]}-{r[1]}")
                        for r in ranges["distance"]]
        sub.switch = [client.submit(switch_task, location, K, r, bb, pure=False,
                                    key=f"ntrace-{tag}-switch-{r[0]}-{r[1]}")
                      for r in ranges["switch"]]
        sub.volume = [client.submit(volume_task, location, K, Q, M, r, wopts, pure=False,
                                    key=f"ntrace-{tag}-volume-{r[0]}-{r[1]}")
                      for r in ranges["volume"]]
    return sub


def wait(sub: Submitted, opts: AnalysisOptions) -> dict[Any, Any]:
    """Results of every future by key, reporting progress; the first failure is raised
    (a library error from a worker keeps its class) and the other tasks are cancelled."""
    d = _distributed()
    n_h, n_e = len(sub.hindsight), len(sub.futures) - len(sub.hindsight)
    stages = {f.key: "hindsight tasks" for f in sub.hindsight}
    stages.update({f.key: "exploration tasks" for f in sub.futures[n_h:]})
    done = {"hindsight tasks": 0, "exploration tasks": 0}
    totals = {"hindsight tasks": n_h, "exploration tasks": n_e}
    for stage, total in totals.items():
        if total:
            opts.progress(stage, 0, total)
    results: dict[Any, Any] = {}
    try:
        for fut in d.as_completed(sub.futures, loop=sub.client.loop):
            results[fut.key] = fut.result()
            stage = stages[fut.key]
            done[stage] += 1
            opts.progress(stage, done[stage], totals[stage])
    except BaseException:
        for f in sub.futures:
            f.cancel()
        raise
    return results


def _cat(parts: list[torch.Tensor | None]) -> torch.Tensor | None:
    return None if any(p is None for p in parts) else torch.cat(parts)  # type: ignore[arg-type]


def _merge_families(fams: list[Family]) -> Family:
    """Neuron blocks of one layer, in order, as one family."""
    if len(fams) == 1:
        return fams[0]
    doms = [f.domain for f in fams]
    dom = Domain(doms[0].kind, _cat([d.center for d in doms]), _cat([d.radius for d in doms]),
                 _cat([d.lower for d in doms]), _cat([d.upper for d in doms]),
                 sum(d.batch for d in doms))
    out = Family(units=sum(f.units for f in fams), dim=fams[0].dim, domain=dom)
    for name in ("value", "gap", "status", "iterations"):
        setattr(out, name, np.concatenate([getattr(f, name) for f in fams], axis=1))
    out.x = _cat([f.x for f in fams])
    out.lam = _cat([f.lam for f in fams])
    att = [f.attained for f in fams]
    out.attained = None if any(a is None for a in att) else np.concatenate(att)  # type: ignore
    return out


def merge_hindsight(results: list[Hindsight]) -> Hindsight:
    """The parts' results (in the order of :func:`split_plan`) as the one
    :class:`Hindsight` of the whole plan."""
    first = results[0]
    blocks: dict[str, list[Hindsight]] = {}
    layer: dict[str, Family] = {}
    network = None
    notes: list[str] = []
    stats = _no_stats(first.stats.count)
    for hs in results:
        for n in hs.neuron:
            blocks.setdefault(n, []).append(hs)
        layer.update(hs.layer)
        if hs.network is not None:
            network = hs.network
            stats.network_radius = hs.stats.network_radius
        for key in ("mean", "lower", "upper", "neuron_radius", "layer_radius"):
            getattr(stats, key).update(getattr(hs.stats, key))
        notes += [n for n in hs.notes if n not in notes]
    neuron = {n: _merge_families([h.neuron[n] for h in hs_list])
              for n, hs_list in blocks.items()}
    br = {n: np.concatenate([h.best_response[n] for h in hs_list], axis=1)
          for n, hs_list in blocks.items() if all(n in h.best_response for h in hs_list)}
    brg = {n: np.concatenate([h.best_response_gap[n] for h in hs_list], axis=1)
           for n, hs_list in blocks.items() if all(n in h.best_response_gap for h in hs_list)}
    return Hindsight(checkpoints=first.checkpoints, round_index=first.round_index,
                     taylor_loss=first.taylor_loss, neuron=neuron, layer=layer,
                     network=network, stats=stats, best_response=br, best_response_gap=brg,
                     notes=notes)


@dataclass(frozen=True)
class Explored:
    """Exploration kernels combined from their parts (the assembly is the caller's)."""

    min_distance: np.ndarray
    switch_fraction: np.ndarray
    log_volume: LogVolume


def merge_exploration(sub: Submitted, results: dict[Any, Any]) -> Explored | None:
    if not sub.distance:
        return None
    dist = np.concatenate([results[f.key] for f in sub.distance])
    counts = np.sum([results[f.key] for f in sub.switch], axis=0)
    vols = [results[f.key] for f in sub.volume]
    lv = LogVolume(np.concatenate([v.value for v in vols]), vols[0].rank, vols[0].floor)
    return Explored(dist, counts / float((sub.K - 1) * sub.M), lv)


def run_on_cluster(cluster: Cluster, path: str | os.PathLike[str], trace: Trace,
                   plan: AnalysisPlan, opts: AnalysisOptions, explore: bool
                   ) -> tuple[Hindsight, Explored | None]:
    """Every hindsight solve and exploration kernel of ``plan`` as Dask tasks."""
    sub = submit(cluster, path, trace, plan, opts, explore)
    results = wait(sub, opts)
    hs = merge_hindsight([results[f.key] for f in sub.hindsight])
    return hs, merge_exploration(sub, results)
