"""``nn.Dropout`` (and 1/2/3-d): the state of an input unit is 1 where it was kept. In eval
mode dropout is the identity and nothing is recorded; extra forwards of the recorder replay the
training call's mask (:meth:`Dropout.replay`) or run with dropout off (:func:`dropout_off`)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ntrace.ops.base import Op, StateOp, arg


class Dropout(StateOp):
    name: ClassVar[str] = "dropout"
    label: ClassVar[str] = "Dropout"
    notes: ClassVar[str] = ("keep masks recorded, replayed in the Jacobian forward, off in probe "
                            "snapshots")
    modules = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
    functions = (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d)

    @classmethod
    def as_module(cls, func: Callable[..., Any], args: tuple[Any, ...],
                  kwargs: dict[str, Any]) -> nn.Module:
        return dropout_module(cls, func, args, kwargs, training=True)

    @classmethod
    def active(cls, module: nn.Module) -> bool:
        return module.training

    @classmethod
    def states(cls, module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (y != 0) | (x == 0)

    @classmethod
    def replay(cls, module: nn.Module, x: torch.Tensor, y: torch.Tensor
               ) -> Callable[..., torch.Tensor] | None:
        x, y = x.detach(), y.detach()
        # the exact 1/(1-p) on kept units, not y/x: under autocast that ratio is rounded
        scale = 1.0 / (1.0 - module.p) if module.p < 1 else 0.0
        kept = (x != 0) & (y != 0)
        keep_scale = kept.to(torch.promote_types(x.dtype, torch.float32)) * scale

        def hook(mod: nn.Module, a: Any, o: torch.Tensor) -> torch.Tensor:
            return a[0] * keep_scale

        return hook


def dropout_module(op: type[Op], func: Callable[..., Any], args: tuple[Any, ...],
                   kwargs: dict[str, Any], training: bool) -> nn.Module:
    """The module of a dropout-like call ``func(input, p, training)``: ``op``'s module at the
    position of ``func`` in its functions, in the call's mode (default ``training``)."""
    module = op.modules[op.functions.index(func)](float(arg(args, kwargs, 1, "p", 0.5)))
    return module.train(bool(arg(args, kwargs, 2, "training", training)))


@contextlib.contextmanager
def dropout_off(model: nn.Module) -> Iterator[None]:
    """Dropout modules in eval mode (identity) and the RNG untouched, for extra forwards."""
    drops = [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)
             and m.training]
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and any(
        p.is_cuda for p in model.parameters()) else []
    with torch.random.fork_rng(devices=devices):
        for m in drops:
            m.training = False
        try:
            yield
        finally:
            for m in drops:
                m.training = True
