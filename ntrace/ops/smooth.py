"""Smooth nonlinearities (GELU, SiLU, tanh, sigmoid, softplus, ELU, softmax…): no states, and
the Jacobians through them are exact by autograd. A tracked layer whose output one of them
takes directly gets the activation kind ``smooth`` with the function's name (format 1.3), so
the trace says which units have states; elsewhere they pass through. Not a chain activation:
a model with one records as a graph."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ntrace.format.metadata import Activation
from ntrace.ops.base import ActivationOp, function_name

# module type → the function name written in the trace (torch.nn.functional's)
MODULES: dict[type[nn.Module], str] = {
    nn.GELU: "gelu", nn.SiLU: "silu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid",
    nn.Softplus: "softplus", nn.ELU: "elu", nn.CELU: "celu", nn.SELU: "selu", nn.Mish: "mish",
    nn.Hardswish: "hardswish", nn.Hardsigmoid: "hardsigmoid", nn.LogSigmoid: "log_sigmoid",
    nn.Softsign: "softsign", nn.Tanhshrink: "tanhshrink", nn.GLU: "glu",
    nn.Softmax: "softmax", nn.LogSoftmax: "log_softmax", nn.Softmin: "softmin",
    nn.Softmax2d: "softmax",
}
# activation modules of Hugging Face transformers' ``transformers.activations`` (parameter-free,
# smooth), matched by qualified class name (the library is never imported)
MODULE_NAMES: dict[str, str] = {
    "GELUActivation": "gelu", "NewGELUActivation": "gelu_tanh", "GELUTanh": "gelu_tanh",
    "PytorchGELUTanh": "gelu_tanh", "FastGELUActivation": "gelu_tanh",
    "AccurateGELUActivation": "gelu_tanh", "QuickGELUActivation": "quick_gelu",
    "SiLUActivation": "silu", "MishActivation": "mish", "GELUActivation1": "gelu",
}


class SmoothCall(nn.Module):
    """Stands for a functional call of a smooth function (``F.gelu``): only its name is
    recorded."""

    function: str = ""


class Smooth(ActivationOp):
    name: ClassVar[str] = "smooth"
    label: ClassVar[str] = ("GELU, SiLU, Tanh, Sigmoid, Softplus, ELU, CELU, SELU, Mish, "
                            "Hardswish, Hardsigmoid, LogSigmoid, Softsign, Softmax, LogSoftmax")
    recorded: ClassVar[str] = ("no states (after a tracked layer: activation `smooth` with the "
                               "function's name); exact Jacobians")
    modules = (*MODULES, SmoothCall)
    module_names = tuple(f"transformers.activations.{n}" for n in MODULE_NAMES)
    functions = (F.gelu, F.silu, F.tanh, torch.tanh, torch.Tensor.tanh, F.sigmoid,
                 torch.sigmoid, torch.Tensor.sigmoid, F.softplus, F.elu, F.celu, F.selu,
                 torch.selu, F.mish, F.hardswish, F.hardsigmoid, F.logsigmoid, F.softsign,
                 F.tanhshrink, F.glu, F.softmax, torch.softmax, torch.Tensor.softmax,
                 F.log_softmax, torch.log_softmax, torch.Tensor.log_softmax, F.softmin)

    @classmethod
    def as_module(cls, func: Callable[..., Any], args: tuple[Any, ...],
                  kwargs: dict[str, Any]) -> nn.Module:
        module = SmoothCall()
        module.function = function_name(func)
        return module

    @classmethod
    def describe(cls, module: nn.Module) -> Activation:
        fn = (getattr(module, "function", None) or MODULES.get(type(module))
              or MODULE_NAMES[type(module).__name__])
        return Activation(cls.name, function=fn)

    @classmethod
    def slope(cls, act: Activation, a: torch.Tensor, param: torch.Tensor | None = None
              ) -> torch.Tensor:
        raise NotImplementedError("smooth activations have no recorded slope: Jacobians "
                                  "through them are taken by autograd")
