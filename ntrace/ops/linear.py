"""``nn.Linear``: ``a = x Wᵀ + b`` on (batch, features) inputs; W is (n, in_features).

The design is rank one, ``M = g xᵀ``, and the analyzer keeps it factored. The only layer kind
of a chain trace: its pullback ``J W`` drives the fast Jacobian recursion.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ntrace.errors import UnsupportedModelError
from ntrace.format.metadata import Geometry
from ntrace.ops.base import LayerOp


class Linear(LayerOp):
    name: ClassVar[str] = "linear"
    label: ClassVar[str] = "Linear"
    modules = (nn.Linear,)
    rank_one: ClassVar[bool] = True
    chain: ClassVar[bool] = True
    stores_geometry: ClassVar[bool] = False

    @classmethod
    def measure(cls, name: str, module: nn.Module, x: torch.Tensor, a: torch.Tensor
                ) -> Geometry:
        if x.ndim != 2:
            raise UnsupportedModelError(
                f"module {name} (Linear) gets inputs of shape {tuple(x.shape)}; format 1.1 "
                "traces Linear layers on (batch, features) inputs only: flatten first")
        return Geometry((x.shape[1],), (a.shape[1],), tuple(cls.weight(module).shape))

    def op(self, x: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
        return F.linear(x, V)

    def design(self, x: torch.Tensor, jac: torch.Tensor, neurons: torch.Tensor) -> torch.Tensor:
        return jac.unsqueeze(-1) * x[:, None, None, :]

    @staticmethod
    def pull(J: torch.Tensor | None, W: torch.Tensor) -> torch.Tensor:
        return W.unsqueeze(0) if J is None else torch.matmul(J, W)
