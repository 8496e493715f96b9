"""``nn.LeakyReLU``: ``a`` for a > 0, ``negative_slope · a`` otherwise; state ``a > 0``."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from ntrace.format.metadata import Activation
from ntrace.ops.base import ActivationOp


class LeakyReLU(ActivationOp):
    name: ClassVar[str] = "leaky_relu"
    label: ClassVar[str] = "LeakyReLU"
    modules = (nn.LeakyReLU,)
    grad_nodes = ("LeakyRelu",)
    chain: ClassVar[bool] = True

    @classmethod
    def describe(cls, module: nn.Module) -> Activation:
        return Activation(cls.name, float(module.negative_slope))  # type: ignore[arg-type]

    @classmethod
    def slope(cls, act: Activation, a: torch.Tensor, param: torch.Tensor | None = None
              ) -> torch.Tensor:
        return torch.where(a > 0, torch.ones_like(a),
                           torch.full_like(a, float(act.negative_slope or 0.0)))
