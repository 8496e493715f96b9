"""Resolving analysis options against one trace: layers, neurons, scales, checkpoints.

Everything the user can get wrong about a trace (a layer or neuron that does not exist, a
scale the trace cannot support, an empty trace) is refused here, before any array is read.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from ntrace.analyze.options import SCALES, AnalysisOptions, log_checkpoints
from ntrace.errors import EmptyTraceError, UsageError
from ntrace.format.reader import Trace
from ntrace.format.sizes import human_bytes
from ntrace.ops import LayerOp, layer_op


@dataclass(frozen=True)
class LayerPlan:
    """One analysed layer. ``tracked`` are the neurons whose Jacobian columns are stored;
    ``selected`` the positions ``c`` into ``tracked`` analysed at neuron scale; ``stored``
    the positions whose designs the analysis needs (every tracked neuron when the layer is
    solved at layer or network scale, else ``selected``)."""

    name: str
    index: int
    out_features: int
    in_features: int
    bias: bool
    jacobian: str
    tracked: np.ndarray
    selected: np.ndarray
    kind: LayerOp
    stored: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @property
    def d_aug(self) -> int:
        """Parameters of one neuron (its row of the weight, see :mod:`ntrace.ops`)
        plus one for the bias (linear inputs are augmented with a 1)."""
        return self.kind.row_size + int(self.bias)

    @property
    def dense(self) -> bool:
        """True for kinds whose per-neuron design is a full matrix (all but plain linear)."""
        return not self.kind.rank_one

    @property
    def stored_selected(self) -> np.ndarray:
        """Positions of ``selected`` within ``stored``."""
        return np.searchsorted(self.stored, self.selected)

    @property
    def tracked_positions(self) -> np.ndarray:
        return np.arange(len(self.tracked), dtype=np.int64)

    @property
    def all_tracked(self) -> bool:
        return len(self.tracked) == self.out_features

    @property
    def neurons(self) -> np.ndarray:
        """Neuron indices analysed at neuron scale."""
        return self.tracked[self.selected]

    @property
    def dim(self) -> int:
        """Parameters of the layer-scale problem."""
        return self.out_features * self.d_aug


@dataclass(frozen=True)
class AnalysisPlan:
    """What will be computed: layers, scales (with reasons for any left out), checkpoints."""

    layers: tuple[LayerPlan, ...]
    scales: tuple[str, ...]
    layer_scale: tuple[str, ...]  # layers solved at layer scale
    neuron_scale: tuple[str, ...]  # layers whose selected neurons are solved
    skipped: tuple[str, ...]  # human-readable reasons for anything left out
    checkpoints: tuple[int, ...]
    taylor_rounds: int
    loss: str

    @property
    def network_dim(self) -> int:
        return sum(lp.dim for lp in self.layers)


def _pick_layers(trace: Trace, opts: AnalysisOptions) -> list[str]:
    names = list(trace.layers)
    if opts.layers is None:
        return names
    unknown = [n for n in opts.layers if n not in trace.layers]
    if unknown:
        raise UsageError(f"layer {unknown[0]!r} does not exist in {trace.path}; its layers are "
                         f"{', '.join(names)}")
    return [n for n in names if n in opts.layers]


def _pick_neurons(trace: Trace, name: str, opts: AnalysisOptions) -> np.ndarray:
    tracked = np.asarray(trace.tracked[name], dtype=np.int64)
    if opts.neurons is None:
        return np.arange(len(tracked))
    n_out = trace.layers[name].out_features
    pos = []
    for j in opts.neurons:
        if j >= n_out:
            raise UsageError(f"neuron {j} does not exist in layer {name!r}, which has {n_out} "
                             f"neurons (0..{n_out - 1})")
        hit = np.nonzero(tracked == j)[0]
        if not hit.size:
            raise UsageError(f"neuron {j} of layer {name!r} was not tracked when the trace was "
                             f"recorded; tracked neurons: {_short(tracked)}")
        pos.append(int(hit[0]))
    return np.unique(np.asarray(pos, dtype=np.int64))


def _short(a: np.ndarray, k: int = 12) -> str:
    items = ", ".join(str(int(v)) for v in a[:k])
    return items + (", ..." if len(a) > k else "")


def make_plan(trace: Trace, opts: AnalysisOptions) -> AnalysisPlan:
    """Check ``opts`` against ``trace`` and decide what to compute."""
    total = trace.taylor_rounds
    if total == 0:
        raise EmptyTraceError(
            f"{trace.path} holds 0 committed Taylor rounds, so there is nothing to analyse; "
            f"record more rounds (Taylor data is kept every {trace.attrs.sampling.taylor_every} "
            "rounds) or wait for the writer to commit one")
    need = trace.rounds * 8  # the results hold every round's minibatch loss as float64
    if need > opts.max_memory:
        raise UsageError(f"{trace.path} commits {trace.rounds} rounds, whose per-round loss "
                         f"takes {human_bytes(need)}, more than max_memory "
                         f"({human_bytes(opts.max_memory)}); raise --max-memory")
    names = _pick_layers(trace, opts)
    if opts.neurons is not None and len(names) != 1:
        raise UsageError("a neuron index is ambiguous across layers: pass exactly one --layer "
                         f"with --neuron (layers: {', '.join(names)})")
    plans = []
    for name in names:
        la = trace.layers[name]
        plans.append(LayerPlan(name=name, index=la.index, out_features=la.out_features,
                               in_features=la.in_features, bias=la.bias, jacobian=la.jacobian,
                               tracked=np.asarray(trace.tracked[name], dtype=np.int64),
                               selected=_pick_neurons(trace, name, opts), kind=layer_op(la)))
    if opts.scales is not None:
        wanted = opts.scales
    elif opts.neurons is not None:
        wanted = ("neuron",)
    elif opts.layers is not None:
        wanted = ("layer", "neuron")
    else:
        wanted = SCALES
    limit = opts.dim_limit()
    skipped: list[str] = []
    layer_scale: list[str] = []
    neuron_scale: list[str] = []
    if "neuron" in wanted:
        for lp in plans:
            if lp.d_aug > limit:
                skipped.append(f"neuron scale of {lp.name} ({lp.kind.name}): each neuron has "
                               f"{lp.d_aug} parameters, above max_dim {limit} (raise --max-dim, "
                               "preferably on a GPU)")
            else:
                neuron_scale.append(lp.name)
        if not neuron_scale and opts.scales is not None and "neuron" in opts.scales:
            raise UsageError("neuron scale was asked for but no selected layer supports it: "
                             + "; ".join(skipped))
    if "layer" in wanted:
        for lp in plans:
            if not lp.all_tracked:
                skipped.append(f"layer scale of {lp.name}: only {len(lp.tracked)} of "
                               f"{lp.out_features} neurons were tracked (record with "
                               "--neurons all to analyse it)")
            elif lp.dim > limit:
                skipped.append(f"layer scale of {lp.name}: {lp.dim} parameters exceed max_dim "
                               f"{limit} (raise --max-dim, preferably on a GPU)")
            else:
                layer_scale.append(lp.name)
        if not layer_scale and opts.scales is not None:
            raise UsageError("layer scale was asked for but no selected layer supports it: "
                             + "; ".join(skipped))
    scales = [s for s in wanted if (s != "layer" or layer_scale)
              and (s != "neuron" or neuron_scale)]
    if "network" in wanted:
        reason = None
        if opts.layers is not None and len(names) != len(trace.layers):
            reason = "network scale needs every layer; drop --layer"
        elif not all(lp.all_tracked for lp in plans):
            part = [lp.name for lp in plans if not lp.all_tracked]
            reason = ("network scale needs every neuron of every layer tracked, and "
                      f"{', '.join(part)} tracked only some (record with --neurons all)")
        elif sum(lp.dim for lp in plans) > limit:
            reason = (f"network scale: {sum(lp.dim for lp in plans)} parameters exceed max_dim "
                      f"{limit} (raise --max-dim, preferably on a GPU)")
        if reason is not None:
            if opts.scales is not None:
                raise UsageError(reason)
            skipped.append(reason)
            scales.remove("network")
    if isinstance(opts.checkpoints, int):
        cps = log_checkpoints(total, opts.checkpoints)
    else:
        bad = [c for c in opts.checkpoints if c > total]
        if bad:
            raise UsageError(f"checkpoint {bad[0]} exceeds the {total} committed Taylor rounds of "
                             f"{trace.path}")
        cps = tuple(sorted(set(opts.checkpoints)))
    plans = [replace(lp, stored=lp.tracked_positions if ("network" in scales or lp.name in
                                                         layer_scale) else lp.selected)
             for lp in plans]
    return AnalysisPlan(layers=tuple(plans), scales=tuple(scales), layer_scale=tuple(layer_scale),
                        neuron_scale=tuple(neuron_scale),
                        skipped=tuple(skipped), checkpoints=cps, taylor_rounds=max(cps),
                        loss=trace.attrs.loss.id)
