"""The analysis as one set of tasks, run in process (:func:`run_here`) or on Dask
(:mod:`ntrace.analyze.cluster`); both run the same tasks and combine them the same way.

The work splits where the mathematics does. Hindsight optima: the network family, each
layer-scale family, and blocks of each layer's selected neurons; every part accumulates its
own statistics over all Taylor rounds and solves at every checkpoint
(:func:`ntrace.analyze.hindsight.hindsight` on a part of the plan). Exploration: each metric
plugin (:mod:`ntrace.analyze.metrics`) cuts itself into parts. With one task wanted (in
process) the whole plan is one part, read in one pass, and each metric one part.

A task is a module-level function of an open trace and small descriptors (a sub-plan: layer
geometry and neuron indices; snapshot or unit ranges) returning small results, so a Dask
worker can open the trace itself and no trace data passes through a scheduler. Each part
reads its rounds in the blocks the whole plan would use, so its sums are formed in the same
order as in one pass. The results, in task order, combine exactly (neuron blocks
concatenated; metric parts by the metric's rule) into one :class:`Hindsight` and one
:class:`Exploration`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from ntrace.analyze.domain import Domain, IterateStats
from ntrace.analyze.exploration import Exploration
from ntrace.analyze.hindsight import Family, Hindsight, hindsight
from ntrace.analyze.metrics import METRICS
from ntrace.analyze.metrics.base import Configs, Metric, Probe
from ntrace.analyze.metrics.base import Part as Range
from ntrace.analyze.options import AnalysisOptions
from ntrace.analyze.plan import AnalysisPlan, LayerPlan
from ntrace.analyze.source import TaylorSource
from ntrace.format.reader import Trace
from ntrace.progress import OnProgress, Progress

MIN_NEURON_BLOCK = 4
"""Fewest neurons in one neuron-scale task (each task reads its layer's data)."""

HINDSIGHT, EXPLORATION = "hindsight tasks", "exploration tasks"
"""The stages tasks belong to (progress labels)."""


# -- the hindsight parts -------------------------------------------------------------------
@dataclass(frozen=True)
class Part:
    """One hindsight task: ``plan`` is a part of the whole plan (one family or one block of
    neurons); ``layout`` holds the whole plan's layers, which set the block boundaries of
    the rounds (None: the part is the whole plan); ``stats`` says whether the task returns
    its layers' iterate statistics."""

    label: str
    plan: AnalysisPlan
    layout: tuple[LayerPlan, ...] | None
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


def _no_stats(count: int) -> IterateStats:
    return IterateStats(mean={}, lower={}, upper={}, neuron_radius={}, layer_radius={},
                        network_radius=torch.zeros((), dtype=torch.float64), count=count)


def hindsight_part(trace: Trace, part: Part, opts: AnalysisOptions) -> Hindsight:
    """A task: the hindsight solves of one part, read from ``trace``."""
    src = None
    if part.layout is not None:
        src = _LayoutSource(trace, part.plan.layers, torch.device(opts.device),
                            opts.block_bytes, part.layout)
    with torch.no_grad():
        hs = hindsight(trace, part.plan, opts, source=src)
    if not part.stats:
        hs.stats = _no_stats(hs.stats.count)
    return hs


def _family_cost(units: int, dim: int, rows: int, n_cp: int) -> float:
    """Rough flops of one family: Gram accumulation over all rows, one dense solve per
    checkpoint."""
    return float(units) * (rows * dim * dim + n_cp * dim ** 3)


def split_plan(plan: AnalysisPlan, rows: int, tasks: int) -> list[Part]:
    """Cut ``plan`` into parts: the network family, each layer family, and blocks of each
    layer's selected neurons of about equal cost, about ``tasks`` blocks in all (at least
    ``MIN_NEURON_BLOCK`` neurons each); one part, the whole plan, when ``tasks`` is 1.
    ``rows`` = Taylor rounds × samples."""
    n_cp = len(plan.checkpoints)
    if tasks <= 1:
        return [Part("hindsight", plan, None, _family_cost(1, plan.network_dim, rows, n_cp))]
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
    if len(results) == 1:
        return results[0]
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


# -- the exploration parts -----------------------------------------------------------------
def metric_part(trace: Trace, metric: Metric, probe: Probe, part: Range,
                opts: AnalysisOptions) -> Any:
    """A task: one part of one exploration metric, read from ``trace``."""
    return metric.compute(Configs.of(trace, probe.snapshots), probe, part, opts)


# -- the graph -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Task:
    """One task: ``fn(trace, *args)``; ``label`` names it, ``group`` says which results
    it is combined with (``hindsight`` or a metric's name), ``cost`` orders the work
    (larger first)."""

    label: str
    group: str
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    cost: float = 0.0

    @property
    def stage(self) -> str:
        """The progress stage of the task."""
        return HINDSIGHT if self.group == "hindsight" else EXPLORATION

    def __call__(self, trace: Trace) -> Any:
        return self.fn(trace, *self.args)


@dataclass(frozen=True)
class Graph:
    """Every task of one analysis and what combines their results: ``plan`` (None: no
    hindsight), ``probe`` (None: no exploration); hindsight tasks come first."""

    tasks: tuple[Task, ...]
    plan: AnalysisPlan | None
    probe: Probe | None
    metrics: tuple[Metric, ...]
    opts: AnalysisOptions

    @property
    def needs(self) -> tuple[int, int]:
        """Taylor rounds and snapshots a trace must hold to run the tasks."""
        return (0 if self.plan is None else self.plan.taylor_rounds,
                0 if self.probe is None else self.probe.snapshots)

    def combine(self, trace: Trace, results: Sequence[Any]
                ) -> tuple[Hindsight | None, Exploration | None]:
        """The results of :attr:`tasks`, in their order, as one :class:`Hindsight` and one
        :class:`Exploration` (coordinates read from ``trace``)."""
        groups: dict[str, list[Any]] = {}
        for t, r in zip(self.tasks, results, strict=True):
            groups.setdefault(t.group, []).append(r)
        expl = None
        if self.probe is not None:
            values = {m.name: m.combine(self.probe, groups[m.name], self.opts)
                      for m in self.metrics}
            expl = Exploration.of(trace, self.probe, self.metrics, values)
        hs = groups.get("hindsight")
        return (None if hs is None else merge_hindsight(hs)), expl


def build_graph(trace: Trace, plan: AnalysisPlan | None, opts: AnalysisOptions,
                tasks: int) -> Graph:
    """The tasks of analysing ``trace``: hindsight of ``plan`` (none when None) and, with
    ``opts.exploration``, every metric of the probe snapshots; cut into about ``tasks``
    parts each. ``opts`` are the options the tasks run with."""
    out: list[Task] = []
    if plan is not None:
        rows = plan.taylor_rounds * trace.attrs.sampling.samples_per_round
        out += [Task(p.label, "hindsight", hindsight_part, (p, opts), p.cost)
                for p in split_plan(plan, rows, tasks)]
    probe = Probe.of(trace) if opts.exploration else None
    metrics = METRICS if probe is not None else ()
    for m in metrics:
        out += [Task(f"{m.name} {a}-{b}", m.name, metric_part,
                     (m, probe, (a, b), opts))
                for a, b in m.parts(probe, opts, tasks)]
    return Graph(tuple(out), plan, probe, metrics, opts)


class StageProgress:
    """Reports a :class:`~ntrace.progress.Progress` per stage as its tasks finish."""

    def __init__(self, tasks: Sequence[Task], progress: OnProgress) -> None:
        self.progress = progress
        self.total: dict[str, int] = {}
        for t in tasks:
            self.total[t.stage] = self.total.get(t.stage, 0) + 1
        self.done = dict.fromkeys(self.total, 0)
        for stage, total in self.total.items():
            progress(Progress(stage, 0, total))

    def finished(self, task: Task) -> None:
        self.done[task.stage] += 1
        self.progress(Progress(task.stage, self.done[task.stage], self.total[task.stage]))


def run_here(trace: Trace, graph: Graph, progress: OnProgress) -> list[Any]:
    """The synchronous scheduler: every task of ``graph`` in this process, in order, on the
    open ``trace``; their results in task order."""
    stages = StageProgress(graph.tasks, progress)
    results = []
    for task in graph.tasks:
        results.append(task(trace))
        stages.finished(task)
    return results
