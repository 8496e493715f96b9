"""``nn.LeakyReLU``: ``a`` for a > 0, ``negative_slope · a`` otherwise; state ``a > 0``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ntrace.format.metadata import Activation
from ntrace.ops.base import ActivationOp, arg


class LeakyReLU(ActivationOp):
    name: ClassVar[str] = "leaky_relu"
    label: ClassVar[str] = "LeakyReLU"
    modules = (nn.LeakyReLU,)
    functions = (F.leaky_relu, F.leaky_relu_)
    grad_nodes = ("LeakyRelu",)
    chain: ClassVar[bool] = True

    @classmethod
    def as_module(cls, func: Callable[..., Any], args: tuple[Any, ...],
                  kwargs: dict[str, Any]) -> nn.Module:
        return nn.LeakyReLU(float(arg(args, kwargs, 1, "negative_slope", 0.01)))

    @classmethod
    def describe(cls, module: nn.Module) -> Activation:
        return Activation(cls.name, float(module.negative_slope))  # type: ignore[arg-type]

    @classmethod
    def slope(cls, act: Activation, a: torch.Tensor, param: torch.Tensor | None = None
              ) -> torch.Tensor:
        return torch.where(a > 0, torch.ones_like(a),
                           torch.full_like(a, float(act.negative_slope or 0.0)))
