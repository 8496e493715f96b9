"""What every op kind provides. Each module of :mod:`ntrace.ops` fills in one of these bases.

An op is a class (never instantiated, except a layer op bound to one layer's geometry) with:

- **recognition**: ``modules``, the torch module types that are this op (matched by exact
  type; pass-through ops also match subclasses), and ``functions``, the functional call forms
  (``F.relu``, ``torch.relu``, ``Tensor.relu_``), which :meth:`Op.as_module` turns into the
  equivalent module, so that a functional call is recognised, described and recorded by the
  same code as a module call. ``grad_nodes`` names the autograd nodes the op produces, so that
  the recorder can say when one appears outside any call it saw;
- ``label``: how messages name the op (``"Conv1d/2d/3d"``);
- ``unsupported``: a reason why a module of this type cannot be recorded *in its current
  state* (random in training mode, say), handled by the ``unsupported`` policy like an
  unknown module;
- per role, what the recorder and the analyzer need: see :class:`LayerOp`,
  :class:`ActivationOp`, :class:`StateOp`, :class:`PassthroughOp`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ntrace.format.metadata import Activation, Geometry, LayerAttrs

LAYER, ACTIVATION, STATE, PASSTHROUGH = "layer", "activation", "state", "passthrough"


class Op:
    """Recognition, shared by every role."""

    role: ClassVar[str]
    label: ClassVar[str] = ""
    modules: ClassVar[tuple[type[nn.Module], ...]] = ()
    functions: ClassVar[tuple[Callable[..., Any], ...]] = ()  # functional forms
    grad_nodes: ClassVar[tuple[str, ...]] = ()  # autograd node name prefixes it produces
    module_names: ClassVar[tuple[str, ...]] = ()  # library modules matched by class name
    subclasses: ClassVar[bool] = False  # also recognise subclasses of ``modules``
    # in words, for ``ntrace record --list-supported`` (:mod:`ntrace.ops.support`): what is
    # recorded (empty: what the role records) and when the op is refused or approximated
    recorded: ClassVar[str] = ""
    notes: ClassVar[str] = ""

    @classmethod
    def unsupported(cls, name: str, module: nn.Module) -> str | None:
        """Why ``module`` cannot be recorded as it is (and what to do), or ``None``."""
        return None

    @classmethod
    def as_module(cls, func: Callable[..., Any], args: tuple[Any, ...],
                  kwargs: dict[str, Any]) -> nn.Module:
        """The module equivalent to the call ``func(*args, **kwargs)`` of one of
        ``functions`` (its input is ``args[0]``)."""
        return cls.modules[0]()


def arg(args: tuple[Any, ...], kwargs: dict[str, Any], i: int, name: str, default: Any) -> Any:
    """Argument ``name`` (position ``i``, the input being 0) of a functional call."""
    return args[i] if len(args) > i else kwargs.get(name, default)


def function_name(func: Callable[..., Any]) -> str:
    """How a functional call is named in a trace: ``relu`` for ``F.relu``, ``torch.relu_``
    and ``Tensor.relu``, ``max_pool2d`` for ``F.max_pool2d_with_indices``."""
    return getattr(func, "__name__", "call").removesuffix("_with_indices").strip("_")


@dataclass(frozen=True)
class LayerOp(Op):
    """A layer linear in its weights, ``a = op(x, W) + b``, bound to one layer's geometry.

    Every kind exposes a neuron's parameters as one flat vector, its *row* (for a convolution
    the filter of one output channel flattened in C order, for an embedding one column of the
    table). The class methods recognise a module call and measure its geometry (recorder);
    the bound methods hold the linear map and the row layout (recorder and analyzer).
    Index letters: ``k`` sample, ``o`` network output, ``c`` tracked neuron, ``q`` output
    position, ``i`` entry of a neuron's row.
    """

    geometry: Geometry

    role: ClassVar[str] = LAYER
    name: ClassVar[str]  # the layer kind on disk
    rank_one: ClassVar[bool] = False  # M_s[c] = g_s xᵀ, kept factored (linear, no positions)
    neuron_last: ClassVar[bool] = False  # the module returns (batch, *positions, neuron)
    chain: ClassVar[bool] = False  # may form a chain trace (fast Jacobian recursion)
    stores_geometry: ClassVar[bool] = True  # False: derived from in/out features (format 1.0)

    # -- recognition (recorder) ---------------------------------------------------------------
    @classmethod
    def measure(cls, name: str, module: nn.Module, x: torch.Tensor, a: torch.Tensor
                ) -> Geometry:
        """The geometry of one call; raises ``UnsupportedModelError`` for a configuration the
        trace format cannot describe."""
        raise NotImplementedError

    @classmethod
    def from_call(cls, name: str, module: nn.Module, x: torch.Tensor, a: torch.Tensor
                  ) -> LayerOp:
        return cls(cls.measure(name, module, x, a))

    @classmethod
    def from_attrs(cls, la: LayerAttrs) -> LayerOp:
        return cls(la.shape)

    @staticmethod
    def weight(module: nn.Module) -> torch.Tensor:
        return module.weight  # type: ignore[return-value]

    @staticmethod
    def bias(module: nn.Module) -> torch.Tensor | None:
        return getattr(module, "bias", None)

    def neurons_first(self, out: torch.Tensor) -> torch.Tensor:
        """The module's output as (batch, neurons, *positions)."""
        return out.movedim(-1, 1) if self.neuron_last else out

    # -- format attributes ------------------------------------------------------------------
    @property
    def in_features(self) -> int:
        return self.geometry.input_shape[0]

    def attrs(self, name: str, index: int, bias: bool, activation: Activation,
              jacobian: str) -> LayerAttrs:
        """The layer's attribute document (spec 3.2)."""
        return LayerAttrs(name=name, index=index, kind=self.name,
                          in_features=int(self.in_features), out_features=self.neurons,
                          bias=bias, activation=activation, jacobian=jacobian,
                          geometry=self.geometry if self.stores_geometry else None)

    # -- layout -------------------------------------------------------------------------------
    @property
    def weight_shape(self) -> tuple[int, ...]:
        return self.geometry.weight_shape

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.geometry.input_shape

    @property
    def output_shape(self) -> tuple[int, ...]:
        """(n, *positions)."""
        return self.geometry.output_shape

    @property
    def neurons(self) -> int:
        return self.geometry.output_shape[0]

    @property
    def positions(self) -> tuple[int, ...]:
        return self.geometry.positions

    @property
    def row_size(self) -> int:
        """Parameters of one neuron, bias excluded."""
        return math.prod(self.weight_shape) // self.neurons

    def rows(self, weight: torch.Tensor) -> torch.Tensor:
        """(..., *weight_shape) → (..., n, row_size): each neuron's parameters."""
        lead = weight.shape[:weight.ndim - len(self.weight_shape)]
        return weight.reshape(*lead, self.neurons, -1)

    def unrows(self, rows: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`rows` for one layer: (n, row_size) → weight_shape."""
        return rows.reshape(self.weight_shape)

    # -- the map ------------------------------------------------------------------------------
    def op(self, x: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
        """``op(x, V)`` without bias: (k, *input_shape) → (k, n, *positions)."""
        raise NotImplementedError

    def affine(self, x: torch.Tensor, V: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        """``op(x, V) + c``, the pre-activation from the stored factors (spec 'Reconstruction'),
        (k, n, *positions)."""
        a = self.op(x, V)
        return a if c is None else a + c.reshape(1, -1, *([1] * (a.ndim - 2)))

    def design(self, x: torch.Tensor, jac: torch.Tensor, neurons: torch.Tensor) -> torch.Tensor:
        """``M[k, o, c, :]`` without the bias entry for neurons ``neurons`` (c,), given their
        Jacobian columns ``jac`` (k, o, c, *positions): (k, o, c, row_size), with
        ``M[k, o, c, :] = Σ_q J[k, o, c, q] ∂a[j, q]/∂row_j``."""
        raise NotImplementedError

    @staticmethod
    def pull(J: torch.Tensor | None, W: torch.Tensor) -> torch.Tensor:
        """``J ∂a/∂x`` (b, o, inputs): the output Jacobian ``J`` (b, o, n) of this layer's
        pre-activation carried to its input (``None``: J is the identity), for the chain
        recursion; only kinds with ``chain`` define it."""
        raise NotImplementedError


class ActivationOp(Op):
    """A piecewise-linear elementwise activation applied to a layer's pre-activation ``a``.

    ``name`` is the activation kind written on disk. The math (``slope``, ``states``) is looked
    up by that name, so an op that only recognises another module as an existing kind (RReLU in
    eval mode is a ``leaky_relu``) inherits it and adds no format."""

    role: ClassVar[str] = ACTIVATION
    name: ClassVar[str]
    chain: ClassVar[bool] = False  # may form a chain trace (format 1.0: relu, leaky_relu)

    @classmethod
    def describe(cls, module: nn.Module) -> Activation:
        """The activation's attributes (spec 3.2) for one module."""
        return Activation(cls.name)

    @classmethod
    def slope(cls, act: Activation, a: torch.Tensor, param: torch.Tensor | None = None
              ) -> torch.Tensor:
        """The derivative at pre-activation ``a`` (torch's subgradient at the kinks), the
        activation's factor ``diag(d)`` in every Jacobian; ``param`` is the recorded
        per-round parameter (PReLU's slopes)."""
        raise NotImplementedError

    @classmethod
    def states(cls, act: Activation, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-unit states (spec 'Packed activations'): ``a > threshold``, and the upper piece
        for kinds with three pieces (else ``None``)."""
        return a > act.threshold, None

    @classmethod
    def parameter(cls, module: nn.Module) -> torch.Tensor | None:
        """A trained parameter recorded each Taylor round (the ``slope`` array), or ``None``."""
        return None


class StateOp(Op):
    """A parameter-free module whose per-sample state is recorded (``modules/<name>``)."""

    role: ClassVar[str] = STATE
    name: ClassVar[str]  # the module kind on disk

    @classmethod
    def active(cls, module: nn.Module) -> bool:
        """False where the module is the identity (dropout in eval mode): nothing to record."""
        return True

    @classmethod
    def states(cls, module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The state of each input unit, bool (batch, *input_shape), from a call's input and
        output."""
        raise NotImplementedError

    @classmethod
    def replay(cls, module: nn.Module, x: torch.Tensor, y: torch.Tensor
               ) -> Callable[..., torch.Tensor] | None:
        """A forward hook making an extra forward repeat this call (a random op), or ``None``."""
        return None


class PassthroughOp(Op):
    """A module with nothing to record: Jacobians pass through it by autograd."""

    role: ClassVar[str] = PASSTHROUGH
    subclasses: ClassVar[bool] = True

    @classmethod
    def check(cls, name: str, module: nn.Module) -> None:
        """Raise ``UnsupportedModelError`` where the module makes the trace undefined."""
