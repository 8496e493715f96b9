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

    @classmethod
    def of(cls, op: type[ActivationOp], act: Activation, x: torch.Tensor) -> torch.Tensor:
        """The states of the activation ``op`` (attributes ``act``) at its input ``x``."""
        return op.states(act, x)[0]

    @classmethod
    def states(cls, module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise TypeError("an activation module's states need its op: use ActivationStates.of")
