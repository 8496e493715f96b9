"""``nn.RReLU`` in eval mode: a LeakyReLU with the fixed slope ``(lower + upper)/2``, written as
``leaky_relu`` (so it adds nothing to the format and may form a chain). In training mode its
negative slopes are drawn at random in every forward, which no trace describes: the
``unsupported`` policy decides."""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from ntrace.format.metadata import Activation
from ntrace.ops.leaky_relu import LeakyReLU


class RReLU(LeakyReLU):
    label: ClassVar[str] = "RReLU (eval)"
    modules = (nn.RReLU,)
    grad_nodes = ("RreluWithNoise",)

    @classmethod
    def unsupported(cls, name: str, module: nn.Module) -> str | None:
        if not module.training:
            return None
        return (f"module {name} (RReLU) is in training mode, where its negative slopes are "
                "drawn at random in every forward and cannot be recorded (nor Jacobians through "
                f"it replayed); call model.{name}.eval() to give it the fixed slope "
                "(lower + upper)/2, or use nn.LeakyReLU")

    @classmethod
    def describe(cls, module: nn.Module) -> Activation:
        return Activation(cls.name, (float(module.lower) + float(module.upper)) / 2)  # type: ignore[arg-type]
