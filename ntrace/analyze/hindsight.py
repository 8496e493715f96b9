"""Hindsight Taylor optima at checkpoints, for every neuron, layer and the network.

One pass over the Taylor rounds, block by block, cut at every checkpoint: MSE statistics
(or the cross-entropy working set) grow incrementally, and at each checkpoint T every family
of problems (the selected neurons of a layer as one batch; each layer; the network) is
solved, warm-started from its solution at the previous checkpoint. Optionally each round's
own best response min_V TL_t(V) (neuron scale) is solved as the rounds stream past.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ntrace.analyze import crossentropy as ce
from ntrace.analyze.domain import Domain, IterateStats, iterate_stats
from ntrace.analyze.options import AnalysisOptions
from ntrace.analyze.plan import AnalysisPlan, LayerPlan
from ntrace.analyze.quadratic import ChainGram, NeuronGram, Quadratic
from ntrace.analyze.solve import (
    CONVERGED,
    NOT_CONVERGED,
    UNBOUNDED,
    Solution,
    fista,
    solve_quadratic,
)
from ntrace.analyze.source import RoundBlock, TaylorSource, neuron_columns
from ntrace.errors import UsageError
from ntrace.format.reader import Trace


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


class _WorkingSet:
    """Cross-entropy data of every (round, sample) up to the last checkpoint, preallocated."""

    def __init__(self, plans: list[LayerPlan], rows: int, outputs: int,
                 device: torch.device, max_memory: int) -> None:
        need = rows * (outputs + 1)
        for lp in plans:
            jac = outputs * len(lp.tracked) if lp.jacobian == "stored" else 0
            need += rows * (lp.d_aug + len(lp.tracked) + jac)
        if need * 8 > max_memory:
            raise UsageError(
                f"the cross-entropy analysis must hold {need * 8 / 2**20:.0f} MiB of Taylor "
                f"data in memory, above max_memory {max_memory / 2**20:.0f} MiB; analyse fewer "
                "layers (--layer), fewer checkpoints' rounds, or raise --max-memory")
        kw: dict[str, Any] = {"dtype": torch.float64, "device": device}
        self.f = torch.empty(rows, outputs, **kw)
        self.y = torch.empty(rows, dtype=torch.int64, device=device)
        self.x = {lp.name: torch.empty(rows, lp.d_aug, **kw) for lp in plans}
        self.a = {lp.name: torch.empty(rows, len(lp.tracked), **kw) for lp in plans}
        self.J = {lp.name: (torch.empty(rows, outputs, len(lp.tracked), **kw)
                            if lp.jacobian == "stored" else None) for lp in plans}
        self.plans = {lp.name: lp for lp in plans}
        self.rows = 0

    def add(self, block: RoundBlock) -> None:
        b, s = block.sample_loss.shape
        r0, r1 = self.rows, self.rows + b * s
        self.f[r0:r1] = block.output.reshape(b * s, -1)
        self.y[r0:r1] = block.target.reshape(-1)
        for name, lp in self.plans.items():
            lb = block.layers[name]
            self.x[name][r0:r1] = lb.x.reshape(b * s, -1)
            tracked = torch.as_tensor(lp.tracked, device=lb.x.device)
            self.a[name][r0:r1] = lb.pre()[..., tracked].reshape(b * s, -1)
            J = self.J[name]
            if J is not None:
                assert lb.jac is not None
                J[r0:r1] = lb.jac.reshape(b * s, *lb.jac.shape[2:])
        self.rows = r1

    def neurons(self, lp: LayerPlan) -> ce.NeuronCE:
        n, name = self.rows, lp.name
        sel = torch.as_tensor(lp.selected, device=self.f.device)
        J = self.J[name]
        if J is None:
            eye = torch.eye(self.f.shape[1], dtype=self.f.dtype, device=self.f.device)
            g = eye[torch.as_tensor(lp.neurons, device=eye.device)][:, None, :]
            g = g.expand(-1, n, -1)
        else:
            g = J[:n][:, :, sel].permute(2, 0, 1)
        a = self.a[name][:n][:, sel].T
        return ce.NeuronCE(self.f[None, :n], self.y[None, :n], self.x[name][None, :n],
                           g.contiguous(), a.contiguous(),
                           torch.zeros(len(sel), dtype=torch.int64, device=self.f.device))

    def chain(self, names: list[str]) -> ce.ChainCE:
        n = self.rows
        layers = []
        for m in names:
            J = self.J[m]
            layers.append((None if J is None else J[:n], self.x[m][:n], self.a[m][:n]))
        return ce.ChainCE(self.f[:n], self.y[:n], layers)


def _per_round_ce(lp: LayerPlan, block: RoundBlock, outputs: int) -> ce.NeuronCE:
    lb = block.layers[lp.name]
    b, s = lb.x.shape[:2]
    g = neuron_columns(lp, lb, outputs)  # (b, s, o, c)
    C = g.shape[-1]
    g = g.permute(0, 3, 1, 2).reshape(b * C, s, outputs)
    a = lb.pre()[..., torch.as_tensor(lp.neurons, device=lb.x.device)]
    a = a.permute(0, 2, 1).reshape(b * C, s)
    grp = torch.arange(b, device=lb.x.device).repeat_interleave(C)
    return ce.NeuronCE(block.output, block.target, lb.x, g.contiguous(), a.contiguous(), grp)


class _Solver:
    """Dispatches a family's problem to the right solver and keeps its warm start."""

    def __init__(self, opts: AnalysisOptions, stats: IterateStats) -> None:
        self.opts = opts
        self.stats = stats

    def quadratic(self, fam: Family, q: Quadratic, k: int) -> None:
        sol = solve_quadratic(q, fam.domain, self.opts.tol, self.opts.max_iter, x0=fam.x,
                              lam0=fam.lam)
        fam.store(k, sol)

    def cross_entropy(self, fam: Family, prob: ce.NeuronCE | ce.ChainCE, k: int,
                      start: torch.Tensor) -> None:
        o = self.opts
        x0 = start if fam.x is None else fam.x
        if fam.domain.kind != "none":
            x0 = fam.domain.project(x0)
            H = prob.hessian(x0)
            L0 = torch.linalg.eigvalsh(H)[:, -1].clamp(min=1e-12)
            fam.store(k, fista(prob, fam.domain, x0, o.tol, o.max_iter, lipschitz=L0))
            return
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
        for x_init in ((x0, start) if fam.x is not None else (start,)):
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
        fam.store(k, Solution(x, v, gap, its, status, torch.full_like(v, math.nan)))


