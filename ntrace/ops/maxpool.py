"""``nn.MaxPool1d/2d/3d``: the state of an input element is 1 where it is the maximum its
window returned (torch's argmax choice on ties)."""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ntrace.ops.base import StateOp


def winners(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """1 where an element of ``x`` (batch, C, *spatial) won its window, bool, shaped like x."""
    pool = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[x.ndim - 2]
    _, idx = pool(x, module.kernel_size, module.stride, module.padding,  # type: ignore[arg-type]
                  module.dilation, ceil_mode=module.ceil_mode,  # type: ignore[arg-type]
                  return_indices=True)
    flat = torch.zeros(x.shape[0], x.shape[1], math.prod(x.shape[2:]), dtype=torch.bool,
                       device=x.device)
    flat.scatter_(2, idx.flatten(2), True)
    return flat.reshape(x.shape)


class MaxPool(StateOp):
    name: ClassVar[str] = "maxpool"
    label: ClassVar[str] = "MaxPool1d/2d/3d"
    modules = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
    grad_nodes = ("MaxPool",)

    @classmethod
    def states(cls, module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return winners(module, x)
