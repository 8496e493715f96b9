"""Functional calls of recorded ops (``F.relu``, ``torch.relu_``, ``x.relu()``, ``F.max_pool2d``,
``F.dropout``, ``F.gelu``…), seen in every call form by a ``TorchFunctionMode`` that is pushed
only for the forwards the recorder captures (Taylor rounds, probe snapshots) and for its own
extra forwards: other rounds pay nothing.

A call made inside the forward of a leaf module is that module's business (``nn.ReLU`` calls
``F.relu``) and is not logged. Every other call of a function in the op registry is logged
like a module call, under a name derived from the enclosing module's path, the function and a
counter, deterministic across forwards: ``relu()`` for the first ``F.relu`` in the root's
forward, ``layer1.0.relu()@1`` for the second one in ``layer1.0``'s (``@k``, as for a module
called again). In an extra forward a call may be replaced by a function of its input (a
dropout call replays its training mask, or is the identity for probe snapshots).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn.modules import module as module_hooks
from torch.overrides import TorchFunctionMode

from ntrace import ops
from ntrace.ops.base import function_name

# (name, equivalent module, input, output, per_sample): what a logged call reports
OnCall = Callable[[str, nn.Module, torch.Tensor, Any, bool], None]
Replacement = Callable[[torch.Tensor], torch.Tensor]


def _op(func: Any) -> type[ops.Op] | None:
    try:
        return ops.FUNCTIONS.get(func)
    except TypeError:  # an unhashable callable
        return None


def _inplace(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    flag = args[3] if len(args) > 3 and isinstance(args[3], bool) else False  # F.dropout*
    return bool(kwargs.get("inplace", flag)) or getattr(func, "__name__", "").endswith("_")


class FunctionalCalls(TorchFunctionMode):
    """Logs (or replaces) the registry's functional calls made outside leaf modules."""

    def __init__(self, names: dict[nn.Module, str], leaves: set[int], on_call: OnCall) -> None:
        super().__init__()
        self.names = names
        self.leaves = leaves
        self.on_call = on_call
        self.replace: dict[str, Replacement] = {}
        self.stack: list[nn.Module] = []
        self.counts: dict[str, int] = {}
        self.batch: int | None = None
        self._hooks: list[Any] = []

    # -- lifecycle: one forward of the root model -----------------------------------------
    def start(self, batch: int | None) -> None:
        self.stop()  # a forward that raised left it pushed
        self.stack, self.counts, self.batch = [], {}, batch
        self._hooks = [module_hooks.register_module_forward_pre_hook(self._enter),
                       module_hooks.register_module_forward_hook(self._exit)]
        self.__enter__()

    def stop(self) -> None:
        if not self._hooks:
            return
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self.__exit__(None, None, None)

    def _enter(self, module: nn.Module, args: Any) -> None:
        if module in self.names:
            self.stack.append(module)

    def _exit(self, module: nn.Module, args: Any, output: Any) -> None:
        if self.stack and self.stack[-1] is module:
            self.stack.pop()

    # -- calls ----------------------------------------------------------------------------
    def name(self, func: Any) -> str:
        prefix = self.names[self.stack[-1]] if self.stack else ""
        base = f"{prefix}.{function_name(func)}()" if prefix else f"{function_name(func)}()"
        k = self.counts.get(base, 0)
        self.counts[base] = k + 1
        return base if k == 0 else f"{base}@{k}"

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        op = _op(func)
        if (op is None or not args or not isinstance(args[0], torch.Tensor)
                or (self.stack and id(self.stack[-1]) in self.leaves)):
            return func(*args, **kwargs)
        x = args[0]
        name = self.name(func)
        module = op.as_module(func, args, kwargs)
        replacement = self.replace.get(name)
        logged = x
        if replacement is not None:
            out = replacement(x)
        else:
            if op.role == ops.STATE and _inplace(func, args, kwargs):
                logged = x.detach().clone()  # the input as it was (dropout states need it)
            out = func(*args, **kwargs)
        per_sample = self.batch is None or (x.ndim > 0 and x.shape[0] == self.batch)
        self.on_call(name, module, logged, out, per_sample)
        return out
