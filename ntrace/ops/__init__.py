"""The op registry: everything ntrace knows about each kind of operation, one module per kind
(BackPACK's per-module extensions), one table (``OPS``), used by the recorder and the analyzer.

Supporting a new module means one small module here and one entry in ``OPS``; the format
(``ntrace.format.metadata``, numpy only) keeps its own list of the names written on disk, and
needs an entry only when a new name appears there. Roles (:mod:`ntrace.ops.base`):

- ``layer``: linear in its weights, tracked (:class:`LayerOp`: geometry, ``op(x, V)``, rows,
  designs, chain pullback); looked up by module type or by the ``kind`` stored on disk;
- ``activation``: piecewise linear, its states recorded (:class:`ActivationOp`: attributes,
  slope, states, recorded parameter); its math is looked up by the ``kind`` stored on disk;
- ``state``: parameter-free with a per-sample state (max-pool winners, dropout masks, the
  states of an activation not directly after a tracked layer);
- ``passthrough``: nothing to record.

Each op also lists its functional forms (``functions``); the recorder logs their calls in
recorded forwards and turns each into the equivalent module (:meth:`Op.as_module`), so both
forms share one definition. ``FUNCTIONS`` maps each to its op.
"""

from __future__ import annotations

from torch import nn

from ntrace.format.metadata import Activation, LayerAttrs
from ntrace.ops import (
    activation_state,
    alpha_dropout,
    attention,
    conv,
    conv_transpose,
    dropout,
    embedding,
    hardtanh,
    identity,
    leaky_relu,
    linear,
    maxpool,
    norm,
    passthrough,
    prelu,
    relu,
    rrelu,
    smooth,
)
from ntrace.ops.base import (
    ACTIVATION,
    LAYER,
    PASSTHROUGH,
    STATE,
    ActivationOp,
    LayerOp,
    Op,
    PassthroughOp,
    StateOp,
)

__all__ = ["ACTIVATION", "LAYER", "PASSTHROUGH", "STATE", "ActivationOp", "LayerOp", "Op",
           "PassthroughOp", "StateOp", "OPS", "recognise", "layer_op", "activation_op",
           "supported", "grad_nodes", "FUNCTIONS"]

OPS: tuple[type[Op], ...] = (
    linear.Linear, conv.Conv, conv_transpose.ConvTranspose, embedding.Embedding,
    identity.Identity, relu.ReLU, leaky_relu.LeakyReLU, prelu.PReLU, hardtanh.Hardtanh,
    rrelu.RReLU, smooth.Smooth,
    maxpool.MaxPool, dropout.Dropout, activation_state.ActivationStates,
    passthrough.Passthrough, passthrough.BatchNorm, norm.Norm, attention.Attention,
    alpha_dropout.AlphaDropout, linear.TransposedLinear,
)


def _by_name(role: str) -> dict[str, type[Op]]:
    """The ops of ``role`` by the name they write on disk; where several write one name (an
    op recognising another module as an existing kind) the first defines it."""
    table: dict[str, type[Op]] = {}
    for op in OPS:
        if op.role == role:
            table.setdefault(op.name, op)  # type: ignore[attr-defined]
    return table


BY_MODULE: dict[type, type[Op]] = {m: op for op in OPS for m in op.modules}
# modules of other libraries (transformers' GELUActivation…) by qualified class name, never
# imported
BY_MODULE_NAME: dict[str, type[Op]] = {n: op for op in OPS for n in op.module_names}
# functional forms (F.relu, torch.relu_, Tensor.relu, F.max_pool2d…) → their op
FUNCTIONS: dict[object, type[Op]] = {f: op for op in OPS for f in op.functions}
LAYERS: dict[str, type[LayerOp]] = _by_name(LAYER)  # type: ignore[assignment]
ACTIVATIONS: dict[str, type[ActivationOp]] = _by_name(ACTIVATION)  # type: ignore[assignment]
STATES: dict[str, type[StateOp]] = _by_name(STATE)  # type: ignore[assignment]


def recognise(module: object) -> type[Op] | None:
    """The op a module is, or ``None`` for one ntrace does not understand: by exact type, or
    by a base type for ops that admit subclasses (the pass-through ones)."""
    op = BY_MODULE.get(type(module))
    if op is None:
        op = next((BY_MODULE[t] for t in type(module).__mro__[1:]
                   if t in BY_MODULE and BY_MODULE[t].subclasses), None)
    if op is None and isinstance(module, nn.Module):
        op = BY_MODULE_NAME.get(f"{type(module).__module__}.{type(module).__qualname__}")
    return op


def layer_op(la: LayerAttrs) -> LayerOp:
    """The linear map of a recorded layer, bound to its geometry."""
    return LAYERS[la.kind].from_attrs(la)  # the format reader admits only these kinds


def activation_op(act: Activation) -> type[ActivationOp]:
    """The math of a recorded activation kind."""
    return ACTIVATIONS[act.kind]


def supported(role: str | None = None, prefix: str = "") -> str:
    """The supported modules (of ``role``), for messages: ``"Linear, Conv1d/2d/3d, …"``."""
    return ", ".join(prefix + op.label for op in OPS if op.label and role in (None, op.role))


def grad_nodes() -> tuple[str, ...]:
    """Autograd node name prefixes of the recorded nonlinear ops."""
    return tuple(n for op in OPS for n in op.grad_nodes)
