"""Modules with nothing to record: Jacobians pass through them by autograd. BatchNorm only in
eval mode: in training mode each sample's output depends on the whole batch."""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from ntrace.errors import UnsupportedModelError
from ntrace.ops.base import PassthroughOp


class Passthrough(PassthroughOp):
    label: ClassVar[str] = "AvgPool, LayerNorm, Flatten, Identity"
    modules = (nn.Identity, nn.Flatten, nn.Unflatten, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
               nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.LayerNorm,
               nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d)


class BatchNorm(PassthroughOp):
    label: ClassVar[str] = "BatchNorm (eval)"
    modules = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

    @classmethod
    def check(cls, name: str, module: nn.Module) -> None:
        if module.training:
            raise UnsupportedModelError(
                f"module {name} ({type(module).__name__}) is in training mode, where each "
                "sample's output depends on the whole batch and per-sample Jacobians are "
                f"undefined; call model.{name}.eval() (or use LayerNorm/GroupNorm)")
