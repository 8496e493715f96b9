"""``nn.Embedding``: ``a = W[x]`` for each index, neurons first; W is (vocabulary, n) and
neuron j owns column j (one entry per vocabulary item). torch returns (batch, *index, n)."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ntrace.errors import UnsupportedModelError
from ntrace.format.metadata import Geometry
from ntrace.ops.base import LayerOp


class Embedding(LayerOp):
    name: ClassVar[str] = "embedding"
    label: ClassVar[str] = "Embedding"
    modules = (nn.Embedding,)
    neuron_last: ClassVar[bool] = True

    @classmethod
    def measure(cls, name: str, module: nn.Module, x: torch.Tensor, a: torch.Tensor
                ) -> Geometry:
        if module.max_norm is not None or module.padding_idx is not None:
            raise UnsupportedModelError(
                f"module {name} (Embedding) uses max_norm or padding_idx, which make it "
                "non-linear in its weights or mask their gradient; remove them to trace it")
        return Geometry(tuple(x.shape[1:]), (a.shape[-1], *a.shape[1:-1]),
                        tuple(cls.weight(module).shape))

    @property
    def in_features(self) -> int:
        return self.weight_shape[0]  # the vocabulary

    def rows(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.transpose(-1, -2)

    def unrows(self, rows: torch.Tensor) -> torch.Tensor:
        return rows.T

    def op(self, x: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
        return F.embedding(x, V).movedim(-1, 1)

    def design(self, x: torch.Tensor, jac: torch.Tensor, neurons: torch.Tensor) -> torch.Tensor:
        k, o, c = jac.shape[:3]
        idx = x.reshape(k, 1, 1, -1).expand(k, o, c, -1)
        out = jac.new_zeros(k, o, c, self.weight_shape[0])
        return out.scatter_add_(3, idx, jac.reshape(k, o, c, -1))
