"""Incremental analysis of a trace that is still being written.

:class:`LiveAnalysis` keeps the results Dataset of ``ntrace analyze`` up to date as a writer
commits rows, reading only the new ones. It runs the analyzer's own pieces
(:class:`ntrace.analyze.hindsight.Accumulators`, its solver dispatch, the assembly of
:func:`ntrace.analyze.assemble.build_dataset`): one definition of every quantity. The hindsight
statistics of the rounds already read are kept, each update adds the new blocks to them, and
every family is solved at the new counts warm-started from its previous optimum.

Checkpoints are the counts of :func:`view_checkpoints`: a grid of about 4 counts per doubling,
fixed in advance so that a count, once passed, is never solved again, plus the current count
(re-solved at every update). The results then equal those of a fresh
``analyze_trace(path, AnalysisOptions(checkpoints=view_checkpoints(T)))`` of the same committed
prefix (within the solves' certified gaps; tested). That holds for ``domain="none"`` (the
default here), where the objective over N rounds depends on those rounds only. ``ball`` and
``box`` are built from every iterate up to the last, so each new row moves H for every
checkpoint: with those the hindsight is recomputed from the whole committed prefix at each
update (:attr:`LiveAnalysis.incremental` is False). The exploration measures are recomputed from
the bit-packed probe group (they read no Taylor data), within a time budget if one is set.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import xarray as xr

from ntrace.analyze.assemble import build_dataset
from ntrace.analyze.domain import Domain, IterateStats
from ntrace.analyze.exploration import Exploration
from ntrace.analyze.hindsight import Accumulators, Family, Hindsight, _family, _solve_all, _Solver
from ntrace.analyze.hindsight import hindsight as fresh_hindsight
from ntrace.analyze.options import AnalysisOptions
from ntrace.analyze.plan import AnalysisPlan, make_plan
from ntrace.analyze.run import check_device, explore, result_notes
from ntrace.analyze.source import TaylorSource
from ntrace.errors import UsageError
from ntrace.format.reader import Trace, open_trace

VIEW_MAX_DIM = 1024
"""The largest problem the view solves by default (``max_dim``): a layer of more parameters is
left to ``ntrace analyze``, whose one pass can afford its dense solves (a few seconds each at
3000 parameters, again at every update here)."""

PER_OCTAVE = 4
"""Grid checkpoints per doubling of the Taylor-round count."""


def grid(total: int) -> tuple[int, ...]:
    """The fixed checkpoint counts up to ``total``: ``round(2^(k/4))`` for k = 0, 1, ..."""
    pts: set[int] = set()
    k = 0
    while (c := round(2 ** (k / PER_OCTAVE))) <= total:
        pts.add(c)
        k += 1
    return tuple(sorted(pts))


def view_checkpoints(total: int) -> tuple[int, ...]:
    """The checkpoints of a live analysis of ``total`` Taylor rounds: the grid and ``total``."""
    return tuple(sorted({*grid(total), total}))


@dataclass
class _State:
    """What the incremental hindsight keeps between updates."""

    acc: Accumulators
    neuron: dict[str, Family]
    layer: dict[str, Family]
    network: Family | None
    capacity: int  # sample rows the accumulators can hold (the iterative losses' working set)
    rounds: int = 0  # Taylor rounds read
    done: int = 0  # grid checkpoints solved (their rows are final)
    taylor_loss: np.ndarray = field(default_factory=lambda: np.zeros(0))
    round_index: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    total: dict[str, torch.Tensor] = field(default_factory=dict)  # sum of the iterates
    lower: dict[str, torch.Tensor] = field(default_factory=dict)
    upper: dict[str, torch.Tensor] = field(default_factory=dict)

    def families(self) -> list[Family]:
        return [*self.neuron.values(), *self.layer.values(),
                *([self.network] if self.network is not None else [])]

    def add_iterates(self, ws: dict[str, torch.Tensor]) -> None:
        """Running sum and range of the iterates ``(b, j, i)`` of each layer."""
        for name, w in ws.items():
            if name not in self.total:
                self.total[name], self.lower[name], self.upper[name] = (w.sum(0), w.amin(0),
                                                                        w.amax(0))
            else:
                self.total[name] += w.sum(0)
                self.lower[name] = torch.minimum(self.lower[name], w.amin(0))
                self.upper[name] = torch.maximum(self.upper[name], w.amax(0))

    def stats(self, count: int) -> IterateStats:
        """The iterates read so far (the mean is where the iterative solves start; no radius:
        the unconstrained domain has none)."""
        mean = {k: v / count for k, v in self.total.items()}
        zero = torch.zeros((), dtype=torch.float64)
        return IterateStats(mean=mean, lower=dict(self.lower), upper=dict(self.upper),
                            neuron_radius={k: torch.full(v.shape[:1], torch.nan,
                                                         dtype=v.dtype) for k, v in mean.items()},
                            layer_radius={k: zero for k in mean}, network_radius=zero,
                            count=count)


def _keep_rows(fam: Family, keep: int, n: int) -> None:
    """Room for ``n`` checkpoints, the first ``keep`` rows kept (new arrays: a Dataset built
    from the old ones is never changed afterwards)."""
    old = (fam.value[:keep], fam.gap[:keep], fam.status[:keep], fam.iterations[:keep])
    fam.allocate(n)
    fam.value[:keep], fam.gap[:keep], fam.status[:keep], fam.iterations[:keep] = old


class LiveAnalysis:
    """The results Dataset of the trace at ``path``, brought up to date by :meth:`update`.

    ``options`` as for :func:`ntrace.analyze.analyze_trace` (``checkpoints``, ``dynamic`` and
    the Dask options are the view's own: ignored); default ``domain="none"`` and
    ``max_dim=VIEW_MAX_DIM``. ``scales=None``
    means the layer and neuron scales the trace supports (the network scale only when asked
    for). The exploration measures are recomputed from all committed snapshots (the log-volume
    of every unit needs them all): at every update, or with ``exploration_budget`` (a share of
    the time, e.g. 0.2) only as often as that allows while the run is running; they then
    describe the snapshots committed when they were last measured (``snapshot_round``).
    """

    def __init__(self, path: str | os.PathLike[str], options: AnalysisOptions | None = None,
                 exploration_budget: float | None = None) -> None:
        self.path = path
        self.opts = replace(options or AnalysisOptions(domain="none", max_dim=VIEW_MAX_DIM),
                            dynamic=False, scheduler=None, workers=None)
        self.device = check_device(self.opts.device)
        self.taylor_rounds = 0
        self.snapshots = -1
        self.dataset: xr.Dataset | None = None
        self.rows_read = 0  # Taylor rounds read by the hindsight, over all updates
        self.restarts = 0  # times the accumulated statistics were dropped and rebuilt
        self.timings: dict[str, float] = {}  # seconds of each stage of the last update
        self._state: _State | None = None
        self._hs: Hindsight | None = None
        self._expl: Exploration | None = None
        self.exploration_budget = exploration_budget
        self._explored: tuple[float, float] | None = None  # when, and how long it took

    @property
    def incremental(self) -> bool:
        """Whether updates read only new rows (True for the unconstrained domain)."""
        return self.opts.domain == "none"

    def update(self, trace: Trace | None = None) -> bool:
        """Analyse what was committed since the last call (``trace``: the trace freshly
        opened, else it is opened here); True when :attr:`dataset` changed."""
        if trace is None:
            with open_trace(self.path) as tr:
                return self.update(tr)
        T, K = trace.taylor_rounds, trace.snapshots
        if T == 0 or (T == self.taylor_rounds and K == self.snapshots):
            return False
        if T < self.taylor_rounds:
            raise UsageError(f"{trace.path} now commits {T} Taylor rounds, fewer than the "
                             f"{self.taylor_rounds} analysed: it was overwritten; restart the view")
        opts = replace(self.opts, checkpoints=view_checkpoints(T))
        if opts.scales is None:  # what the trace supports, less the network scale, whose
            # dense solves (every parameter at once) would hold the page back; asked for, it runs
            auto = make_plan(trace, opts).scales
            opts = replace(opts, scales=tuple(s for s in auto if s != "network") or auto)
        plan = make_plan(trace, opts)
        t0 = time.perf_counter()
        changed = T != self.taylor_rounds or self._hs is None
        if changed:
            self._hs = self._hindsight(trace, plan, opts)
            self.taylor_rounds = T
        t1 = time.perf_counter()
        if K != self.snapshots and self._explore_now(trace):
            self._expl = explore(trace, opts) if opts.exploration else None
            self.snapshots = K
            self._explored = (time.monotonic(), time.perf_counter() - t1)
            changed = True
        if not changed:
            return False
        t2 = time.perf_counter()
        self.dataset = build_dataset(trace, plan, opts, self._hs, self._expl,
                                     result_notes(trace, opts, self._expl))
        self.timings = {"hindsight": t1 - t0, "exploration": t2 - t1,
                        "assembly": time.perf_counter() - t2}
        return True

    def _explore_now(self, trace: Trace) -> bool:
        """Whether to measure exploration again: always without a budget, for the first
        time and once the run has ended; else when the last measurement's cost is at most
        ``exploration_budget`` of the time since."""
        if self.exploration_budget is None or self._explored is None \
                or trace.attrs.status != "running":
            return True
        at, cost = self._explored
        return time.monotonic() - at >= cost / self.exploration_budget

    # -- the hindsight ---------------------------------------------------------------------
    def _hindsight(self, trace: Trace, plan: AnalysisPlan, opts: AnalysisOptions) -> Hindsight:
        T = plan.taylor_rounds
        if not self.incremental:  # H is built from every iterate: it moved for every count
            self.rows_read += T
            with torch.no_grad():
                return fresh_hindsight(trace, plan, opts)
        samples = trace.attrs.sampling.samples_per_round
        st = self._state
        if st is not None and st.acc.work is not None and st.capacity < T * samples:
            st = None  # the working set is full: rebuild it, twice as large
            self.restarts += 1
        if st is None:
            st = self._state = self._new_state(plan, opts, T * samples,
                                                      trace.attrs.output_size)
        with torch.no_grad():
            self._advance(st, trace, plan, opts)
        return Hindsight(checkpoints=plan.checkpoints, round_index=st.round_index,
                         taylor_loss=st.taylor_loss, neuron=dict(st.neuron),
                         layer=dict(st.layer), network=st.network, stats=st.stats(T))

    def _new_state(self, plan: AnalysisPlan, opts: AnalysisOptions, rows: int,
                   outputs: int) -> _State:
        plans = list(plan.layers)
        none = [lp for lp in plans if "neuron" in plan.scales and lp.name in plan.neuron_scale]
        neuron = {lp.name: _family(len(lp.selected), lp.d_aug,
                                   Domain("none", batch=len(lp.selected)), 0) for lp in none}
        layer = {lp.name: _family(1, lp.dim, Domain("none"), 0) for lp in plans
                 if "layer" in plan.scales and lp.name in plan.layer_scale}
        network = (_family(1, plan.network_dim, Domain("none"), 0)
                   if "network" in plan.scales else None)
        capacity = 2 * rows
        args = (plans, neuron, layer, network is not None, plan.loss)
        try:
            acc = Accumulators(*args, capacity, outputs, self.device, opts.max_memory)
        except UsageError:  # twice the rows do not fit: exactly these, rebuilt when full
            capacity = rows
            acc = Accumulators(*args, capacity, outputs, self.device, opts.max_memory)
        return _State(acc, neuron, layer, network, capacity)

    def _advance(self, st: _State, trace: Trace, plan: AnalysisPlan,
                 opts: AnalysisOptions) -> None:
        """Read Taylor rounds [st.rounds, T), solving at each new grid count and at T."""
        T0, T = st.rounds, plan.taylor_rounds
        cps = plan.checkpoints
        fixed = set(grid(T))
        for fam in st.families():
            _keep_rows(fam, st.done, len(cps))
        src = TaylorSource(trace, plan.layers, self.device, opts.block_bytes)
        solver = _Solver(opts, st.stats(max(T0, 1)))
        plans = list(plan.layers)
        tl = [st.taylor_loss]
        for block in src.blocks(T0, T, breaks=[c for c in fixed if c > T0]):
            tl.append(block.sample_loss.mean(1).cpu().numpy())
            st.acc.add(block)
            st.add_iterates({n: lb.w for n, lb in block.layers.items()})
            if block.stop in fixed:
                _solve_all(solver, st.done, plans, st.neuron, st.layer, st.network, st.acc,
                           st.stats(block.stop))
                st.done += 1
        st.taylor_loss = np.concatenate(tl)
        st.round_index = np.concatenate([st.round_index, trace.read(
            "taylor/round_index", slice(T0, T)).astype(np.int64)])
        self.rows_read += T - T0
        st.rounds = T
        if T not in fixed:  # the current count: solved now, again at the next update
            _solve_all(solver, len(cps) - 1, plans, st.neuron, st.layer, st.network, st.acc,
                       st.stats(T))
