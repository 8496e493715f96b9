"""Finding the tracked layers of a model by watching one forward pass.

Forward hooks on every leaf module log ``(module, input, output)`` for the current call of
the root model, and functional calls of registered ops (``F.relu``, ``x.relu_()``,
``F.max_pool2d``…) are logged alike with their equivalent module
(:mod:`ntrace.recording.functional`). ``discover`` recognises each call's op in the registry
(:mod:`ntrace.ops`),
dispatches on its role, and turns the log into a :class:`Structure`: the tracked layers
(modules linear in their weights) in call order, the activation applied directly to each
layer's output, the max-pool and dropout calls whose states are recorded, and whether the
model is a plain *chain* (Linear → ReLU-family → Linear …, the fast Jacobian recursion and
format 1.0's layout) or a general *graph* (Jacobians by autograd).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import ntrace.recording.outputs as outputs
from ntrace import ops
from ntrace.errors import UnsupportedModelError, UsageError
from ntrace.format.metadata import Activation, Geometry, LayerAttrs, ModuleAttrs
from ntrace.ops.activation_state import ActivationStates
from ntrace.recording.functional import FunctionalCalls, Replacement

POLICIES = ("error", "warn", "skip")


@dataclass
class Call:
    name: str
    module: nn.Module  # for a functional call, the equivalent module
    input: Any
    output: Any
    functional: bool = False
    per_sample: bool = True  # False: a functional call on a tensor without the batch axis


@dataclass
class TrackedLayer:
    """One tracked layer: its module, its op (bound to the call's geometry) and the activation
    on its output."""

    name: str
    module: nn.Module
    op: ops.LayerOp
    call_index: int
    activation: Activation = field(default_factory=lambda: Activation("identity"))
    act_module: nn.Module | None = None  # the activation module (PReLU's slopes live there)
    act_call: int | None = None

    @property
    def geometry(self) -> Geometry:
        return self.op.geometry

    def attrs(self, index: int, jacobian: str) -> LayerAttrs:
        """The layer's attribute document, ``index`` its position in the trace."""
        return self.op.attrs(self.name, index, self.op.bias(self.module) is not None,
                             self.activation, jacobian)


@dataclass
class StateModule:
    """A max-pool, dropout or activation call whose per-sample state is recorded."""

    name: str
    module: nn.Module
    kind: str
    call_index: int
    input_shape: tuple[int, ...]
    functional: bool = False
    activation: Activation | None = None  # kind "activation": the activation and its op
    act_op: type[ops.ActivationOp] | None = None

    @property
    def op(self) -> type[ops.StateOp]:
        return ops.STATES[self.kind]

    def states(self, module: nn.Module, x: torch.Tensor, y: Any) -> torch.Tensor:
        """The state of each input unit of one call, bool, shaped like ``x``."""
        if self.act_op is not None:
            return ActivationStates.of(self.act_op, self.activation, x)  # type: ignore[arg-type]
        return self.op.states(module, x, y)

    def attrs(self) -> ModuleAttrs:
        return ModuleAttrs(self.name, self.kind, self.input_shape, activation=self.activation)


@dataclass
class Structure:
    layers: list[TrackedLayer]
    modules: list[StateModule]
    kind: str  # "chain" | "graph"
    identity_output: bool  # the last layer's output is the model output, no activation

    def state_units(self) -> list[TrackedLayer | StateModule]:
        """What has activation states, in call order: the layers with a piecewise-linear
        activation and the activation modules (the probe configuration's units)."""
        units: list[TrackedLayer | StateModule] = [la for la in self.layers
                                                   if la.activation.has_mask]
        units += [m for m in self.modules if m.kind == "activation"]
        return sorted(units, key=lambda u: u.act_call if isinstance(u, TrackedLayer)
                      else u.call_index)  # type: ignore[return-value]


@dataclass
class CallLog:
    """Calls of leaf modules during the latest forward of the root model."""

    calls: list[Call] = field(default_factory=list)
    output: Any = None
    active: bool = False
    args: tuple[Any, ...] = ()  # the root call's positional arguments (the model inputs)
    kwargs: dict[str, Any] = field(default_factory=dict)
    raw: Any = None  # what forward returned, when ``output`` is one tensor of a structure


class Watcher:
    """Installs the hooks and keeps the log of the latest captured forward."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.log = CallLog()
        self.capture = True
        self._names = {m: n for n, m in model.named_modules()}
        self.paused = False
        self.path: outputs.Path | None = None  # the recorded tensor of a structured output
        self._handles = [model.register_forward_pre_hook(self._pre_root, with_kwargs=True)]
        if not any(True for _ in model.children()):  # a bare layer: the root is the leaf
            self._names[model] = type(model).__name__.lower()
            self._handles.append(model.register_forward_hook(self._leaf))  # before _post_root
        self._handles.append(model.register_forward_hook(self._post_root))
        leaves = set()
        for _name, m in model.named_modules():
            if m is not model and not any(True for _ in m.children()):
                self._handles.append(m.register_forward_hook(self._leaf))
                leaves.add(id(m))
        self.functional = FunctionalCalls(self._names, leaves, self._function)

    def _pre_root(self, module: nn.Module, args: Any, kwargs: Any) -> None:
        self.begin(args, kwargs)

    def begin(self, args: Any, kwargs: Any) -> None:
        """Start the log of a forward of the root model (the root pre-hook calls this; call
        it yourself when attaching from inside the root's own pre-hooks)."""
        if not self.paused:
            self.log = CallLog(active=self.capture, args=tuple(args), kwargs=dict(kwargs))
        if self.log.active and not self.paused or self.paused and self.functional.replace:
            x = _first_tensor(args, kwargs)
            self.functional.start(x.shape[0] if x is not None and x.ndim else None)

    def _post_root(self, module: nn.Module, args: Any, output: Any) -> None:
        self.functional.stop()
        if self.log.active and not self.paused:
            self.log.raw, self.log.output = output, self.pick(output)
            self.log.active = False

    def pick(self, output: Any) -> Any:
        """The recorded tensor of what forward returned (itself, without a path)."""
        return output if self.path is None else outputs.get(output, self.path)

    def choose(self, path: outputs.Path) -> None:
        """Record the tensor at ``path`` of the structured output from now on."""
        self.path = path
        if self.log.raw is not None:  # else the forward is running: its end picks it
            self.log.output = self.pick(self.log.raw)

    def rebatch(self, args: Any, kwargs: Any) -> None:
        """The root call's inputs, known only after it ran (the model was attached from a
        global pre-hook, which sees no keyword arguments): the log takes them, and which
        calls are per sample is decided again by the batch size they give."""
        self.log.args, self.log.kwargs = tuple(args), dict(kwargs)
        x = _first_tensor(args, kwargs)
        if x is None or not x.ndim:
            return
        for c in self.log.calls:
            c.per_sample = not (isinstance(c.input, torch.Tensor)
                                and (c.input.ndim == 0 or c.input.shape[0] != x.shape[0]))

    def _function(self, name: str, module: nn.Module, x: torch.Tensor, output: Any,
                  per_sample: bool) -> None:
        if self.log.active and not self.paused:
            self.log.calls.append(Call(name, module, x, output, True, per_sample))

    @contextlib.contextmanager
    def replacing(self, calls: dict[str, Replacement]) -> Iterator[None]:
        """Extra forwards (paused or captured) in which the named functional calls are
        replaced by functions of their input."""
        self.functional.replace = calls
        try:
            yield
        finally:
            self.functional.replace = {}

    def _leaf(self, module: nn.Module, args: Any, output: Any) -> None:
        if not self.log.active or self.paused:
            return
        x = args[0] if args else None
        batch = self.functional.batch  # an input without the batch axis (position ids
        per_sample = not (isinstance(x, torch.Tensor) and batch is not None  # (1, T)): shared
                          and (x.ndim == 0 or x.shape[0] != batch))
        self.log.calls.append(Call(self._names.get(module, "?"), module, x, output,
                                   per_sample=per_sample))

    def remove(self) -> None:
        self.functional.stop()
        for h in self._handles:
            h.remove()
        self._handles.clear()


def _first_tensor(args: Any, kwargs: Any) -> torch.Tensor | None:
    """The first tensor input of a call (its batch size is the batch's): keyword arguments
    may come first as ``None`` (``past_key_values=None, input_ids=...``)."""
    return next((v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)), None)


def describe(call: Call) -> str:
    return f"{call.name} ({type(call.module).__name__})"


def discover(log: CallLog, model: nn.Module, unsupported: str = "error") -> Structure:
    """Turn one logged forward into the model's :class:`Structure`, or explain why not."""
    if unsupported not in POLICIES:
        raise UsageError(f"unsupported={unsupported!r}; use one of {', '.join(POLICIES)}")
    calls = log.calls
    if not calls:
        raise UnsupportedModelError(
            "no module calls were seen in the model's forward: call model(x) before "
            "recorder.step(), and build the model from nn.Module layers (nn.Linear, nn.ReLU)")
    out = log.output
    if not isinstance(out, torch.Tensor):
        raise UnsupportedModelError(f"the model returns {type(out).__name__}, not a tensor; "
                                    "name the tensor the loss is computed from: "
                                    "step(loss, outputs, target, field='logits')")
    found = _Found()
    for i, c in enumerate(calls):
        op = ops.recognise(c.module)
        if not c.per_sample:
            if not c.functional and op is not None and op.role == ops.LAYER:
                _shared(c)
            continue  # F.relu on a weight, say: no per-sample state
        if op is None and _constant(c):
            continue  # rotary position tables and the like: nothing flows back through it
        if op is None:
            _unsupported(c, unsupported)
        elif (why := op.unsupported(c.name, c.module)) is not None:
            _refused(why, unsupported)
        else:
            _VISIT[op.role](found, op, i, c)
    layers, modules = found.layers, found.modules
    if not layers:
        raise UnsupportedModelError("the model has no layer ntrace can track "
                                    f"({ops.supported(ops.LAYER, prefix='nn.')})")
    if out.ndim != 2:
        raise UsageError(f"the model output must be (batch, outputs); found shape "
                         f"{tuple(out.shape)} (flatten it in the model)")
    hidden = hidden_nonlinearities(out, calls)
    if hidden:
        _invisible(hidden, unsupported)
    last = layers[-1]
    identity = calls[last.call_index].output is out and last.act_module is None
    kind = "chain" if _is_chain(calls, layers, modules, out) else "graph"
    return Structure(layers, modules, kind, identity)


@dataclass
class _Found:
    """What :func:`discover` has found so far; one method per op role (``_VISIT``)."""

    layers: list[TrackedLayer] = field(default_factory=list)
    modules: list[StateModule] = field(default_factory=list)
    by_output: dict[int, TrackedLayer] = field(default_factory=dict)
    state_calls: dict[int, int] = field(default_factory=dict)

    def layer(self, op: type[ops.LayerOp], i: int, c: Call) -> None:
        if any(la.module is c.module for la in self.layers):
            raise UnsupportedModelError(
                f"layer {describe(c)} is called twice in one forward; shared weights are "
                "not supported by the trace format")
        layer = TrackedLayer(c.name, c.module, op.from_call(c.name, c.module, c.input, c.output),
                             i)
        self.layers.append(layer)
        self.by_output[id(c.output)] = layer

    def activation(self, op: type[ops.ActivationOp], i: int, c: Call) -> None:
        owner = self.by_output.get(id(c.input))
        act = op.describe(c.module)
        if owner is not None and owner.act_module is None:
            owner.activation, owner.act_module, owner.act_call = act, c.module, i
        elif act.has_mask:  # after a residual addition, a normalisation: a module's states
            self.state(ActivationStates, i, c, act, op)

    def state(self, op: type[ops.StateOp], i: int, c: Call, activation: Activation | None = None,
              act_op: type[ops.ActivationOp] | None = None) -> None:
        if not op.active(c.module):
            return  # dropout in eval mode: the identity
        k = self.state_calls.get(id(c.module), 0)
        self.state_calls[id(c.module)] = k + 1
        self.modules.append(StateModule(c.name if k == 0 else f"{c.name}@{k}", c.module, op.name,
                                        i, tuple(c.input.shape[1:]), c.functional, activation,
                                        act_op))

    def passthrough(self, op: type[ops.PassthroughOp], i: int, c: Call) -> None:
        op.check(c.name, c.module)


_VISIT: dict[str, Callable[[_Found, Any, int, Call], None]] = {
    ops.LAYER: _Found.layer, ops.ACTIVATION: _Found.activation, ops.STATE: _Found.state,
    ops.PASSTHROUGH: _Found.passthrough,
}


def _apply_policy(policy: str, what: str, fix: str, warned: str = "") -> None:
    """The ``unsupported`` policy for something that cannot be recorded: raise ``what`` and
    ``fix`` (error), warn ``what`` (warn), or nothing (skip)."""
    if policy == "error":
        raise UnsupportedModelError(f"{what}{fix}")
    if policy == "warn":
        warnings.warn(f"ntrace: {what}{warned}", stacklevel=5)


def _unsupported(c: Call, policy: str) -> None:
    params = sum(p.numel() for p in c.module.parameters(recurse=False))
    what = (f"module {describe(c)} is not one ntrace understands"
            + (f"; its {params} parameters would not be tracked" if params else
               "; its activation states would not be recorded"))
    _apply_policy(policy, what, ". Pass unsupported='warn' or 'skip' (CLI: --unsupported "
                  "warn|skip) to record the rest, with Jacobians exact through it by autograd "
                  f"(supported: {ops.supported()})", "; recording the rest")


def _constant(c: Call) -> bool:
    """A parameter-free module none of whose outputs require grad (a rotary embedding's cos
    and sin tables, computed under ``torch.no_grad``): constant for the Taylor expansion, no
    Jacobian flows through it and it has no states to record."""
    if c.functional or any(True for _ in c.module.parameters()):
        return False
    outs = c.output if isinstance(c.output, tuple | list) else (c.output,)
    return all(isinstance(o, torch.Tensor) and not o.requires_grad for o in outs)


def _shared(c: Call) -> None:
    """A layer called on an input without the batch axis (a position embedding of
    ``position_ids`` (1, T), broadcast over the batch): the same for every sample, not
    tracked; its weights still train."""
    warnings.warn(f"ntrace: layer {describe(c)} is called on an input without the batch axis "
                  f"(shape {tuple(c.input.shape)}), shared by every sample: it is not tracked",
                  stacklevel=4)


def _refused(why: str, policy: str) -> None:
    _apply_policy(policy, why, ". Pass unsupported='warn' or 'skip' (CLI: --unsupported "
                  "warn|skip) to record the rest without it", "; recording the rest")


# autograd nodes of piecewise-linear ops with states: those of the recorded ops (a call of
# which the recorder did not log: inside an unsupported module skipped by the policy, or with
# a call form it does not know) and others it cannot record (clamp, maximum, adaptive max
# pooling…). Smooth ops need nothing recorded: Jacobians through them are exact by autograd.
NONLINEAR_NODES = (*ops.grad_nodes(), "Clamp", "Maximum", "Minimum", "Fmax", "Fmin",
                   "AdaptiveMaxPool", "FractionalMaxPool", "Hardshrink", "Softshrink")


def hidden_nonlinearities(out: torch.Tensor, calls: list[Call]) -> list[str]:
    """Names of piecewise-linear autograd nodes in the forward that no logged call produced:
    their states cannot be recorded."""
    # Python wrappers of autograd nodes live only while referenced: keep every one alive,
    # or ids get reused and compare wrongly
    outs = [c.output[0] if isinstance(c.output, tuple) else c.output for c in calls]
    keep = [n for o in outs if isinstance(o, torch.Tensor) for n in _call_nodes(o.grad_fn)]
    own = {id(n) for n in keep}
    found: list[str] = []
    stack = [out.grad_fn] if out.grad_fn is not None else []
    seen: set[int] = set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        keep.append(node)
        seen.add(id(node))
        name = type(node).__name__
        if id(node) not in own and name.startswith(NONLINEAR_NODES):
            found.append(name)
        stack.extend(nxt for nxt, _ in node.next_functions)
    return sorted(set(found))


# shape-only nodes by which torch wraps an op's result (max_pool1d is max_pool2d between an
# unsqueeze and a squeeze): the node below one is the call's own too
_WRAPPERS = ("Squeeze", "Unsqueeze", "View", "Reshape", "Unsafe", "Alias")


def _call_nodes(node: Any, depth: int = 3) -> list[Any]:
    """The autograd nodes a logged call produced: its output's, and below shape-only ones."""
    if node is None:
        return []
    out = [node]
    if depth and type(node).__name__.startswith(_WRAPPERS):
        for nxt, _ in node.next_functions:
            out += _call_nodes(nxt, depth - 1)
    return out


def _invisible(hidden: list[str], policy: str) -> None:
    what = (f"the forward applies piecewise-linear operations ntrace does not record "
            f"({', '.join(hidden)}: torch.clamp, torch.maximum, F.adaptive_max_pool2d and the "
            "like), whose states would be missing from the trace")
    _apply_policy(policy, what, "; use the ReLU family (F.relu, nn.ReLU, F.hardtanh…) and "
                  "F.max_pool/nn.MaxPool instead, or pass unsupported='warn' or 'skip' (CLI: "
                  "--unsupported warn|skip) to record without their states (Jacobians stay "
                  "exact)")


def _is_chain(calls: list[Call], layers: list[TrackedLayer], modules: list[StateModule],
              out: torch.Tensor) -> bool:
    """Linear → (ReLU|LeakyReLU) → Linear … with each call consuming the previous output."""
    if modules or not all(la.op.chain and ops.activation_op(la.activation).chain
                          for la in layers):
        return False
    expected: list[int] = []
    for la in layers:
        expected.append(la.call_index)
        if la.act_call is not None:
            expected.append(la.act_call)
    first = expected[0]
    for i, c in enumerate(calls):
        if i < first:
            if not isinstance(c.module, nn.Flatten | nn.Identity):
                return False
        elif i not in expected and not isinstance(c.module, nn.Identity):
            return False
        if i > 0 and c.input is not calls[i - 1].output:
            return False
    return calls[-1].output is out
