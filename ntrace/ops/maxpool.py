"""``nn.MaxPool1d/2d/3d``: the state of an input element is 1 where it is the maximum its
window returned (torch's argmax choice on ties)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ntrace.ops.base import StateOp, arg, function_name


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
    notes: ClassVar[str] = "which element won; with or without `return_indices`"
    modules = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
    functions = (F.max_pool1d, F.max_pool2d, F.max_pool3d, F.max_pool1d_with_indices,
                 F.max_pool2d_with_indices, F.max_pool3d_with_indices, torch.max_pool1d,
                 torch.max_pool2d, torch.max_pool3d, torch.max_pool1d_with_indices)

    @classmethod
    def as_module(cls, func: Callable[..., Any], args: tuple[Any, ...],
                  kwargs: dict[str, Any]) -> nn.Module:
        kernel = arg(args, kwargs, 1, "kernel_size", None)
        module = cls.modules[int(function_name(func)[-2]) - 1]  # max_pool{k}d
        stride = arg(args, kwargs, 2, "stride", None)
        return module(kernel, stride if stride not in ((), []) else None,  # torch.max_pool: []
                      arg(args, kwargs, 3, "padding", 0), arg(args, kwargs, 4, "dilation", 1),
                      ceil_mode=bool(arg(args, kwargs, 5, "ceil_mode", False)))
    grad_nodes = ("MaxPool",)

    @classmethod
    def states(cls, module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return winners(module, x)
