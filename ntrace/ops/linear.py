"""``nn.Linear``: ``a = x Wᵀ + b``; W is (n, in_features).

On (batch, features) inputs (:class:`Linear`) the design is rank one, ``M = g xᵀ``, and the
analyzer keeps it factored; the only layer kind of a chain trace: its pullback ``J W`` drives
the fast Jacobian recursion. On (batch, *positions, features) inputs (format 1.3,
:class:`PositionalLinear`) it is a 1×1 convolution over the position axes: the same weights at
every position, neurons first like a convolution's, and the design a sum over positions,
``M = Σ_q g_q x_qᵀ`` (no longer rank one: the analyzer uses the general design).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ntrace.errors import UnsupportedModelError
from ntrace.format.metadata import Geometry, LayerAttrs
from ntrace.ops.base import LayerOp


class Linear(LayerOp):
    name: ClassVar[str] = "linear"
    label: ClassVar[str] = "Linear"
    notes: ClassVar[str] = ("on `(batch, features)`, or on `(batch, *positions, features)` like a "
                            "1×1 convolution")
    modules = (nn.Linear,)
    rank_one: ClassVar[bool] = True
    chain: ClassVar[bool] = True
    stores_geometry: ClassVar[bool] = False

    @classmethod
    def measure(cls, name: str, module: nn.Module, x: torch.Tensor, a: torch.Tensor
                ) -> Geometry:
        if x.ndim < 2:
            raise UnsupportedModelError(
                f"module {name} (Linear) gets an input of shape {tuple(x.shape)} without a "
                "batch axis; call the model on (batch, *positions, features) inputs")
        return Geometry(tuple(x.shape[1:]), (a.shape[-1], *a.shape[1:-1]),
                        tuple(cls.weight(module).shape))

    @classmethod
    def from_call(cls, name: str, module: nn.Module, x: torch.Tensor, a: torch.Tensor
                  ) -> LayerOp:
        return cls.bind(cls.measure(name, module, x, a))

    @classmethod
    def from_attrs(cls, la: LayerAttrs) -> LayerOp:
        return cls.bind(la.shape)

    @staticmethod
    def bind(geometry: Geometry) -> LayerOp:
        """The plain op on (batch, features) inputs, the positional one otherwise."""
        return (PositionalLinear if geometry.positions else Linear)(geometry)

    def op(self, x: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
        return F.linear(x, V)

    def design(self, x: torch.Tensor, jac: torch.Tensor, neurons: torch.Tensor) -> torch.Tensor:
        return jac.unsqueeze(-1) * x[:, None, None, :]

    @staticmethod
    def pull(J: torch.Tensor | None, W: torch.Tensor) -> torch.Tensor:
        return W.unsqueeze(0) if J is None else torch.matmul(J, W)


class PositionalLinear(Linear):
    """``nn.Linear`` on (batch, *positions, features): input (*positions, features), output
    neurons first (n, *positions); its geometry is stored (format 1.3)."""

    rank_one: ClassVar[bool] = False
    chain: ClassVar[bool] = False
    neuron_last: ClassVar[bool] = True
    stores_geometry: ClassVar[bool] = True

    @property
    def in_features(self) -> int:
        return self.weight_shape[1]

    def op(self, x: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
        return F.linear(x, V).movedim(-1, 1)

    def design(self, x: torch.Tensor, jac: torch.Tensor, neurons: torch.Tensor) -> torch.Tensor:
        k, o, c = jac.shape[:3]
        return torch.einsum("kocq,kqi->koci", jac.reshape(k, o, c, -1),
                            x.reshape(k, -1, self.in_features))


class _Transposed:
    """Mixin: the module stores its weight (in_features, n)."""

    @staticmethod
    def weight(module: nn.Module) -> torch.Tensor:
        return module.weight.t()  # type: ignore[union-attr,operator]


class _TransposedPlain(_Transposed, Linear):
    pass


class _TransposedPositional(_Transposed, PositionalLinear):
    pass


class TransposedLinear(_Transposed, Linear):
    """Hugging Face ``transformers``' ``Conv1D`` (GPT-2's projections): ``a = x W + b`` with W
    stored (in_features, n), which is a Linear of weight Wᵀ; recorded as kind ``linear``
    with Wᵀ, so that a trace does not tell them apart."""

    label: ClassVar[str] = ""  # not a torch module: the lists of messages name torch's
    modules = ()
    module_names = ("transformers.pytorch_utils.Conv1D",)

    @staticmethod
    def bind(geometry: Geometry) -> LayerOp:
        return (_TransposedPositional if geometry.positions else _TransposedPlain)(geometry)
