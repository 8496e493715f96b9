"""Output Jacobians ``J_l = ∂f/∂a_l`` of tracked layers in any model, by autograd.

Index convention: ``s`` recorded sample, ``o`` network output, ``c`` tracked neuron (channel),
``*q`` output positions of the layer. A zero perturbation ``δ_l`` is added to each tracked
layer's output by a forward hook in one extra forward of the recorded samples, so that
``∂f/∂δ_l = J_l`` exactly, whatever the graph between the layers (pooling, residuals, norms in
eval mode, replayed dropout masks, functional ops). Layers whose output holds the neuron
axis last (``nn.Embedding``: sample, *index, neuron) are named in ``neuron_last``; their
Jacobians are returned neurons-first like every other layer's.

- *reverse mode*: one backward per output unit, batched (``is_grads_batched``) in chunks that
  fit ``max_bytes``; one pass serves every reverse-mode layer.
- *forward mode*: one ``torch.func.jvp`` per tracked unit (neuron × position), vmapped in
  chunks (one by one where an op has no batching rule, like reverse mode); cheaper when a
  layer has fewer tracked units than the network has outputs.
Samples are independent (no batch-coupled modules), so one pass covers all samples at once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

Forward = Callable[[], torch.Tensor]


def choose_modes(p: int, tracked_units: dict[str, int]) -> dict[str, str]:
    """Forward mode where a layer has fewer tracked units (neurons × positions) than the
    network has outputs, reverse mode otherwise."""
    return {name: ("forward" if units < p else "reverse") for name, units in tracked_units.items()}


def _with_hooks(modules: Sequence[nn.Module], hook: Callable[..., Any]) -> list[Any]:
    return [m.register_forward_hook(hook) for m in modules]


def jacobians_reverse(run: Forward, layers: dict[str, nn.Module], tracked: dict[str, torch.Tensor],
                      max_bytes: int, neuron_last: frozenset[str] = frozenset()
                      ) -> dict[str, torch.Tensor]:
    """J for every layer in ``layers`` (name → module) by batched vector–Jacobian products.

    ``run()`` performs the forward of the recorded samples and returns f of shape (s, p).
    Returns name → (s, p, tracked, *positions)."""
    deltas: dict[nn.Module, torch.Tensor] = {}

    def add_delta(m: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
        d = torch.zeros_like(out, requires_grad=True)
        deltas[m] = d
        return out + d

    handles = _with_hooks(list(layers.values()), add_delta)
    try:
        with torch.enable_grad():
            f = run()
    finally:
        for h in handles:
            h.remove()
    s, p = f.shape
    names = list(layers)
    inputs = [deltas[layers[n]] for n in names]
    per_unit = 4 * sum(d.numel() for d in inputs) * 3  # gradients and intermediates, float32
    chunk = int(max(1, min(p, max_bytes // max(per_unit, 1))))
    first = {n: (deltas[layers[n]].movedim(-1, 1) if n in neuron_last else deltas[layers[n]])
             for n in names}  # neurons-first views, for the shapes
    out = {n: torch.empty((s, p, len(tracked[n]), *first[n].shape[2:]),
                          dtype=f.dtype, device=f.device) for n in names}
    for o0 in range(0, p, chunk):
        c = min(chunk, p - o0)
        E = torch.zeros((c, s, p), dtype=f.dtype, device=f.device)
        E[torch.arange(c), :, o0 + torch.arange(c)] = 1
        grads = _batched_grad(f, inputs, E)
        for n, g in zip(names, grads, strict=True):  # g: (c, s, neuron, *q)
            if n in neuron_last:  # (c, s, *q, neuron) as the module returns it
                g = g.movedim(-1, 2)
            out[n][:, o0:o0 + c] = g.index_select(2, tracked[n]).transpose(0, 1)
    return out


def _batched_grad(f: torch.Tensor, inputs: list[torch.Tensor], E: torch.Tensor
                  ) -> list[torch.Tensor]:
    try:
        grads = torch.autograd.grad(f, inputs, E, retain_graph=True, is_grads_batched=True,
                                    allow_unused=True)
    except RuntimeError:  # an op without a batching rule: one unit at a time
        per = [torch.autograd.grad(f, inputs, e, retain_graph=True, allow_unused=True)
               for e in E]
        grads = tuple(torch.stack([g[i] if g[i] is not None else torch.zeros_like(x)
                                   for g in per]) for i, x in enumerate(inputs))
    return [g if g is not None else torch.zeros((E.shape[0], *x.shape), dtype=x.dtype,
                                                device=x.device)
            for g, x in zip(grads, inputs, strict=True)]


def jacobian_forward(run: Forward, layer: nn.Module, tracked: torch.Tensor, s: int,
                     out_shape: Sequence[int], max_bytes: int, neuron_last: bool = False
                     ) -> torch.Tensor:
    """J of one layer by forward-mode products along each tracked unit, (s, p, tracked, *q).

    ``out_shape`` is neurons-first, (neuron, *q); with ``neuron_last`` the module returns
    (s, *q, neuron) and the perturbation is laid out that way."""
    import torch.func as tf

    delta: list[torch.Tensor] = []

    def add(m: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
        return out + delta[0]

    n, *q = out_shape
    positions = math.prod(q)
    units = len(tracked) * positions
    handle = layer.register_forward_hook(add)
    dtype = next(layer.parameters()).dtype
    try:
        native = (*q, n) if neuron_last else (n, *q)
        zero = torch.zeros((s, *native), device=tracked.device, dtype=dtype)

        def f(d: torch.Tensor) -> torch.Tensor:
            delta[:] = [d]
            try:
                return run()
            finally:
                delta.clear()

        def column(t: torch.Tensor) -> torch.Tensor:
            return tf.jvp(f, (zero,), (t,))[1]

        p_out = None
        cols: list[torch.Tensor] = []
        per_unit = 4 * s * (n * positions) * 4
        chunk = int(max(1, min(units, max_bytes // max(per_unit, 1))))
        for u0 in range(0, units, chunk):
            u = torch.arange(u0, min(units, u0 + chunk), device=tracked.device)
            tangents = torch.zeros((len(u), s, n * positions), device=tracked.device, dtype=dtype)
            flat = tracked[u // positions] * positions + u % positions
            tangents[torch.arange(len(u)), :, flat] = 1
            t = tangents.reshape(len(u), s, *out_shape)
            if neuron_last:
                t = t.movedim(2, -1)
            try:
                res = tf.vmap(column)(t)  # (u, s, p)
            except RuntimeError:  # an op without a batching rule: one unit at a time
                res = torch.stack([column(ti) for ti in t])
            p_out = res.shape[-1]
            cols.append(res)
    finally:
        handle.remove()
    J = torch.cat(cols).reshape(len(tracked), positions, s, p_out)  # type: ignore[arg-type]
    return J.permute(2, 3, 0, 1).reshape(s, p_out, len(tracked), *q)  # type: ignore[arg-type]
