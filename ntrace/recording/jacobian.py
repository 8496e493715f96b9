"""Output Jacobians ``J_l = ∂f/∂a_l`` of every tracked layer, for a batch of samples.

Index convention: ``b`` sample, ``o`` network output, ``n`` neuron of the layer, ``i`` its
input. The fast path is the backward recursion of a chain,

    J_L = diag(d_L),  J_l = J_{l+1} W_{l+1} diag(d_l),

with ``d_l`` the activation slopes at ``a_l`` (each activation op's ``slope``) and
``J_{l+1} W_{l+1}`` the layer op's ``pull``: Σ_l p·n_{l+1}·n_l multiply-adds per sample.
When the output layer has no activation J_L is the identity and is never formed.
``jacobians_autograd`` is an independent reference (torch.func forward mode) for tests.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from ntrace import ops
from ntrace.format.metadata import Activation


def _slope(act: Activation, a: torch.Tensor) -> torch.Tensor:
    return ops.activation_op(act).slope(act, a)


def jacobians_recursive(weights: Sequence[torch.Tensor], activations: Sequence[Activation],
                        pre: Sequence[torch.Tensor],
                        layers: Sequence[ops.LayerOp] | None = None) -> list[torch.Tensor | None]:
    """J_l for each layer of a chain; ``weights[l]`` is (n_l, n_{l-1}) and ``pre[l]`` the
    pre-activations (b, n_l); ``layers`` the layer ops (default: linear, the chain's kind).
    Returns (b, o, n_l) tensors, ``None`` for an identity J_L."""
    L = len(weights)
    pulls = [ops.LAYERS["linear"].pull] * L if layers is None else [la.pull for la in layers]
    out: list[torch.Tensor | None] = [None] * L
    last = activations[-1]
    if last.kind == "identity":
        J: torch.Tensor | None = None  # identity, never materialised
    else:
        J = torch.diag_embed(_slope(last, pre[-1]))  # (b, o, o)
        out[-1] = J
    for layer in range(L - 2, -1, -1):
        d = _slope(activations[layer], pre[layer])  # (b, n_l)
        J = pulls[layer + 1](J, weights[layer + 1]) * d.unsqueeze(1)  # (b, o, n_l): J W diag(d)
        out[layer] = J
    return out


def jacobians_autograd(model: nn.Module, layers: Sequence[nn.Module], x: torch.Tensor,
                       mode: str = "forward") -> list[torch.Tensor]:
    """Reference J_l = ∂f/∂a_l computed by torch.func on a perturbation added to each layer's
    output, one sample at a time (slow; for tests). ``mode`` is 'forward' or 'reverse'."""
    import torch.func as tf

    results: list[torch.Tensor] = []
    for k, layer in enumerate(layers):
        with torch.no_grad():
            width = layer(torch.zeros(1, layer.in_features, dtype=x.dtype)).shape[-1]  # type: ignore[attr-defined]
        per_sample = []
        for b in range(x.shape[0]):
            xb = x[b:b + 1]

            def f(delta: torch.Tensor, xb: torch.Tensor = xb, layer: nn.Module = layer
                  ) -> torch.Tensor:
                handle = layer.register_forward_hook(lambda m, a, out: out + delta)
                try:
                    return model(xb)[0]
                finally:
                    handle.remove()

            zero = torch.zeros(width, dtype=x.dtype)
            jac: Callable[..., torch.Tensor] = tf.jacfwd(f) if mode == "forward" else tf.jacrev(f)
            per_sample.append(jac(zero).detach())
        results.append(torch.stack(per_sample))
        del k
    return results
