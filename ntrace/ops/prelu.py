"""``nn.PReLU``: a LeakyReLU whose slopes (1 shared or one per neuron) are trained; they are
recorded each Taylor round in the layer's ``slope`` array."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from ntrace.format.metadata import Activation
from ntrace.ops.base import ActivationOp


class PReLU(ActivationOp):
    name: ClassVar[str] = "prelu"
    label: ClassVar[str] = "PReLU"
    modules = (nn.PReLU,)
    grad_nodes = ("Prelu",)

    @classmethod
    def describe(cls, module: nn.Module) -> Activation:
        return Activation(cls.name, num_parameters=int(module.num_parameters))  # type: ignore[arg-type]

    @classmethod
    def slope(cls, act: Activation, a: torch.Tensor, param: torch.Tensor | None = None
              ) -> torch.Tensor:
        assert param is not None, "PReLU's slope needs its recorded parameters"
        w = param.reshape(1, -1, *([1] * (a.ndim - 2))) if param.numel() > 1 \
            else param.reshape(())
        return torch.where(a > 0, torch.ones_like(a), w.expand_as(a).to(a.dtype))

    @classmethod
    def parameter(cls, module: nn.Module) -> torch.Tensor | None:
        return module.weight.detach()  # type: ignore[operator]
