"""Piecewise-linear activations (ReLU family) that do not directly follow a tracked layer's
output, after a residual addition or a normalisation say: their states are recorded as a
module of kind ``activation`` (format 1.3), ``state`` = input above the activation's lower
kink. The discovery routes such calls here; the math is the activation op's own."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from ntrace.format.metadata import Activation
from ntrace.ops.base import ActivationOp, StateOp


class ActivationStates(StateOp):
    name: ClassVar[str] = "activation"

    @staticmethod
    def of(module: nn.Module) -> tuple[type[ActivationOp], Activation]:
        """The activation op of ``module`` and its attributes."""
        from ntrace.ops import recognise

        op = recognise(module)
        assert op is not None and issubclass(op, ActivationOp)
        return op, op.describe(module)

    @classmethod
    def states(cls, module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        op, act = cls.of(module)
        return op.states(act, x)[0]
