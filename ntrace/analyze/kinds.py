"""Layer kinds (spec 3.2 and 8): each kind's linear map ``op(x, V)`` and what the analyzer
needs from it, one small class per kind and one table entry (``KINDS``).

Every kind exposes a neuron's parameters as one flat vector (its *row*; for a convolution the
filter of one output channel, flattened in C order, for an embedding one column of the table)
plus a trailing bias entry when the layer has a bias: the layer's *augmented* parameters are
``(n, d_aug)`` neuron-major, the layout every solver, domain and result uses. For a tracked
neuron ``j = tracked[c]`` the Taylor term of sample s is linear in that row,
``Σ_q J_s[:, c, q] Δa_s[j, q] = M_s[c] (u_j − w_j)`` with the *design* ``M_s[c]`` (p × d_aug):
``M_s[c][o, :] = Σ_q J_s[o, c, q] ∂a[j, q]/∂u_j`` (the bias entry is ``Σ_q J_s[o, c, q]``).
Index letters: ``k`` sample (round × sample flattened), ``o`` output unit, ``c`` tracked
neuron, ``q`` output position, ``i`` entry of a neuron's row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ntrace.format.metadata import LayerAttrs


def _prod(shape: tuple[int, ...]) -> int:
    return int(math.prod(shape))


@dataclass(frozen=True)
class LayerKind:
    """The linear map of one layer kind, bound to one layer's geometry."""

    weight_shape: tuple[int, ...]
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]  # (n, *positions)
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    output_padding: tuple[int, ...] = ()
    groups: int = 1

    name = "linear"
    rank_one = False  # True only for linear layers: M_s[c] = g_s xᵀ (kept factored)

    @property
    def neurons(self) -> int:
        return self.output_shape[0]

    @property
    def positions(self) -> tuple[int, ...]:
        return self.output_shape[1:]

    @property
    def row_size(self) -> int:
        """Parameters of one neuron, bias excluded."""
        return _prod(self.weight_shape) // self.neurons

    # -- layout -------------------------------------------------------------------------
    def rows(self, weight: torch.Tensor) -> torch.Tensor:
        """(..., *weight_shape) → (..., n, row_size): each neuron's parameters."""
        lead = weight.shape[:weight.ndim - len(self.weight_shape)]
        return weight.reshape(*lead, self.neurons, -1)

    def unrows(self, rows: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`rows` for one layer: (n, row_size) → weight_shape."""
        return rows.reshape(self.weight_shape)

    # -- the map ------------------------------------------------------------------------
    def op(self, x: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
        """``op(x, V)`` without bias: (k, *input_shape) → (k, n, *positions)."""
        return F.linear(x, V)

    def design(self, x: torch.Tensor, jac: torch.Tensor, neurons: torch.Tensor) -> torch.Tensor:
        """``M[k, o, c, :]`` without the bias entry for neurons ``neurons`` (c,), given their
        Jacobian columns ``jac`` (k, o, c, *positions): (k, o, c, row_size)."""
        return jac.unsqueeze(-1) * x[:, None, None, :]


def _im2col(x: torch.Tensor, kernel: tuple[int, ...], stride: tuple[int, ...],
            padding: tuple[int, ...], dilation: tuple[int, ...]) -> torch.Tensor:
    """Unfolded input of a convolution with 1, 2 or 3 spatial axes: (k, C, *sp) →
    (k, C, K, Q), K = prod(kernel) kernel offsets, Q output positions (C order both). A
    convolution of each channel with the K unit kernels (``F.unfold`` exists for 2-d only)."""
    k, C = x.shape[:2]
    K = _prod(kernel)
    eye = torch.eye(K, dtype=x.dtype, device=x.device).reshape(K, 1, *kernel)
    conv = (F.conv1d, F.conv2d, F.conv3d)[len(kernel) - 1]
    cols = conv(x.reshape(k * C, 1, *x.shape[2:]), eye, None, stride, padding, dilation)
    return cols.reshape(k, C, K, -1)


@dataclass(frozen=True)
class Conv(LayerKind):
    """``F.conv{k}d(x, V, None, stride, padding, dilation, groups)``; V is (n, C/g, *kernel)."""

    name = "conv"

    def op(self, x: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
        conv = (F.conv1d, F.conv2d, F.conv3d)[len(self.weight_shape) - 3]
        return conv(x, V, None, self.stride, self.padding, self.dilation, self.groups)

    def design(self, x: torch.Tensor, jac: torch.Tensor, neurons: torch.Tensor) -> torch.Tensor:
        k, o, c = jac.shape[:3]
        U = _im2col(x, self.weight_shape[2:], self.stride, self.padding, self.dilation)
        g, cg, ng = self.groups, self.weight_shape[1], self.neurons // self.groups
        U = U.reshape(k, g, cg * U.shape[2], U.shape[3])  # (k, group, row, q)
        J = jac.reshape(k, o, c, -1)
        if g == 1:
            return torch.einsum("kocq,kiq->koci", J, U[:, 0])
        out = J.new_empty(k, o, c, U.shape[2])
        grp = neurons // ng
        for G in torch.unique(grp).tolist():
            sel = (grp == G).nonzero().squeeze(1)
            out[:, :, sel] = torch.einsum("kocq,kiq->koci", J[:, :, sel], U[:, G])
        return out


@dataclass(frozen=True)
class ConvTranspose(LayerKind):
    """``F.conv_transpose{k}d(x, V, None, stride, padding, output_padding, groups, dilation)``;
    V is (C_in, n/g, *kernel). Neuron j (group G = j // (n/g)) owns ``V[G's input channels,
    j mod (n/g)]``, its row ordered (input channel, kernel offset)."""

    name = "conv_transpose"

    @property
    def _split(self) -> tuple[int, int, int, tuple[int, ...]]:
        g = self.groups
        return g, self.weight_shape[0] // g, self.weight_shape[1], self.weight_shape[2:]

    def rows(self, weight: torch.Tensor) -> torch.Tensor:
        g, cg, ng, ker = self._split
        lead = weight.shape[:weight.ndim - len(self.weight_shape)]
        w = weight.reshape(*lead, g, cg, ng, _prod(ker))
        w = w.transpose(-3, -2)  # (..., g, ng, cg, K)
        return w.reshape(*lead, g * ng, cg * _prod(ker))

    def unrows(self, rows: torch.Tensor) -> torch.Tensor:
        g, cg, ng, ker = self._split
        w = rows.reshape(g, ng, cg, _prod(ker)).transpose(1, 2)
        return w.reshape(self.weight_shape)

    def op(self, x: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
        conv = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[
            len(self.weight_shape) - 3]
        return conv(x, V, None, self.stride, self.padding, self.output_padding, self.groups,
                    self.dilation)

    def design(self, x: torch.Tensor, jac: torch.Tensor, neurons: torch.Tensor) -> torch.Tensor:
        # ⟨J, convT(x, V)⟩ = ⟨conv(J, V), x⟩: the row of neuron j pairs input channel i of its
        # group at input position p with J's unfolded patch of channel j around p
        g, cg, ng, ker = self._split
        k, o, c = jac.shape[:3]
        P = _im2col(jac.reshape(k * o, c, *self.positions), ker, self.stride, self.padding,
                    self.dilation)  # (k·o, c, K, p_in)
        P = P.reshape(k, o, c, P.shape[2], P.shape[3])
        X = x.reshape(k, g, cg, -1)  # (k, group, i, p_in)
        out = jac.new_empty(k, o, c, cg, P.shape[3])
        grp = neurons // ng
        for G in torch.unique(grp).tolist():
            sel = (grp == G).nonzero().squeeze(1)
            out[:, :, sel] = torch.einsum("kocmp,kip->kocim", P[:, :, sel], X[:, G])
        return out.reshape(k, o, c, -1)


@dataclass(frozen=True)
class Embedding(LayerKind):
    """Rows ``V[x_q]`` for each index, neurons first; V is (vocabulary, n), neuron j owns
    column j (one entry per vocabulary item)."""

    name = "embedding"

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


@dataclass(frozen=True)
class Linear(LayerKind):
    """``F.linear(x, V)``; V is (n, in_features). The design is rank one, M = g xᵀ, and the
    linear-layer code keeps it factored."""

    name = "linear"
    rank_one = True


KINDS: dict[str, type[LayerKind]] = {
    "linear": Linear,
    "conv": Conv,
    "conv_transpose": ConvTranspose,
    "embedding": Embedding,
}


def layer_kind(la: LayerAttrs) -> LayerKind:
    """The kind of layer ``la`` bound to its geometry."""
    g = la.shape
    cls = KINDS[la.kind]  # the format reader admits only these kinds
    return cls(weight_shape=g.weight_shape, input_shape=g.input_shape,
               output_shape=g.output_shape, stride=g.stride, padding=g.padding,
               dilation=g.dilation, output_padding=g.output_padding, groups=g.groups)
