"""Dispatch tables: which torch modules ntrace understands and what each one means.

Supporting a new module type means one handler and one table entry (BackPACK style).
``LAYERS`` maps parameterised modules linear in their weights to a handler that describes
them; ``ACTIVATIONS`` maps piecewise-linear activations to their description; ``STATEFUL``
lists parameter-free modules whose per-sample state is recorded (max-pool winners, dropout
masks); ``PASSTHROUGH`` lists modules that need nothing recorded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ntrace.errors import UnsupportedModelError
from ntrace.format.metadata import Activation, Geometry


def _ints(v: object, k: int) -> tuple[int, ...]:
    return tuple(int(x) for x in v) if isinstance(v, tuple | list) else (int(v),) * k  # type: ignore[call-overload]


@dataclass(frozen=True)
class LayerHandler:
    """Describes one kind of layer: ``a = op(x, W) + b`` with ``op`` linear in ``W``."""

    kind: str

    def geometry(self, name: str, module: nn.Module, x: torch.Tensor,
                 a: torch.Tensor) -> Geometry:
        w = tuple(module.weight.shape)  # type: ignore[union-attr,arg-type]
        if self.kind == "linear":
            if x.ndim != 2:
                raise UnsupportedModelError(
                    f"module {name} (Linear) gets inputs of shape {tuple(x.shape)}; format 1.1 "
                    "traces Linear layers on (batch, features) inputs only: flatten first")
            return Geometry((x.shape[1],), (a.shape[1],), w)
        if self.kind == "embedding":
            assert isinstance(module, nn.Embedding)
            if module.max_norm is not None or module.padding_idx is not None:
                raise UnsupportedModelError(
                    f"module {name} (Embedding) uses max_norm or padding_idx, which make it "
                    "non-linear in its weights or mask their gradient; remove them to trace it")
            # torch gives (batch, *idx, dim); neurons first: (dim, *idx)
            return Geometry(tuple(x.shape[1:]), (a.shape[-1], *a.shape[1:-1]), w)
        assert isinstance(module, nn.modules.conv._ConvNd)
        k = len(module.kernel_size)
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
        return Geometry(tuple(x.shape[1:]), tuple(a.shape[1:]), w,
                        stride=_ints(module.stride, k), padding=_ints(padding, k),
                        dilation=_ints(module.dilation, k),
                        output_padding=_ints(getattr(module, "output_padding", 0), k),
                        groups=int(module.groups))

    def weight(self, module: nn.Module) -> torch.Tensor:
        return module.weight  # type: ignore[return-value]

    def bias(self, module: nn.Module) -> torch.Tensor | None:
        return getattr(module, "bias", None)

    def pre_activation(self, geo: Geometry, x: torch.Tensor, W: torch.Tensor,
                       b: torch.Tensor | None) -> torch.Tensor:
        """``a`` from the stored factors by functional ops (spec 'Reconstruction'), shaped
        (batch, *output_shape); used by tests and by the spec's reference code."""
        if self.kind == "linear":
            return F.linear(x, W, b)
        if self.kind == "embedding":
            a = F.embedding(x, W)  # (batch, *idx, dim)
            a = a.movedim(-1, 1)
            return a if b is None else a + b.reshape(1, -1, *([1] * (a.ndim - 2)))
        k = len(geo.positions)
        ops = {("conv", 1): F.conv1d, ("conv", 2): F.conv2d, ("conv", 3): F.conv3d,
               ("conv_transpose", 1): F.conv_transpose1d,
               ("conv_transpose", 2): F.conv_transpose2d,
               ("conv_transpose", 3): F.conv_transpose3d}
        op = ops[(self.kind, k)]
        if self.kind == "conv":
            return op(x, W, b, geo.stride, geo.padding, geo.dilation, geo.groups)
        return op(x, W, b, geo.stride, geo.padding, geo.output_padding, geo.groups,
                  geo.dilation)


LINEAR, CONV, CONV_T, EMBEDDING = (LayerHandler("linear"), LayerHandler("conv"),
                                   LayerHandler("conv_transpose"), LayerHandler("embedding"))
LAYERS: dict[type[nn.Module], LayerHandler] = {
    nn.Linear: LINEAR,
    nn.Conv1d: CONV, nn.Conv2d: CONV, nn.Conv3d: CONV,
    nn.ConvTranspose1d: CONV_T, nn.ConvTranspose2d: CONV_T, nn.ConvTranspose3d: CONV_T,
    nn.Embedding: EMBEDDING,
}


def _relu(m: nn.Module) -> Activation:
    return Activation("relu")


def _leaky(m: nn.Module) -> Activation:
    assert isinstance(m, nn.LeakyReLU)
    return Activation("leaky_relu", float(m.negative_slope))


def _prelu(m: nn.Module) -> Activation:
    assert isinstance(m, nn.PReLU)
    return Activation("prelu", num_parameters=int(m.num_parameters))


def _hardtanh(m: nn.Module) -> Activation:
    assert isinstance(m, nn.Hardtanh)
    return Activation("hardtanh", min_val=float(m.min_val), max_val=float(m.max_val))


ACTIVATIONS: dict[type[nn.Module], Callable[[nn.Module], Activation]] = {
    nn.ReLU: _relu, nn.LeakyReLU: _leaky, nn.PReLU: _prelu, nn.Hardtanh: _hardtanh,
    nn.ReLU6: _hardtanh,
}

STATEFUL: dict[type[nn.Module], str] = {
    nn.MaxPool1d: "maxpool", nn.MaxPool2d: "maxpool", nn.MaxPool3d: "maxpool",
    nn.Dropout: "dropout", nn.Dropout1d: "dropout", nn.Dropout2d: "dropout",
    nn.Dropout3d: "dropout",
}

PASSTHROUGH: tuple[type[nn.Module], ...] = (
    nn.Identity, nn.Flatten, nn.Unflatten, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.LayerNorm,
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d,
)
# modules whose output couples the samples of a batch in training mode
EVAL_ONLY: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def slope(act: Activation, a: torch.Tensor, prelu_weight: torch.Tensor | None = None
          ) -> torch.Tensor:
    """The derivative of the activation at pre-activation ``a`` (torch's subgradient at the
    kinks: 0 for ReLU at 0, 0 for hardtanh at its bounds)."""
    if act.kind == "identity":
        return torch.ones_like(a)
    if act.kind == "hardtanh":
        inside = (a > float(act.min_val)) & (a < float(act.max_val))  # type: ignore[arg-type]
        return inside.to(a.dtype)
    if act.kind == "prelu":
        assert prelu_weight is not None
        w = prelu_weight.reshape(1, -1, *([1] * (a.ndim - 2))) if prelu_weight.numel() > 1 \
            else prelu_weight.reshape(())
        return torch.where(a > 0, torch.ones_like(a), w.expand_as(a).to(a.dtype))
    neg = 0.0 if act.kind == "relu" else float(act.negative_slope or 0.0)
    return torch.where(a > 0, torch.ones_like(a), torch.full_like(a, neg))


def states(act: Activation, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Activation states (spec 'Packed activations'): ``a > threshold``, and for hardtanh
    also ``a >= max_val`` (the upper piece)."""
    low = a > act.threshold
    high = a >= float(act.max_val) if act.kind == "hardtanh" else None  # type: ignore[arg-type]
    return low, high


def handler_for(module: nn.Module) -> LayerHandler | None:
    return LAYERS.get(type(module))
