"""``nn.Hardtanh`` and ``nn.ReLU6`` (hardtanh(0, 6)): ``clamp(a, min_val, max_val)``. Three
pieces: state ``a > min_val`` and, in ``mask_high``, ``a >= max_val``; slope 1 strictly
inside, 0 at and beyond the bounds (torch)."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from ntrace.format.metadata import Activation
from ntrace.ops.base import ActivationOp


class Hardtanh(ActivationOp):
    name: ClassVar[str] = "hardtanh"
    label: ClassVar[str] = "Hardtanh, ReLU6"
    modules = (nn.Hardtanh, nn.ReLU6)
    grad_nodes = ("Hardtanh",)

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
