"""Running the tasks of an analysis (:mod:`ntrace.analyze.graph`) on Dask: a running
``distributed`` cluster, a LocalCluster, or a ``distributed.Client`` of the caller's.

A task receives only the trace location (a path or fsspec URL, which every worker must be
able to open) and the task's small descriptors; it opens the trace itself, reads the Zarr
chunks it needs and returns small result arrays. No trace data passes through the scheduler.
``dask`` and ``distributed`` are imported only here, and only when a cluster is asked for
(``pip install 'ntrace[dask]'``).
"""

from __future__ import annotations

import logging
import os
import re
import uuid
from dataclasses import replace
from types import TracebackType
from typing import Any

import numpy as np
import torch

from ntrace.analyze.graph import Graph, StageProgress
from ntrace.analyze.hindsight import Hindsight
from ntrace.analyze.options import AnalysisOptions
from ntrace.errors import UsageError
from ntrace.format.reader import Trace, open_trace
from ntrace.format.store import is_url
from ntrace.progress import OnProgress, Progress

CONNECT_TIMEOUT = 10.0
"""Seconds to wait for a scheduler (and for its first worker) before giving up."""

TASKS_PER_WORKER = 2
"""Hindsight and exploration work is cut into about this many tasks per worker."""


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
    them as threads of this process); :meth:`attach` wraps a client of the caller's. Closing
    it closes what it started."""

    def __init__(self, scheduler: str | None = None, workers: int | None = None,
                 processes: bool = True) -> None:
        if (scheduler is None) == (workers is None):
            raise UsageError("a cluster needs exactly one of a scheduler address and a "
                             "worker count")
        d = _distributed()
        self.local: Any = None
        self._owns = True
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

    @classmethod
    def attach(cls, client: Any) -> Cluster:
        """A cluster on the caller's ``distributed.Client``, which closing leaves open."""
        if not hasattr(client, "submit") or not hasattr(client, "scheduler_info"):
            raise UsageError(f"cluster must be an ntrace Cluster or a distributed.Client, "
                             f"found {type(client).__name__}")
        cl = cls.__new__(cls)
        cl.local, cl.client, cl._owns = None, client, False
        cl.address = getattr(getattr(client, "scheduler", None), "address", None)
        return cl

    @property
    def workers(self) -> int:
        """Workers connected now (at least 1)."""
        return max(1, len(self.client.scheduler_info(n_workers=-1)["workers"]))

    @property
    def tasks(self) -> int:
        """About how many parts to cut each kind of work into: ``TASKS_PER_WORKER`` per
        connected worker."""
        return TASKS_PER_WORKER * self.workers

    def close(self) -> None:
        if not self._owns:
            return
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
    opts.progress(Progress(f"starting {what}", 0, 1))
    cl = Cluster(opts.scheduler, opts.workers)
    opts.progress(Progress(f"starting {what}", 1, 1))
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


def as_cluster(cluster: Any) -> Cluster:
    """``cluster`` as a :class:`Cluster`: itself, or one attached to a caller's client."""
    return cluster if isinstance(cluster, Cluster) else Cluster.attach(cluster)


# -- what runs on a worker -----------------------------------------------------------------
def worker_options(opts: AnalysisOptions) -> AnalysisOptions:
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
    """Tell Dask the size of the hindsight results (it would count an unknown object as ~56
    bytes), for its memory accounting and dashboards."""
    global _SIZES
    if not _SIZES:
        from dask.sizeof import sizeof

        sizeof.register(Hindsight)(_nbytes)
        _SIZES = True


def remote_task(location: str, needs: tuple[int, int], fn: Any, *args: Any) -> Any:
    """Run on a worker: ``fn(trace, *args)`` on the trace at ``location``, opened here and
    holding at least ``needs`` (Taylor rounds, snapshots)."""
    _register_sizes()
    trace = _open(location, *needs)
    try:
        return fn(trace, *args)
    finally:
        _close(trace)


# -- running -------------------------------------------------------------------------------
def run_on_cluster(cluster: Cluster, location: str, graph: Graph, progress: OnProgress
                   ) -> list[Any]:
    """Every task of ``graph`` on ``cluster`` (larger first), reading the trace at
    ``location``; their results in task order. The first failure is raised (a library
    error from a worker keeps its class) and the other tasks are cancelled."""
    d = _distributed()
    client = cluster.client
    tasks = graph.tasks
    tag = uuid.uuid4().hex[:8]
    order = sorted(range(len(tasks)), key=lambda i: -tasks[i].cost)
    prio = {i: len(tasks) - r for r, i in enumerate(order)}
    futures = [client.submit(remote_task, location, graph.needs, t.fn, *t.args, pure=False,
                             priority=prio[i],
                             key=f"ntrace-{tag}-{i}-{re.sub(r'[^A-Za-z0-9_.-]+', '-', t.label)}")
               for i, t in enumerate(tasks)]
    index = {f.key: i for i, f in enumerate(futures)}
    stages = StageProgress(tasks, progress)
    results: list[Any] = [None] * len(tasks)
    try:
        for fut in d.as_completed(futures, loop=client.loop):
            i = index[fut.key]
            results[i] = fut.result()
            stages.finished(tasks[i])
    except BaseException:
        for f in futures:
            f.cancel()
        raise
    return results
