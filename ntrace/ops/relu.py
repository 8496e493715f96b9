"""``nn.ReLU``: ``max(a, 0)``; state ``a > 0``, slope 1 above and 0 at and below 0 (torch)."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ntrace.format.metadata import Activation
from ntrace.ops.base import ActivationOp


class ReLU(ActivationOp):
    name: ClassVar[str] = "relu"
    label: ClassVar[str] = "ReLU"
    modules = (nn.ReLU,)
    functions = (F.relu, F.relu_, torch.relu, torch.relu_, torch.Tensor.relu,
                 torch.Tensor.relu_)
    grad_nodes = ("Relu", "Threshold")
    chain: ClassVar[bool] = True

    @classmethod
    def slope(cls, act: Activation, a: torch.Tensor, param: torch.Tensor | None = None
              ) -> torch.Tensor:
        return torch.where(a > 0, torch.ones_like(a), torch.zeros_like(a))
