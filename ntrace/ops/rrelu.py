"""``nn.RReLU`` in eval mode: a LeakyReLU with the fixed slope ``(lower + upper)/2``, written as
``leaky_relu`` (so it adds nothing to the format and may form a chain). In training mode its
negative slopes are drawn at random in every forward, which no trace describes: the
``unsupported`` policy decides."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch.nn.functional as F
from torch import nn

from ntrace.format.metadata import Activation
from ntrace.ops.base import arg
from ntrace.ops.leaky_relu import LeakyReLU


class RReLU(LeakyReLU):
    label: ClassVar[str] = "RReLU (eval)"
    notes: ClassVar[str] = ("eval mode records as LeakyReLU with slope (lower + upper)/2; training "
                            "mode refused (slopes drawn at random)")
    modules = (nn.RReLU,)
    functions = (F.rrelu, F.rrelu_)
    grad_nodes = ("RreluWithNoise",)

    @classmethod
    def as_module(cls, func: Callable[..., Any], args: tuple[Any, ...],
                  kwargs: dict[str, Any]) -> nn.Module:
        module = nn.RReLU(float(arg(args, kwargs, 1, "lower", 1.0 / 8)),
                          float(arg(args, kwargs, 2, "upper", 1.0 / 3)))
        return module.train(bool(arg(args, kwargs, 3, "training", False)))

    @classmethod
    def unsupported(cls, name: str, module: nn.Module) -> str | None:
        if not module.training:
            return None
        fix = ("pass training=False" if "()" in name else f"call model.{name}.eval()")
        return (f"{'call' if '()' in name else 'module'} {name} (RReLU) is in training mode, "
                "where its negative slopes are drawn at random in every forward and cannot be "
                f"recorded (nor Jacobians through it replayed); {fix} to give it the fixed "
                "slope (lower + upper)/2, or use nn.LeakyReLU")

    @classmethod
    def describe(cls, module: nn.Module) -> Activation:
        return Activation(cls.name, (float(module.lower) + float(module.upper)) / 2)  # type: ignore[arg-type]
