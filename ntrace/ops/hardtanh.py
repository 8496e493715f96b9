"""``nn.Hardtanh`` and ``nn.ReLU6`` (hardtanh(0, 6)): ``clamp(a, min_val, max_val)``. Three
pieces: state ``a > min_val`` and, in ``mask_high``, ``a >= max_val``; slope 1 strictly
inside, 0 at and beyond the bounds (torch)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ntrace.format.metadata import Activation
from ntrace.ops.base import ActivationOp, arg


class Hardtanh(ActivationOp):
    name: ClassVar[str] = "hardtanh"
    label: ClassVar[str] = "Hardtanh, ReLU6"
    notes: ClassVar[str] = "two kinks: the upper state is recorded too"
    modules = (nn.Hardtanh, nn.ReLU6)
    functions = (F.hardtanh, F.hardtanh_, F.relu6)
    grad_nodes = ("Hardtanh",)

    @classmethod
    def as_module(cls, func: Callable[..., Any], args: tuple[Any, ...],
                  kwargs: dict[str, Any]) -> nn.Module:
        if func is F.relu6:
            return nn.ReLU6()
        return nn.Hardtanh(float(arg(args, kwargs, 1, "min_val", -1.0)),
                           float(arg(args, kwargs, 2, "max_val", 1.0)))

    @classmethod
    def describe(cls, module: nn.Module) -> Activation:
        return Activation(cls.name, min_val=float(module.min_val),  # type: ignore[arg-type]
                          max_val=float(module.max_val))  # type: ignore[arg-type]

    @classmethod
    def slope(cls, act: Activation, a: torch.Tensor, param: torch.Tensor | None = None
              ) -> torch.Tensor:
        inside = (a > float(act.min_val)) & (a < float(act.max_val))  # type: ignore[arg-type]
        return inside.to(a.dtype)

    @classmethod
    def states(cls, act: Activation, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return a > act.threshold, a >= float(act.max_val)  # type: ignore[arg-type]
