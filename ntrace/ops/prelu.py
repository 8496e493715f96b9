"""``nn.PReLU``: a LeakyReLU whose slopes (1 shared or one per neuron) are trained; they are
recorded each Taylor round in the layer's ``slope`` array."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ntrace.format.metadata import Activation
from ntrace.ops.base import ActivationOp, arg


class PReLU(ActivationOp):
    name: ClassVar[str] = "prelu"
    label: ClassVar[str] = "PReLU"
    notes: ClassVar[str] = "its trained slopes are recorded every Taylor round"
    modules = (nn.PReLU,)
    functions = (F.prelu,)  # torch.prelu
    grad_nodes = ("Prelu",)

    @classmethod
    def as_module(cls, func: Callable[..., Any], args: tuple[Any, ...],
                  kwargs: dict[str, Any]) -> nn.Module:
        weight = arg(args, kwargs, 1, "weight", None)
        module = nn.PReLU(int(weight.numel()))
        del module.weight
        module.weight = weight  # the caller's tensor: its slopes as they are trained
        return module

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
