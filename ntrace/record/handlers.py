"""Dispatch tables: which torch modules ntrace understands and what each one means.

Supporting a new module type means one handler and one table entry (BackPACK style).
``LAYERS`` maps parameterised modules linear in their weights to a handler that describes
them; ``ACTIVATIONS`` maps piecewise-linear activations to their slope on ``a <= 0``;
``PASSTHROUGH`` lists modules that change nothing the Taylor expansion needs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ntrace.format.metadata import Activation


@dataclass(frozen=True)
class LinearHandler:
    """``a = W x + b`` with ``W`` of shape (neuron, in_feature)."""

    kind: str = "linear"

    def shape(self, module: nn.Module) -> tuple[int, int, bool]:
        assert isinstance(module, nn.Linear)
        return module.out_features, module.in_features, module.bias is not None

    def weight(self, module: nn.Module) -> torch.Tensor:
        return module.weight  # type: ignore[return-value]

    def bias(self, module: nn.Module) -> torch.Tensor | None:
        return module.bias  # type: ignore[return-value]


LAYERS: dict[type[nn.Module], LinearHandler] = {nn.Linear: LinearHandler()}


def _relu(m: nn.Module) -> Activation:
    return Activation("relu")


def _leaky(m: nn.Module) -> Activation:
    assert isinstance(m, nn.LeakyReLU)
    return Activation("leaky_relu", float(m.negative_slope))


ACTIVATIONS: dict[type[nn.Module], Callable[[nn.Module], Activation]] = {
    nn.ReLU: _relu,
    nn.LeakyReLU: _leaky,
}

PASSTHROUGH: tuple[type[nn.Module], ...] = (nn.Identity,)
# modules allowed only before the first tracked layer (they reshape the input)
INPUT_ONLY: tuple[type[nn.Module], ...] = (nn.Flatten,)


def slope(act: Activation, a: torch.Tensor) -> torch.Tensor:
    """The derivative of the activation at pre-activation ``a`` (torch's subgradient at 0)."""
    if act.kind == "identity":
        return torch.ones_like(a)
    neg = 0.0 if act.kind == "relu" else float(act.negative_slope or 0.0)
    return torch.where(a > 0, torch.ones_like(a), torch.full_like(a, neg))


def handler_for(module: nn.Module) -> LinearHandler | None:
    return LAYERS.get(type(module))
