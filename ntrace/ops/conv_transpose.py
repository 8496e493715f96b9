"""``nn.ConvTranspose1d/2d/3d``: ``a = conv_transpose(x, W) + b``; W is (C_in, n/g, *kernel).
Neuron j (group G = j // (n/g)) owns ``W[G's input channels, j mod (n/g)]``, its row ordered
(input channel, kernel offset)."""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ntrace.ops.conv import Conv, by_group, im2col


class ConvTranspose(Conv):
    """Recognised and measured like a convolution; its own layout and map."""

    name: ClassVar[str] = "conv_transpose"
    label: ClassVar[str] = "ConvTranspose1d/2d/3d"
    notes: ClassVar[str] = "stride, padding, output padding, dilation, groups"
    modules = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)

    @property
    def _split(self) -> tuple[int, int, int, tuple[int, ...]]:
        g = self.geometry.groups
        return g, self.weight_shape[0] // g, self.weight_shape[1], self.weight_shape[2:]

    def rows(self, weight: torch.Tensor) -> torch.Tensor:
        g, cg, ng, ker = self._split
        lead = weight.shape[:weight.ndim - len(self.weight_shape)]
        w = weight.reshape(*lead, g, cg, ng, math.prod(ker))
        w = w.transpose(-3, -2)  # (..., g, ng, cg, K)
        return w.reshape(*lead, g * ng, cg * math.prod(ker))

    def unrows(self, rows: torch.Tensor) -> torch.Tensor:
        g, cg, ng, ker = self._split
        w = rows.reshape(g, ng, cg, math.prod(ker)).transpose(1, 2)
        return w.reshape(self.weight_shape)

    def op(self, x: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
        g = self.geometry
        conv = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[
            len(self.weight_shape) - 3]
        return conv(x, V, None, g.stride, g.padding, g.output_padding, g.groups, g.dilation)

    def design(self, x: torch.Tensor, jac: torch.Tensor, neurons: torch.Tensor) -> torch.Tensor:
        # ⟨J, convT(x, V)⟩ = ⟨conv(J, V), x⟩: the row of neuron j pairs input channel i of its
        # group at input position p with J's unfolded patch of channel j around p
        g, cg, ng, ker = self._split
        geo = self.geometry
        k, o, c = jac.shape[:3]
        P = im2col(jac.reshape(k * o, c, *self.positions), ker, geo.stride, geo.padding,
                   geo.dilation)  # (k·o, c, K, p_in)
        P = P.reshape(k, o, c, P.shape[2], P.shape[3])
        X = x.reshape(k, g, cg, -1)  # (k, group, i, p_in)
        out = by_group(jac.new_empty(k, o, c, cg, P.shape[3]), neurons, ng,
                       lambda sel, G: torch.einsum("kocmp,kip->kocim", P[:, :, sel], X[:, G]))
        return out.reshape(k, o, c, -1)