def _family(units: int, dim: int, dom: Domain, n_cp: int) -> Family:
    fam = Family(units=units, dim=dim, domain=dom)
    fam.allocate(n_cp)
    return fam


def hindsight(trace: Trace, plan: AnalysisPlan, opts: AnalysisOptions) -> Hindsight:
    """Solve every requested family at every checkpoint of ``plan``."""
    device = torch.device(opts.device)
    src = TaylorSource(trace, plan.layers, device, opts.block_bytes)
    T = plan.taylor_rounds
    cps = plan.checkpoints
    opts.progress("iterates", 0, T)
    stats = iterate_stats(src, T)
    opts.progress("iterates", T, T)
    kind, mse = opts.domain, plan.loss == "mse"
    n_cp = len(cps)
    plans = list(plan.layers)
    neuron = {lp.name: _family(len(lp.selected), lp.d_aug, stats.neuron(kind, lp), n_cp)
              for lp in plans if "neuron" in plan.scales}
    layer = {lp.name: _family(1, lp.dim, stats.layer(kind, lp), n_cp)
             for lp in plans if "layer" in plan.scales and lp.name in plan.layer_scale}
    network = (_family(1, plan.network_dim, stats.network(kind, plans), n_cp)
               if "network" in plan.scales else None)
    p = trace.attrs.output_size
    grams = {lp.name: NeuronGram(lp, p, device) for lp in plans if lp.name in neuron}
    chain = None
    if mse and (layer or network is not None):
        chain = ChainGram(plans if network is not None else
                          [lp for lp in plans if lp.name in layer],
                          list(layer), network is not None, p, device)
    work = None
    if not mse:
        work = _WorkingSet(plans, T * src.samples, p, device, opts.max_memory)
    dynamic = opts.dynamic and bool(neuron)
    notes: list[str] = []
    if dynamic and not mse and kind == "none":
        dynamic = False
        notes.append("per-round best responses of cross-entropy need a bounded domain "
                     "(ball or box); none were computed")
    br = {n: np.full((T, f.units), np.nan) for n, f in neuron.items()} if dynamic else {}
    br_gap = {n: np.full((T, f.units), np.nan) for n, f in neuron.items()} if dynamic else {}
    round_index = trace.read("taylor/round_index", slice(0, T)).astype(np.int64)
    tl = np.empty(T)
    solver = _Solver(opts, stats)
    k = 0
    opts.progress("taylor rounds", 0, T)
    for block in src.blocks(0, T, breaks=cps):
        t0, t1 = block.start, block.stop
        tl[t0:t1] = block.sample_loss.mean(1).cpu().numpy()
        if mse:
            err = block.output - block.target
            for g in grams.values():
                g.add(block, err)
            if chain is not None:
                chain.add(block, err)
        else:
            assert work is not None
            work.add(block)
        if dynamic:
            by_name = {lp.name: lp for lp in plans}
            for name, fam in neuron.items():
                lp = by_name[name]
                dom = fam.domain.repeat(t1 - t0)
                if mse:
                    sol = solve_quadratic(grams[name].per_round(block, err), dom, opts.tol,
                                          opts.max_iter)
                else:
                    prob = _per_round_ce(lp, block, p)
                    sol = fista(prob, dom, dom.start(), opts.tol, opts.max_iter,
                                lipschitz=torch.linalg.eigvalsh(prob.hessian(dom.start()))
                                [:, -1].clamp(min=1e-12))
                br[name][t0:t1] = sol.value.reshape(t1 - t0, -1).cpu().numpy()
                br_gap[name][t0:t1] = sol.gap.reshape(t1 - t0, -1).cpu().numpy()
        while k < n_cp and cps[k] == t1:
            _solve_all(solver, k, plans, neuron, layer, network, grams, chain, work, stats,
                       kind)
            k += 1
        opts.progress("taylor rounds", t1, T)
    return Hindsight(checkpoints=cps, round_index=round_index, taylor_loss=tl, neuron=neuron,
                     layer=layer, network=network, stats=stats, best_response=br,
                     best_response_gap=br_gap, notes=notes)


def _solve_all(solver: _Solver, k: int, plans: list[LayerPlan], neuron: dict[str, Family],
               layer: dict[str, Family], network: Family | None,
               grams: dict[str, NeuronGram], chain: ChainGram | None,
               work: _WorkingSet | None, stats: IterateStats, kind: str) -> None:
    by_name = {lp.name: lp for lp in plans}
    for name, fam in neuron.items():
        if work is None:
            solver.quadratic(fam, grams[name].quadratic(), k)
        else:
            lp = by_name[name]
            start = stats.mean[name][torch.as_tensor(lp.neurons, device=stats.mean[name].device)]
            solver.cross_entropy(fam, work.neurons(lp), k, start)
    for name, fam in layer.items():
        if work is None:
            assert chain is not None
            solver.quadratic(fam, chain.layer(name), k)
        else:
            solver.cross_entropy(fam, work.chain([name]), k,
                                 stats.mean[name].reshape(1, -1))
    if network is not None:
        if work is None:
            assert chain is not None
            solver.quadratic(network, chain.whole(), k)
        else:
            start = torch.cat([stats.mean[lp.name].reshape(-1) for lp in plans])[None]
            solver.cross_entropy(network, work.chain([lp.name for lp in plans]), k, start)
    del kind
