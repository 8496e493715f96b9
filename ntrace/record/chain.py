"""Finding the chain of tracked layers by watching one forward pass.

Forward hooks on every leaf module log ``(module, input, output)`` for the current call of
the root model. Format 1.0 traces chains: each module consumes exactly the tensor the
previous module produced (checked by identity), which catches functional activations and
branches that hooks cannot see. Anything else is refused with a message naming the module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ntrace.errors import UnsupportedModelError
from ntrace.format.metadata import Activation
from ntrace.record import handlers


@dataclass
class Call:
    name: str
    module: nn.Module
    input: torch.Tensor
    output: torch.Tensor


@dataclass
class ChainLayer:
    """One tracked layer: its module, handler and the activation that follows it."""

    name: str
    module: nn.Module
    handler: handlers.LinearHandler
    activation: Activation
    call_index: int  # position of the layer's call in the logged forward


@dataclass
class CallLog:
    """Calls of leaf modules during the latest forward of the root model."""

    calls: list[Call] = field(default_factory=list)
    output: Any = None
    active: bool = False


class Watcher:
    """Installs the hooks and keeps the log of the latest captured forward."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.log = CallLog()
        self.capture = True
        self._names = {m: n for n, m in model.named_modules()}
        self._handles = [model.register_forward_pre_hook(self._pre_root),
                         model.register_forward_hook(self._post_root)]
        for _name, m in model.named_modules():
            if m is not model and not any(True for _ in m.children()):
                self._handles.append(m.register_forward_hook(self._leaf))

    def _pre_root(self, module: nn.Module, args: Any) -> None:
        self.log = CallLog(active=self.capture)

    def _post_root(self, module: nn.Module, args: Any, output: Any) -> None:
        if self.log.active:
            self.log.output = output
            self.log.active = False

    def _leaf(self, module: nn.Module, args: Any, output: Any) -> None:
        if not self.log.active:
            return
        x = args[0] if args else None
        self.log.calls.append(Call(self._names.get(module, "?"), module, x, output))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def _describe(call: Call) -> str:
    return f"{call.name} ({type(call.module).__name__})"


def discover(log: CallLog, model: nn.Module) -> list[ChainLayer]:
    """Turn one logged forward into the list of tracked layers, or explain why not."""
    calls = log.calls
    if not calls:
        raise UnsupportedModelError(
            "no module calls were seen in the model's forward: call model(x) before "
            "recorder.step(), and build the model from nn.Module layers (nn.Linear, nn.ReLU)"
        )
    hint = ("use nn.ReLU/nn.LeakyReLU modules instead of functional calls, or record through "
            "the Python API with a model built as a chain of supported modules")
    seen: set[int] = set()
    layers: list[ChainLayer] = []
    for i, c in enumerate(calls):
        if id(c.module) in seen:
            raise UnsupportedModelError(f"module {_describe(c)} is called twice in one forward; "
                                        "weight sharing is not supported by format 1.0")
        seen.add(id(c.module))
        if i > 0 and c.input is not calls[i - 1].output:
            raise UnsupportedModelError(
                f"the input of {_describe(c)} is not the output of {_describe(calls[i - 1])}: "
                "the model computes something between them that ntrace cannot see; " + hint
            )
        h = handlers.handler_for(c.module)
        if h is not None:
            layers.append(ChainLayer(c.name, c.module, h, Activation("identity"), i))
            continue
        act = handlers.ACTIVATIONS.get(type(c.module))
        if act is not None:
            prev = calls[i - 1] if i > 0 else None
            if not layers or prev is None or prev.module is not layers[-1].module:
                raise UnsupportedModelError(
                    f"activation {_describe(c)} does not directly follow a tracked layer; "
                    "format 1.0 expects Linear → activation → Linear chains"
                )
            layers[-1].activation = act(c.module)
            continue
        if isinstance(c.module, handlers.PASSTHROUGH):
            continue
        if isinstance(c.module, handlers.INPUT_ONLY) and not layers:
            continue
        supported = ", ".join(sorted(t.__name__ for t in (*handlers.LAYERS, *handlers.ACTIVATIONS,
                                                           *handlers.PASSTHROUGH)))
        raise UnsupportedModelError(
            f"module {_describe(c)} is not supported by the recorder (supported: {supported}); "
            "remove it from the traced model or wait for format support"
        )
    if not layers:
        raise UnsupportedModelError("the model has no nn.Linear layer to trace")
    if log.output is not calls[-1].output:
        raise UnsupportedModelError(
            f"the model's output is not the output of its last module {_describe(calls[-1])}: "
            "the forward computes something after it that ntrace cannot see; " + hint
        )
    return layers
