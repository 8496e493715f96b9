"""``nn.Conv1d/2d/3d``: ``a = conv(x, W) + b`` with stride, padding, dilation and groups;
W is (n, C/g, *kernel) and neuron (output channel) j owns the filter ``W[j]``."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ntrace.errors import UnsupportedModelError
from ntrace.format.metadata import Geometry
from ntrace.ops.base import LayerOp


def _ints(v: object, k: int) -> tuple[int, ...]:
    return tuple(int(x) for x in v) if isinstance(v, tuple | list) else (int(v),) * k  # type: ignore[call-overload]


def im2col(x: torch.Tensor, kernel: tuple[int, ...], stride: tuple[int, ...],
           padding: tuple[int, ...], dilation: tuple[int, ...]) -> torch.Tensor:
    """Unfolded input of a convolution with 1, 2 or 3 spatial axes: (k, C, *sp) →
    (k, C, K, Q), K = prod(kernel) kernel offsets, Q output positions (C order both). A
    convolution of each channel with the K unit kernels (``F.unfold`` exists for 2-d only)."""
    k, C = x.shape[:2]
    K = math.prod(kernel)
    eye = torch.eye(K, dtype=x.dtype, device=x.device).reshape(K, 1, *kernel)
    conv = (F.conv1d, F.conv2d, F.conv3d)[len(kernel) - 1]
    cols = conv(x.reshape(k * C, 1, *x.shape[2:]), eye, None, stride, padding, dilation)
    return cols.reshape(k, C, K, -1)


def by_group(out: torch.Tensor, neurons: torch.Tensor, per_group: int,
             part: Callable[[torch.Tensor, int], torch.Tensor]) -> torch.Tensor:
    """Fill ``out[:, :, sel]`` with ``part(sel, G)`` for the tracked neurons ``sel`` of each
    group ``G`` (``per_group`` neurons a group)."""
    grp = neurons // per_group
    for G in torch.unique(grp).tolist():
        sel = (grp == G).nonzero().squeeze(1)
        out[:, :, sel] = part(sel, G)
    return out


class Conv(LayerOp):
    name: ClassVar[str] = "conv"
    label: ClassVar[str] = "Conv1d/2d/3d"
    notes: ClassVar[str] = "stride, padding, dilation, groups"
    modules = (nn.Conv1d, nn.Conv2d, nn.Conv3d)

    @classmethod
    def measure(cls, name: str, module: nn.Module, x: torch.Tensor, a: torch.Tensor
                ) -> Geometry:
        """Also for transposed convolutions (``_ConvNd``)."""
        k = len(module.kernel_size)  # type: ignore[arg-type]
        if module.padding_mode != "zeros":
            raise UnsupportedModelError(f"module {name}: padding_mode {module.padding_mode!r} is "
                                        "not supported; use padding_mode='zeros'")
        padding = module.padding
        if isinstance(padding, str):
            if padding == "valid":
                padding = (0,) * k
            else:  # 'same': symmetric only
                total = [d * (s - 1) for d, s in zip(_ints(module.dilation, k),
                                                     _ints(module.kernel_size, k), strict=True)]
                if any(t % 2 for t in total):
                    raise UnsupportedModelError(
                        f"module {name}: padding='same' with an even receptive field pads "
                        "asymmetrically; pass explicit padding instead")
                padding = tuple(t // 2 for t in total)
        return Geometry(tuple(x.shape[1:]), tuple(a.shape[1:]), tuple(module.weight.shape),
                        stride=_ints(module.stride, k), padding=_ints(padding, k),
                        dilation=_ints(module.dilation, k),
                        output_padding=_ints(getattr(module, "output_padding", 0), k),
                        groups=int(module.groups))  # type: ignore[arg-type]

    def op(self, x: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
        g = self.geometry
        conv = (F.conv1d, F.conv2d, F.conv3d)[len(self.weight_shape) - 3]
        return conv(x, V, None, g.stride, g.padding, g.dilation, g.groups)

    def design(self, x: torch.Tensor, jac: torch.Tensor, neurons: torch.Tensor) -> torch.Tensor:
        k, o, c = jac.shape[:3]
        geo = self.geometry
        U = im2col(x, self.weight_shape[2:], geo.stride, geo.padding, geo.dilation)
        g, cg = geo.groups, self.weight_shape[1]
        U = U.reshape(k, g, cg * U.shape[2], U.shape[3])  # (k, group, row, q)
        J = jac.reshape(k, o, c, -1)
        if g == 1:
            return torch.einsum("kocq,kiq->koci", J, U[:, 0])
        return by_group(J.new_empty(k, o, c, U.shape[2]), neurons, self.neurons // g,
                        lambda sel, G: torch.einsum("kocq,kiq->koci", J[:, :, sel], U[:, G]))
