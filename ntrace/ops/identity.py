"""The ``identity`` activation: a layer whose output no activation module takes directly (or
one ntrace does not see). No states are recorded; its slope is 1."""

from __future__ import annotations

from typing import ClassVar

import torch

from ntrace.format.metadata import Activation
from ntrace.ops.base import ActivationOp


class Identity(ActivationOp):
    name: ClassVar[str] = "identity"
    chain: ClassVar[bool] = True

    @classmethod
    def slope(cls, act: Activation, a: torch.Tensor, param: torch.Tensor | None = None
              ) -> torch.Tensor:
        return torch.ones_like(a)
