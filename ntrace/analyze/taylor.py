"""Taylor losses evaluated directly from the stored factors (spec section 8).

``T_s = f_s + Σ_l J_{l,s} Δa_{l,s}[tracked]`` with ``Δa = op(x_s, V − W) + (c − b)`` (``op``
per layer kind, :mod:`ntrace.ops`); the Taylor loss of round t is the mean over
recorded samples of ℓ(T_s, y_s). These functions apply ``op`` itself (never the designs the
solvers use), work on one round at a time, are differentiable in the candidate parameters
(torch autograd), and serve as the reference that the accumulated statistics are tested
against.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ntrace.analyze.plan import LayerPlan
from ntrace.analyze.source import DTYPE, LayerBlock, RoundBlock, TaylorSource
from ntrace.errors import UsageError
from ntrace.format.reader import Trace
from ntrace.losses import get_loss
from ntrace.ops import layer_op


def _layer_move(lp: LayerPlan, lb: LayerBlock, delta: torch.Tensor) -> torch.Tensor:
    """``Σ_{c,q} J[:, c, q] Δa[tracked[c], q]`` (b, s, o) for augmented row displacements
    ``delta`` (b, j, i) of one layer (spec section 8)."""
    if lp.kind.rank_one:
        da = torch.einsum("bji,bsi->bsj", delta, lb.x)  # Δa (b, s, j)
        if lb.jac is None:
            return da
        tracked = torch.as_tensor(lp.tracked, device=da.device)
        return torch.einsum("bsoc,bsc->bso", lb.jac, da[..., tracked])
    kind = lp.kind
    n_row = kind.row_size
    moves = []
    for r in range(delta.shape[0]):  # each round has its own displacement
        da = kind.affine(lb.x[r], kind.unrows(delta[r, :, :n_row]),
                         delta[r, :, n_row] if lp.bias else None)  # (s, j, *positions)
        if lb.jac is None:
            moves.append(da.reshape(da.shape[0], -1))
            continue
        tracked = torch.as_tensor(lp.tracked, device=da.device)
        J = lb.jac[r].reshape(*lb.jac.shape[1:4], -1)  # (s, o, c, q)
        moves.append(torch.einsum("socq,scq->so", J,
                                  da[:, tracked].reshape(da.shape[0], len(tracked), -1)))
    return torch.stack(moves)


def taylor_outputs(block: RoundBlock, deltas: Mapping[str, torch.Tensor],
                   plans: Mapping[str, LayerPlan]) -> torch.Tensor:
    """``T`` (b, s, o) for per-layer augmented row displacements ``deltas`` (b, j, i)."""
    out = block.output
    for name, delta in deltas.items():
        out = out + _layer_move(plans[name], block.layers[name], delta)
    return out


def _augmented(lp: LayerPlan, V: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
    shape = lp.kind.weight_shape
    if tuple(V.shape) != tuple(shape):
        raise UsageError(f"layer {lp.name}: V must have shape {tuple(shape)} (its weight's), "
                         f"found {tuple(V.shape)}")
    rows = lp.kind.rows(V.to(DTYPE))
    if not lp.bias:
        if c is not None:
            raise UsageError(f"layer {lp.name} has no bias; pass c=None")
        return rows
    if c is None or tuple(c.shape) != (lp.out_features,):
        raise UsageError(f"layer {lp.name}: c must have shape ({lp.out_features},)")
    return torch.cat([rows, c.to(DTYPE)[:, None]], dim=1)


def taylor_loss(trace: Trace, t: int,
                params: Mapping[str, tuple[torch.Tensor, torch.Tensor | None]]) -> torch.Tensor:
    """TL of Taylor round ``t`` when the layers named in ``params`` take weights ``V`` (shaped
    like the layer's weight; an embedding's padding row, no parameter, is ignored) and bias
    ``c`` (others stay at the recorded iterate): layer scale
    for one layer, network scale for all. Differentiable in ``V`` and ``c``; float64 on CPU."""
    from ntrace.analyze.options import AnalysisOptions
    from ntrace.analyze.plan import make_plan

    if not 0 <= t < trace.taylor_rounds:
        raise UsageError(f"Taylor round {t} is out of range: the trace has "
                         f"{trace.taylor_rounds} committed Taylor rounds")
    names = tuple(params)
    plan = make_plan(trace, AnalysisOptions(layers=names or None, scales=("neuron",),
                                            max_dim=1 << 62))
    plans = {lp.name: lp for lp in plan.layers}
    src = TaylorSource(trace, list(plans.values()), torch.device("cpu"), 1 << 30)
    block = src.read_block(t, t + 1)
    deltas = {}
    for name, (V, c) in params.items():
        lp = plans[name]
        deltas[name] = (_augmented(lp, V, c) - block.layers[name].w[0])[None]
    out = taylor_outputs(block, deltas, plans)
    return get_loss(src.loss).loss(out, block.target).mean(dim=-1)[0]


def neuron_taylor_loss(trace: Trace, t: int, layer: str, neuron: int, v: torch.Tensor,
                       c: torch.Tensor | None = None) -> torch.Tensor:
    """TL of round ``t`` when only neuron ``neuron`` of ``layer`` varies (neuron scale): ``v``
    is its row of parameters (``kinds``: the output channel's filter for a convolution, the
    column for an embedding, without the padding entry where one is set; any shape with that
    many entries), ``c`` its bias."""
    if layer not in trace.layers:
        raise UsageError(f"layer {layer!r} does not exist; layers: {', '.join(trace.layers)}")
    la = trace.layers[layer]
    if not 0 <= neuron < la.out_features:
        raise UsageError(f"neuron {neuron} does not exist in layer {layer!r} "
                         f"({la.out_features} neurons)")
    kind = layer_op(la)
    if v.numel() != kind.row_size:
        raise UsageError(f"layer {layer}: a neuron's row has {kind.row_size} parameters, v has "
                         f"{v.numel()}")
    rows = kind.rows(torch.as_tensor(trace.read(f"layers/{layer}/weight", t).astype("float64")))
    rows = torch.cat([rows[:neuron], v.to(DTYPE).reshape(1, -1), rows[neuron + 1:]])
    V = kind.unrows(rows)
    cb = None
    if la.bias:
        cb = torch.as_tensor(trace.read(f"layers/{layer}/bias", t).astype("float64"))
        if c is None:
            raise UsageError(f"layer {layer} has a bias; pass c")
        cb = torch.cat([cb[:neuron], c.to(DTYPE).reshape(1), cb[neuron + 1:]])
    return taylor_loss(trace, t, {layer: (V, cb)})
