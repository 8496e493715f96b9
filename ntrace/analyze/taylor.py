"""Taylor losses evaluated directly from the stored factors (spec section 8).

``T_s = f_s + Σ_l J_{l,s} Δa_{l,s}[tracked]`` with ``Δa = (V − W) x_s + (c − b)``; the
Taylor loss of round t is the mean over recorded samples of ℓ(T_s, y_s). These functions
work on one round at a time, are differentiable in the candidate parameters (torch
autograd), and serve as the reference that the accumulated statistics are tested against.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ntrace.analyze.plan import LayerPlan
from ntrace.analyze.source import DTYPE, RoundBlock, TaylorSource
from ntrace.errors import UsageError
from ntrace.format.reader import Trace


def sample_loss(loss_id: str, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """ℓ per sample (spec section 4) over the last axis of ``out``: mse = mean squared error
    over outputs, cross_entropy = logsumexp(f) − f_y."""
    if loss_id == "mse":
        return (out - target).pow(2).mean(dim=-1)
    picked = torch.gather(out, -1, target.unsqueeze(-1)).squeeze(-1)
    return torch.logsumexp(out, dim=-1) - picked


def taylor_outputs(block: RoundBlock, deltas: Mapping[str, torch.Tensor],
                   plans: Mapping[str, LayerPlan]) -> torch.Tensor:
    """``T`` (b, s, o) for per-layer augmented weight displacements ``deltas`` (b, j, i)."""
    out = block.output
    for name, delta in deltas.items():
        lb = block.layers[name]
        da = torch.einsum("bji,bsi->bsj", delta, lb.x)  # Δa (b, s, j)
        if lb.jac is None:
            out = out + da
        else:
            tracked = torch.as_tensor(plans[name].tracked, device=da.device)
            out = out + torch.einsum("bsoc,bsc->bso", lb.jac, da[..., tracked])
    return out


def _augmented(lp: LayerPlan, V: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
    if tuple(V.shape) != (lp.out_features, lp.in_features):
        raise UsageError(f"layer {lp.name}: V must have shape ({lp.out_features}, "
                         f"{lp.in_features}), found {tuple(V.shape)}")
    if not lp.bias:
        if c is not None:
            raise UsageError(f"layer {lp.name} has no bias; pass c=None")
        return V.to(DTYPE)
    if c is None or tuple(c.shape) != (lp.out_features,):
        raise UsageError(f"layer {lp.name}: c must have shape ({lp.out_features},)")
    return torch.cat([V.to(DTYPE), c.to(DTYPE)[:, None]], dim=1)


def taylor_loss(trace: Trace, t: int,
                params: Mapping[str, tuple[torch.Tensor, torch.Tensor | None]]) -> torch.Tensor:
    """TL of Taylor round ``t`` when the layers named in ``params`` take weights ``V`` and
    bias ``c`` (others stay at the recorded iterate): layer scale for one layer, network scale
    for all. Differentiable in ``V`` and ``c``; float64 on CPU."""
    from ntrace.analyze.options import AnalysisOptions
    from ntrace.analyze.plan import make_plan

    if not 0 <= t < trace.taylor_rounds:
        raise UsageError(f"Taylor round {t} is out of range: the trace has "
                         f"{trace.taylor_rounds} committed Taylor rounds")
    names = tuple(params)
    plan = make_plan(trace, AnalysisOptions(layers=names or None, scales=("neuron",)))
    plans = {lp.name: lp for lp in plan.layers}
    src = TaylorSource(trace, list(plans.values()), torch.device("cpu"), 1 << 30)
    block = src.read_block(t, t + 1)
    deltas = {}
    for name, (V, c) in params.items():
        lp = plans[name]
        deltas[name] = (_augmented(lp, V, c) - block.layers[name].w[0])[None]
    out = taylor_outputs(block, deltas, plans)
    return sample_loss(src.loss, out, block.target).mean(dim=-1)[0]


def neuron_taylor_loss(trace: Trace, t: int, layer: str, neuron: int, v: torch.Tensor,
                       c: torch.Tensor | None = None) -> torch.Tensor:
    """TL of round ``t`` when only row ``neuron`` of ``layer`` varies (neuron scale)."""
    if layer not in trace.layers:
        raise UsageError(f"layer {layer!r} does not exist; layers: {', '.join(trace.layers)}")
    la = trace.layers[layer]
    if not 0 <= neuron < la.out_features:
        raise UsageError(f"neuron {neuron} does not exist in layer {layer!r} "
                         f"({la.out_features} neurons)")
    src_w = trace.read(f"layers/{layer}/weight", t).astype("float64")
    V = torch.as_tensor(src_w).clone()
    V = torch.cat([V[:neuron], v.to(DTYPE)[None], V[neuron + 1:]])
    cb = None
    if la.bias:
        cb = torch.as_tensor(trace.read(f"layers/{layer}/bias", t).astype("float64"))
        if c is None:
            raise UsageError(f"layer {layer} has a bias; pass c")
        cb = torch.cat([cb[:neuron], c.to(DTYPE).reshape(1), cb[neuron + 1:]])
    return taylor_loss(trace, t, {layer: (V, cb)})
