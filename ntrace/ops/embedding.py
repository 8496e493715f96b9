"""``nn.Embedding``: ``a = W[x]`` for each index, neurons first; W is (vocabulary, n) and
neuron j owns column j (one entry per vocabulary item). torch returns (batch, *index, n).

With ``padding_idx`` (format 1.3) the row ``W[padding_idx]`` gets no gradient, so it is no
parameter of the Taylor model: a neuron's row is its column without that entry (vocabulary − 1
entries), the displacement there is zero, and the design drops its column.
"""

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
    notes: ClassVar[str] = ("`padding_idx`: the padding row is fixed, not part of V; `max_norm` "
                            "refused (it rescales rows: not linear in the weights)")
    modules = (nn.Embedding,)
    neuron_last: ClassVar[bool] = True

    @classmethod
    def measure(cls, name: str, module: nn.Module, x: torch.Tensor, a: torch.Tensor
                ) -> Geometry:
        if module.max_norm is not None:
            raise UnsupportedModelError(
                f"module {name} (Embedding) uses max_norm, which rescales the looked-up rows "
                "(W[i] ‖W[i]‖⁻¹ max_norm: not linear in the weights) and rewrites the weight in "
                "place during the forward; remove max_norm (or renormalise explicitly after "
                "the optimizer step) to trace it")
        pad = module.padding_idx
        return Geometry(tuple(x.shape[1:]), (a.shape[-1], *a.shape[1:-1]),
                        tuple(cls.weight(module).shape),
                        padding_idx=None if pad is None else int(pad))

    @property
    def in_features(self) -> int:
        return self.weight_shape[0]  # the vocabulary

    @property
    def row_size(self) -> int:
        return self.weight_shape[0] - (self.geometry.padding_idx is not None)

    def _keep(self, device: torch.device) -> torch.Tensor:
        """The vocabulary entries that are parameters (all but ``padding_idx``)."""
        keep = torch.ones(self.weight_shape[0], dtype=torch.bool, device=device)
        keep[self.geometry.padding_idx] = False
        return keep.nonzero().squeeze(1)

    def rows(self, weight: torch.Tensor) -> torch.Tensor:
        rows = weight.transpose(-1, -2)
        if self.geometry.padding_idx is None:
            return rows
        return rows.index_select(-1, self._keep(rows.device))

    def unrows(self, rows: torch.Tensor) -> torch.Tensor:
        """The table with these rows; a fixed padding row comes back as zeros (the
        displacement of a row that does not move)."""
        if self.geometry.padding_idx is None:
            return rows.T
        out = rows.new_zeros(self.weight_shape)
        out[self._keep(rows.device)] = rows.T
        return out

    def op(self, x: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
        return F.embedding(x, V, self.geometry.padding_idx).movedim(-1, 1)

    def design(self, x: torch.Tensor, jac: torch.Tensor, neurons: torch.Tensor) -> torch.Tensor:
        k, o, c = jac.shape[:3]
        idx = x.reshape(k, 1, 1, -1).expand(k, o, c, -1)
        out = jac.new_zeros(k, o, c, self.weight_shape[0])
        out = out.scatter_add_(3, idx, jac.reshape(k, o, c, -1))
        if self.geometry.padding_idx is None:
            return out
        return out.index_select(3, self._keep(out.device))
