"""Modules with nothing to record: Jacobians pass through them by autograd. BatchNorm in eval
mode; in training mode each sample's output depends on the whole batch, so it is refused unless
the recorder holds the batch statistics fixed (:mod:`ntrace.recording.batchnorm`), which it
allows for the discovery of the model's structure with :func:`training_batchnorm_allowed`."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from typing import ClassVar

from torch import nn

from ntrace.errors import UnsupportedModelError
from ntrace.ops.base import PassthroughOp

_TRAINING_ALLOWED: ContextVar[bool] = ContextVar("ntrace_training_batchnorm", default=False)


class Passthrough(PassthroughOp):
    label: ClassVar[str] = "AvgPool, LayerNorm, Flatten, Identity"
    modules = (nn.Identity, nn.Flatten, nn.Unflatten, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
               nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.LayerNorm,
               nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d)


class BatchNorm(PassthroughOp):
    label: ClassVar[str] = "BatchNorm (eval), BatchNorm (training: --batchnorm fixed-stats)"
    recorded: ClassVar[str] = "eval mode: nothing to record, exact Jacobians"
    notes: ClassVar[str] = ("training mode couples the batch: refused, or approximate with "
                            "`--batchnorm fixed-stats` (batch statistics held fixed; the gradient "
                            "error is measured and stored every Taylor round)")
    modules = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

    @classmethod
    def check(cls, name: str, module: nn.Module) -> None:
        if module.training and not _TRAINING_ALLOWED.get():
            raise UnsupportedModelError(training_refusal(name, module))


def training_refusal(name: str, module: nn.Module) -> str:
    """Why a BatchNorm in training mode is refused, and the opt-in that records it."""
    return (f"module {name} ({type(module).__name__}) is in training mode, where each "
            "sample's output depends on the whole batch and per-sample Jacobians are "
            "undefined; record it with the batch statistics held fixed, an approximation whose "
            "gradient error is measured and stored (CLI: --batchnorm fixed-stats; API: "
            f"batchnorm='fixed_stats'), or call model.{name}.eval()")


@contextlib.contextmanager
def training_batchnorm_allowed(allowed: bool = True) -> Iterator[None]:
    """Within the block, BatchNorm in training mode passes :meth:`BatchNorm.check`."""
    token = _TRAINING_ALLOWED.set(allowed)
    try:
        yield
    finally:
        _TRAINING_ALLOWED.reset(token)
