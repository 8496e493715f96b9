"""Hindsight Taylor optima at checkpoints, for every neuron, layer and the network.

One pass over the Taylor rounds, block by block, cut at every checkpoint: MSE statistics,
nll affine statistics, or the working set of cross-entropy and binary logistic losses grow
incrementally, and at each checkpoint T every family
of problems (the selected neurons of a layer as one batch; each layer; the network) is
solved, warm-started from its solution at the previous checkpoint. Optionally each round's
own best response min_V TL_t(V) (neuron scale) is solved as the rounds stream past.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass, field

import numpy as np
import torch

import ntrace.analyze.crossentropy as ce
from ntrace.analyze.domain import Domain, IterateStats, iterate_stats
from ntrace.analyze.nll import Affine, NLLStats
from ntrace.analyze.options import AnalysisOptions
from ntrace.analyze.plan import AnalysisPlan, LayerPlan
from ntrace.analyze.quadratic import ChainGram, DenseNeuronGram, NeuronGram, Quadratic
from ntrace.analyze.solve import (
    CONVERGED,
    NOT_CONVERGED,
    UNBOUNDED,
    Solution,
    fista,
    solve_linear,
    solve_quadratic,
)
from ntrace.analyze.source import RoundBlock, TaylorSource
from ntrace.analyze.workingset import WorkingSet, per_round_problem
from ntrace.errors import UsageError
from ntrace.format.reader import Trace
from ntrace.losses import LINKS
from ntrace.progress import Progress


@dataclass
class Family:
    """Solves of one batch of problems (a layer's neurons, one layer, or the network) at
    every checkpoint; ``x`` and ``lam`` carry the warm start between checkpoints."""

    units: int
    dim: int
    domain: Domain
    value: np.ndarray = field(init=False)  # (checkpoint, unit) optimum, NaN if unbounded
    gap: np.ndarray = field(init=False)  # certified bound on value − true optimum
    status: np.ndarray = field(init=False)  # int8: solve.STATUS_NAMES
    iterations: np.ndarray = field(init=False)
    x: torch.Tensor | None = None
    lam: torch.Tensor | None = None
    attained: np.ndarray | None = None  # cross-entropy 'none': attainment known True

    def allocate(self, n_checkpoints: int) -> None:
        shape = (n_checkpoints, self.units)
        self.value = np.full(shape, np.nan)
        self.gap = np.full(shape, np.nan)
        self.status = np.full(shape, NOT_CONVERGED, dtype=np.int8)
        self.iterations = np.zeros(shape, dtype=np.int64)

    def store(self, k: int, sol: Solution) -> None:
        self.value[k] = sol.value.cpu().numpy()
        self.gap[k] = sol.gap.cpu().numpy()
        self.status[k] = sol.status.cpu().numpy()
        self.iterations[k] = sol.iterations.cpu().numpy()
        unb = self.status[k] == UNBOUNDED
        self.value[k, unb] = np.nan
        self.gap[k, unb] = np.nan
        self.x = sol.x
        self.lam = sol.lam


@dataclass
class Hindsight:
    """Everything measured on the Taylor rounds: per-round losses at the iterates, and the
    optima of each family at each checkpoint (Taylor-round counts)."""

    checkpoints: tuple[int, ...]
    round_index: np.ndarray  # (taylor_round,) training round of each Taylor round
    taylor_loss: np.ndarray  # (taylor_round,) mean sample loss = TL_t(W_t)
    neuron: dict[str, Family]
    layer: dict[str, Family]
    network: Family | None
    stats: IterateStats
    best_response: dict[str, np.ndarray] = field(default_factory=dict)  # (taylor_round, unit)
    best_response_gap: dict[str, np.ndarray] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


class _Solver:
    """Dispatches a family's problem to the right solver and keeps its warm start."""

    def __init__(self, opts: AnalysisOptions, stats: IterateStats) -> None:
        self.opts = opts
        self.stats = stats

    def quadratic(self, fam: Family, q: Quadratic, k: int) -> None:
        sol = solve_quadratic(q, fam.domain, self.opts.tol, self.opts.max_iter, x0=fam.x,
                              lam0=fam.lam)
        fam.store(k, sol)

    def linear(self, fam: Family, f: Affine, k: int) -> None:
        fam.store(k, solve_linear(f.g, f.c, fam.domain))

    def iterative(self, fam: Family, prob: ce.Problem, k: int, start: torch.Tensor) -> None:
        """Cross-entropy or binary logistic: in the design's row space where that is exact
        and much smaller (:func:`ntrace.analyze.crossentropy.reduce`)."""
        dom = fam.domain
        red = None
        center = dom.center if dom.kind == "ball" and dom.center is not None else start
        if dom.kind != "box":
            red = ce.reduce(prob, center)
        if red is None:
            fam.store(k, self._iterative(fam, dom, prob, start, fam.x))
            return
        sub, Q = red
        B, r = Q.shape[0], Q.shape[1]
        zero = torch.zeros(B, r, dtype=start.dtype, device=start.device)
        sdom = (Domain("ball", center=zero, radius=dom.radius, batch=B) if dom.kind == "ball"
                else Domain("none", batch=B))

        def down(x: torch.Tensor) -> torch.Tensor:
            return torch.einsum("brd,bd->br", Q, x - center)

        warm = None if fam.x is None else down(fam.x)
        sol = self._iterative(fam, sdom, sub, down(start), warm)
        sol.x = center + torch.einsum("brd,br->bd", Q, sol.x)
        fam.store(k, sol)

    def _iterative(self, fam: Family, dom: Domain, prob: ce.Problem, start: torch.Tensor,
                   warm: torch.Tensor | None) -> Solution:
        o = self.opts
        x0 = start if warm is None else warm
        if dom.kind != "none":
            x0 = dom.project(x0)
            return fista(prob, dom, x0, o.tol, o.max_iter,
                         lipschitz=ce.max_curvature(prob, x0))
        B = x0.shape[0]
        if fam.attained is None:
            fam.attained = np.zeros(B, dtype=bool)
        unbounded = np.zeros(B, dtype=bool)
        for b in np.nonzero(~fam.attained)[0]:
            verdict = ce.unattained(prob, int(b))
            if verdict is True:
                unbounded[b] = True
            elif verdict is False:
                fam.attained[b] = True
        nan = torch.full((B,), math.nan, dtype=x0.dtype, device=x0.device)
        x, v, gap = start.clone(), nan.clone(), nan.clone()
        its = torch.zeros(B, dtype=torch.int64, device=x0.device)
        ok = torch.as_tensor(~unbounded, device=x0.device)
        # Newton from the warm start, then from the mean iterate where that did not certify
        # (a warm start far out along a nearly flat direction can stall the damped phase)
        for x_init in ((x0, start) if warm is not None else (start,)):
            idx = (ok & ~(gap <= o.tol)).nonzero().squeeze(1)
            if not idx.numel():
                break
            bx, bv, bg, bi = ce.newton(prob.take(idx), x_init[idx], o.tol, o.max_iter)
            better = ~(bg >= gap[idx])
            j = idx[better]
            x[j], v[j], gap[j] = bx[better], bv[better], bg[better]
            its[idx] += bi
        status = torch.where(gap <= o.tol, CONVERGED, NOT_CONVERGED).to(torch.int8)
        status[~ok] = UNBOUNDED
        return Solution(x, v, gap, its, status, torch.full_like(v, math.nan))


def _family(units: int, dim: int, dom: Domain, n_cp: int) -> Family:
    fam = Family(units=units, dim=dim, domain=dom)
    fam.allocate(n_cp)
    return fam


def hindsight(trace: Trace, plan: AnalysisPlan, opts: AnalysisOptions,
              source: TaylorSource | None = None) -> Hindsight:
    """Solve every requested family at every checkpoint of ``plan``. ``source`` reads the
    rounds (default: a :class:`TaylorSource` of the plan's layers); a part of a larger plan
    passes one that cuts the blocks of the whole (:mod:`ntrace.analyze.graph`)."""
    device = torch.device(opts.device)
    src = source or TaylorSource(trace, plan.layers, device, opts.block_bytes)
    T = plan.taylor_rounds
    cps = plan.checkpoints
    opts.progress(Progress("iterates", 0, T))
    stats = iterate_stats(src, T)
    opts.progress(Progress("iterates", T, T))
    kind, loss = opts.domain, plan.loss
    n_cp = len(cps)
    plans = list(plan.layers)
    neuron = {lp.name: _family(len(lp.selected), lp.d_aug, stats.neuron(kind, lp), n_cp)
              for lp in plans if "neuron" in plan.scales and lp.name in plan.neuron_scale}
    layer = {lp.name: _family(1, lp.dim, stats.layer(kind, lp), n_cp)
             for lp in plans if "layer" in plan.scales and lp.name in plan.layer_scale}
    network = (_family(1, plan.network_dim, stats.network(kind, plans), n_cp)
               if "network" in plan.scales else None)
    p = trace.attrs.output_size
    acc = Accumulators(plans, neuron, layer, network is not None, loss, T * src.samples, p,
                       device, opts.max_memory)
    dynamic = opts.dynamic and bool(neuron)
    notes: list[str] = []
    if dynamic and loss != "mse" and kind == "none":
        dynamic = False
        notes.append(f"per-round best responses of {loss} need a bounded domain (ball or box); "
                     "none were computed")
    if loss == "nll" and kind == "none":
        notes.append("nll is linear in the outputs, so its Taylor losses are linear in the "
                     "parameters: unconstrained optima are unbounded below (status unbounded) "
                     "unless the gradient vanishes; use --domain ball or box")
    br = {n: np.full((T, f.units), np.nan) for n, f in neuron.items()} if dynamic else {}
    br_gap = {n: np.full((T, f.units), np.nan) for n, f in neuron.items()} if dynamic else {}
    round_index = trace.read("taylor/round_index", slice(0, T)).astype(np.int64)
    tl = np.empty(T)
    solver = _Solver(opts, stats)
    k = 0
    by_name = {lp.name: lp for lp in plans}
    opts.progress(Progress("taylor rounds", 0, T))
    for block in src.blocks(0, T, breaks=cps):
        t0, t1 = block.start, block.stop
        tl[t0:t1] = block.sample_loss.mean(1).cpu().numpy()
        acc.add(block)
        if dynamic:
            for name, fam in neuron.items():
                sol = acc.best_response(by_name[name], block, fam.domain.repeat(t1 - t0), opts)
                br[name][t0:t1] = sol.value.reshape(t1 - t0, -1).cpu().numpy()
                br_gap[name][t0:t1] = sol.gap.reshape(t1 - t0, -1).cpu().numpy()
        while k < n_cp and cps[k] == t1:
            _solve_all(solver, k, plans, neuron, layer, network, acc, stats)
            k += 1
        opts.progress(Progress("taylor rounds", t1, T))
    return Hindsight(checkpoints=cps, round_index=round_index, taylor_loss=tl, neuron=neuron,
                     layer=layer, network=network, stats=stats, best_response=br,
                     best_response_gap=br_gap, notes=notes)


Objective = Quadratic | Affine | ce.Problem


class Accumulators:
    """What each loss keeps of the rounds read so far: MSE Gram statistics, nll affine
    statistics, or the working set of the iterative losses; and the hindsight objective of
    each family over those rounds (``neurons``, ``layer``, ``network``)."""

    def __init__(self, plans: list[LayerPlan], neuron: Collection[str], layer: Collection[str],
                 network: bool, loss: str, rows: int, p: int, device: torch.device,
                 max_memory: int) -> None:
        self.loss, self.p = loss, p
        self.plans = list(plans)
        active = [lp for lp in plans if network or lp.name in neuron or lp.name in layer]
        self.grams: dict[str, NeuronGram | DenseNeuronGram] = {}
        self.chain: ChainGram | None = None
        self.nll: NLLStats | None = None
        self.work: WorkingSet | None = None
        if loss == "mse":
            self.grams = {lp.name: (NeuronGram if lp.kind.rank_one else DenseNeuronGram)(
                lp, p, device) for lp in plans if lp.name in neuron}
            if layer or network:
                self.chain = ChainGram(plans if network else
                                       [lp for lp in plans if lp.name in layer],
                                       list(layer), network, p, device)
        elif loss == "nll":
            self.nll = NLLStats(active, device)
        elif loss in LINKS:
            self.work = WorkingSet(active, rows, p, device, max_memory, LINKS[loss])
        else:
            raise UsageError(f"loss {loss!r} cannot be analysed by this ntrace; it analyses "
                             f"mse, nll, {', '.join(LINKS)}")

    def add(self, block: RoundBlock) -> None:
        if self.loss == "mse":
            err = block.output - block.target
            for g in self.grams.values():
                g.add(block, err)
            if self.chain is not None:
                self.chain.add(block, err)
        elif self.nll is not None:
            self.nll.add(block)
        else:
            assert self.work is not None
            self.work.add(block)

    def neurons(self, lp: LayerPlan) -> Objective:
        """The selected neurons' hindsight objectives (a batch, one per neuron)."""
        if self.nll is not None:
            return self.nll.neurons(lp)
        if self.work is not None:
            return self.work.neurons(lp)
        return self.grams[lp.name].quadratic()

    def layer(self, name: str) -> Objective:
        if self.nll is not None:
            return self.nll.chain([name])
        if self.work is not None:
            return self.work.chain([name])
        assert self.chain is not None
        return self.chain.layer(name)

    def network(self) -> Objective:
        names = [lp.name for lp in self.plans]
        if self.nll is not None:
            return self.nll.chain(names)
        if self.work is not None:
            return self.work.chain(names)
        assert self.chain is not None
        return self.chain.whole()

    def best_response(self, lp: LayerPlan, block: RoundBlock, dom: Domain,
                      opts: AnalysisOptions) -> Solution:
        """Each round's own optimum for the selected neurons (rounds-major)."""
        if self.loss == "mse":
            err = block.output - block.target
            return solve_quadratic(self.grams[lp.name].per_round(block, err), dom, opts.tol,
                                   opts.max_iter)
        if self.nll is not None:
            f = self.nll.per_round(block, lp)
            return solve_linear(f.g, f.c, dom)
        assert self.work is not None
        prob = per_round_problem(lp, block, self.p, self.work.link)
        return fista(prob, dom, dom.start(), opts.tol, opts.max_iter,
                     lipschitz=ce.max_curvature(prob, dom.start()))


def _solve(solver: _Solver, fam: Family, obj: Objective, k: int, start: torch.Tensor) -> None:
    if isinstance(obj, Quadratic):
        solver.quadratic(fam, obj, k)
    elif isinstance(obj, Affine):
        solver.linear(fam, obj, k)
    else:
        solver.iterative(fam, obj, k, start)


def _solve_all(solver: _Solver, k: int, plans: list[LayerPlan], neuron: dict[str, Family],
               layer: dict[str, Family], network: Family | None, acc: Accumulators,
               stats: IterateStats) -> None:
    """Every family at checkpoint k; iterative solves start from the mean iterate."""
    by_name = {lp.name: lp for lp in plans}
    mean = stats.mean
    for name, fam in neuron.items():
        lp = by_name[name]
        start = mean[name][torch.as_tensor(lp.neurons, device=mean[name].device)]
        _solve(solver, fam, acc.neurons(lp), k, start)
    for name, fam in layer.items():
        _solve(solver, fam, acc.layer(name), k, mean[name].reshape(1, -1))
    if network is not None:
        start = torch.cat([mean[lp.name].reshape(-1) for lp in plans])[None]
        _solve(solver, network, acc.network(), k, start)


_WorkingSet = WorkingSet  # the name the tests and tools knew
