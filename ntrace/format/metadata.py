"""Attribute documents of a Taylor trace, as frozen dataclasses.

Each node kind (trace root, layer, taylor, probe) keeps its attributes under the single key
``ntrace``. Every class mirrors ``to_dict``/``from_dict``; every field is checked by a small
``parse_*`` function so that a malformed document fails with a message naming the field.
Unknown keys are ignored (minor versions may add them); an unknown major version is refused.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ntrace.errors import InvalidTraceError, UnsupportedVersionError

FORMAT_VERSION = "1.3"
FORMAT_MAJOR = 1
FORMAT_MINOR = 3
ATTR_KEY = "ntrace"

LOSS_IDS = ("mse", "cross_entropy", "bce_with_logits", "nll")
CLASS_TARGET_LOSSES = ("cross_entropy", "nll")  # targets are class indices
ACTIVATIONS = ("relu", "leaky_relu", "prelu", "hardtanh", "identity", "smooth")
STATE_ACTIVATIONS = ("relu", "leaky_relu", "prelu", "hardtanh")  # piecewise linear: states
LAYER_KINDS = ("linear", "conv", "conv_transpose", "embedding")
STRUCTURES = ("chain", "graph")
MODULE_KINDS = ("maxpool", "dropout", "activation")
STATUSES = ("running", "complete", "aborted")
SAMPLE_POLICIES = ("first",)
JACOBIAN_KINDS = ("stored", "identity")
BATCHNORM_APPROXIMATIONS = ("fixed_stats",)  # 1.3: how training-mode BatchNorm is recorded


def _fail(where: str, message: str) -> InvalidTraceError:
    return InvalidTraceError(f"{where}: {message}")


def parse_str(data: object, where: str, choices: Sequence[str] | None = None) -> str:
    if not isinstance(data, str):
        raise _fail(where, f"expected a string, found {type(data).__name__}")
    if choices is not None and data not in choices:
        raise _fail(where, f"expected one of {', '.join(choices)}, found {data!r}")
    return data


def parse_opt_str(data: object, where: str) -> str | None:
    return None if data is None else parse_str(data, where)


def parse_int(data: object, where: str, minimum: int | None = None) -> int:
    if isinstance(data, bool) or not isinstance(data, int):
        raise _fail(where, f"expected an integer, found {type(data).__name__}")
    if minimum is not None and data < minimum:
        raise _fail(where, f"expected an integer >= {minimum}, found {data}")
    return data


def parse_opt_int(data: object, where: str, minimum: int | None = None) -> int | None:
    return None if data is None else parse_int(data, where, minimum)


def parse_float(data: object, where: str) -> float:
    if isinstance(data, bool) or not isinstance(data, int | float) or not math.isfinite(data):
        raise _fail(where, f"expected a finite number, found {data!r}")
    return float(data)


def parse_bool(data: object, where: str) -> bool:
    if not isinstance(data, bool):
        raise _fail(where, f"expected true or false, found {data!r}")
    return data


def parse_mapping(data: object, where: str) -> Mapping[str, Any]:
    if not isinstance(data, Mapping):
        raise _fail(where, f"expected an object, found {type(data).__name__}")
    return data


def parse_layer_name(data: object, where: str) -> str:
    """A layer (group) name: non-empty, no '/' (it would name a nested group), not '.'/'..',
    and Unicode that UTF-8 can encode (Zarr keys are UTF-8: no lone surrogates)."""
    name = parse_str(data, where)
    if not name or "/" in name or name in (".", "..") or not _utf8(name):
        raise _fail(where, f"layer name {name!r} must be non-empty, valid Unicode (no lone "
                           "surrogates), contain no '/' and not be '.' or '..'")
    return name


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def parse_format_version(data: object, where: str = "format_version") -> tuple[int, int]:
    """Return ``(major, minor)``; refuse majors this ntrace cannot read."""
    text = parse_str(data, where)
    parts = text.split(".")
    if len(parts) != 2 or not all(p.isascii() and p.isdigit() and len(p) <= 9 for p in parts):
        raise _fail(where, f"expected 'MAJOR.MINOR', found {text[:40]!r}")
    major, minor = int(parts[0]), int(parts[1])
    if major != FORMAT_MAJOR:
        from ntrace import __version__

        if major > FORMAT_MAJOR:
            raise UnsupportedVersionError(
                f"trace format version {text} is not readable by ntrace: it needs a newer "
                f"ntrace (this is {__version__}, which reads format {FORMAT_MAJOR}.x): "
                "pip install -U ntrace")
        raise UnsupportedVersionError(
            f"trace format version {text} is not readable by ntrace {__version__}, which reads "
            f"format {FORMAT_MAJOR}.x; convert the trace with an older ntrace")
    return major, minor


def _req(d: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in d:
        raise _fail(where, f"missing required key {key!r}")
    return d[key]


@dataclass(frozen=True)
class LossSpec:
    """The loss ℓ(f, y) and its reduction; see spec section 'Losses'."""

    id: str
    reduction: str = "mean"

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "reduction": self.reduction}

    @classmethod
    def from_dict(cls, data: object, where: str = "loss") -> LossSpec:
        d = parse_mapping(data, where)
        return cls(
            id=parse_str(_req(d, "id", where), f"{where}.id", LOSS_IDS),
            reduction=parse_str(_req(d, "reduction", where), f"{where}.reduction", ("mean",)),
        )


@dataclass(frozen=True)
class Sampling:
    """What is recorded and how often.

    ``taylor_every``: Taylor data every k-th round (rounds n with n % k == taylor_offset);
    ``samples_per_round``: the first s samples of each such minibatch; ``neurons``: ``"all"`` or
    the size of a seeded per-layer sample of tracked neurons; ``probe_every``: rounds between
    activation-configuration snapshots of the probe set; ``probe_size``: points in it;
    ``world_size`` (1.2): how many processes recorded the trace together (torch.distributed),
    each contributing the first ``samples_per_round / world_size`` samples of its own
    minibatch, process ``r`` at sample positions ``[r S/W, (r+1) S/W)``.
    """

    taylor_every: int = 10
    taylor_offset: int = 0
    samples_per_round: int = 8
    sample_policy: str = "first"
    neurons: str | int = "all"
    neuron_seed: int = 0
    probe_every: int = 0
    probe_size: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        # re-use the parser so API users get the same messages as trace readers
        Sampling.from_dict(self.to_dict(), where="sampling")

    def to_dict(self) -> dict[str, Any]:
        return {
            "taylor_every": self.taylor_every,
            "taylor_offset": self.taylor_offset,
            "samples_per_round": self.samples_per_round,
            "sample_policy": self.sample_policy,
            "neurons": self.neurons,
            "neuron_seed": self.neuron_seed,
            "probe_every": self.probe_every,
            "probe_size": self.probe_size,
            "world_size": self.world_size,
        }

    @classmethod
    def from_dict(cls, data: object, where: str = "sampling") -> Sampling:
        d = parse_mapping(data, where)
        every = parse_int(_req(d, "taylor_every", where), f"{where}.taylor_every", 1)
        offset = parse_int(_req(d, "taylor_offset", where), f"{where}.taylor_offset", 0)
        if offset >= every:
            raise _fail(f"{where}.taylor_offset",
                        f"must be < taylor_every ({every}), found {offset}")
        neurons = _req(d, "neurons", where)
        if neurons != "all":
            neurons = parse_int(neurons, f"{where}.neurons", 1)
        samples = parse_int(_req(d, "samples_per_round", where), f"{where}.samples_per_round", 1)
        world = parse_int(d.get("world_size", 1), f"{where}.world_size", 1)  # 1.2; absent = 1
        if samples % world:
            raise _fail(f"{where}.samples_per_round",
                        f"must be a multiple of world_size ({world}), found {samples}")
        obj = object.__new__(cls)
        for name, value in (
            ("taylor_every", every),
            ("taylor_offset", offset),
            ("samples_per_round", samples),
            ("sample_policy", parse_str(_req(d, "sample_policy", where), f"{where}.sample_policy",
                                        SAMPLE_POLICIES)),
            ("neurons", neurons),
            ("neuron_seed", parse_int(_req(d, "neuron_seed", where), f"{where}.neuron_seed", 0)),
            ("probe_every", parse_int(_req(d, "probe_every", where), f"{where}.probe_every", 0)),
            ("probe_size", parse_int(_req(d, "probe_size", where), f"{where}.probe_size", 0)),
            ("world_size", world),
        ):
            object.__setattr__(obj, name, value)
        return obj

    def is_taylor_round(self, n: int) -> bool:
        return n % self.taylor_every == self.taylor_offset

    def is_probe_round(self, n: int) -> bool:
        return self.probe_every > 0 and self.probe_size > 0 and n % self.probe_every == 0


@dataclass(frozen=True)
class Commit:
    """How many rows of each append dimension a reader may trust."""

    rounds: int = 0
    taylor_rounds: int = 0
    snapshots: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"rounds": self.rounds, "taylor_rounds": self.taylor_rounds,
                "snapshots": self.snapshots}

    @classmethod
    def from_dict(cls, data: object, where: str = "commit") -> Commit:
        d = parse_mapping(data, where)
        return cls(
            rounds=parse_int(_req(d, "rounds", where), f"{where}.rounds", 0),
            taylor_rounds=parse_int(_req(d, "taylor_rounds", where), f"{where}.taylor_rounds", 0),
            snapshots=parse_int(_req(d, "snapshots", where), f"{where}.snapshots", 0),
        )


@dataclass(frozen=True)
class TraceAttrs:
    """Attributes of the root group: run metadata, sampling policy and the commit record."""

    loss: LossSpec
    sampling: Sampling
    layers: tuple[str, ...]
    output_size: int
    status: str = "running"
    status_reason: str | None = None
    structure: str = "chain"
    modules: tuple[str, ...] = ()
    commit: Commit = field(default_factory=Commit)
    checkpoint: Mapping[str, Any] | None = None  # {slot, round}: the complete checkpoint
    created: str = ""
    producer: Mapping[str, Any] = field(default_factory=dict)
    run: Mapping[str, Any] = field(default_factory=dict)
    batchnorm: BatchNormApprox | None = None  # 1.3: training-mode BatchNorm, approximated
    format_version: str = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        out = {
            "format_version": self.format_version,
            "node": "trace",
            "status": self.status,
            "status_reason": self.status_reason,
            "created": self.created,
            "producer": dict(self.producer),
            "run": dict(self.run),
            "loss": self.loss.to_dict(),
            "sampling": self.sampling.to_dict(),
            "layers": list(self.layers),
            "output_size": self.output_size,
            "structure": self.structure,
            "modules": list(self.modules),
            "commit": self.commit.to_dict(),
            "checkpoint": None if self.checkpoint is None else dict(self.checkpoint),
        }
        if self.batchnorm is not None:
            out["batchnorm"] = self.batchnorm.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: object, where: str = "root attributes 'ntrace'") -> TraceAttrs:
        d = parse_mapping(data, where)
        version = _req(d, "format_version", where)
        parse_format_version(version, f"{where}.format_version")
        parse_str(_req(d, "node", where), f"{where}.node", ("trace",))
        raw = _req(d, "layers", where)
        if not isinstance(raw, list | tuple):
            raise _fail(f"{where}.layers", f"expected a list of names, found {type(raw).__name__}")
        layers = tuple(parse_layer_name(n, f"{where}.layers[{i}]") for i, n in enumerate(raw))
        mods = d.get("modules", [])  # 1.1; absent in 1.0
        if not isinstance(mods, list | tuple):
            raise _fail(f"{where}.modules",
                        f"expected a list of names, found {type(mods).__name__}")
        modules = tuple(parse_layer_name(n, f"{where}.modules[{i}]")
                        for i, n in enumerate(mods))
        if len(set(layers)) != len(layers):
            raise _fail(f"{where}.layers", "layer names must be unique")
        return cls(
            format_version=str(version),
            status=parse_str(_req(d, "status", where), f"{where}.status", STATUSES),
            status_reason=parse_opt_str(d.get("status_reason"), f"{where}.status_reason"),
            created=parse_str(_req(d, "created", where), f"{where}.created"),
            producer=parse_mapping(_req(d, "producer", where), f"{where}.producer"),
            run=parse_mapping(_req(d, "run", where), f"{where}.run"),
            loss=LossSpec.from_dict(_req(d, "loss", where), f"{where}.loss"),
            sampling=Sampling.from_dict(_req(d, "sampling", where), f"{where}.sampling"),
            layers=layers,
            structure=parse_str(d.get("structure", "chain"), f"{where}.structure", STRUCTURES),
            modules=modules,
            output_size=parse_int(_req(d, "output_size", where), f"{where}.output_size", 1),
            commit=Commit.from_dict(_req(d, "commit", where), f"{where}.commit"),
            checkpoint=_parse_checkpoint(d.get("checkpoint"), f"{where}.checkpoint"),
            batchnorm=None if d.get("batchnorm") is None else BatchNormApprox.from_dict(
                d["batchnorm"], f"{where}.batchnorm"),
        )


@dataclass(frozen=True)
class BatchNormApprox:
    """How the trace treats BatchNorm modules in training mode (1.3, spec 'BatchNorm in
    training mode'): ``approximation`` ``fixed_stats`` = each sample's Taylor data is taken
    with the statistics of its training batch held constant; ``modules`` names them. Every
    tracked layer then stores ``gradient_error``, the measured cost of the approximation."""

    modules: tuple[str, ...]
    approximation: str = "fixed_stats"

    def to_dict(self) -> dict[str, Any]:
        return {"approximation": self.approximation, "modules": list(self.modules)}

    @classmethod
    def from_dict(cls, data: object, where: str = "batchnorm") -> BatchNormApprox:
        d = parse_mapping(data, where)
        raw = _req(d, "modules", where)
        if not isinstance(raw, list | tuple) or not raw:
            raise _fail(f"{where}.modules", "expected a non-empty list of module names")
        return cls(approximation=parse_str(_req(d, "approximation", where),
                                           f"{where}.approximation", BATCHNORM_APPROXIMATIONS),
                   modules=tuple(parse_str(n, f"{where}.modules[{i}]")
                                 for i, n in enumerate(raw)))


def _parse_checkpoint(data: object, where: str) -> Mapping[str, Any] | None:
    if data is None:
        return None
    d = parse_mapping(data, where)
    return {"slot": parse_str(_req(d, "slot", where), f"{where}.slot", ("a", "b")),
            "round": parse_int(_req(d, "round", where), f"{where}.round", 0)}


@dataclass(frozen=True)
class Activation:
    """The elementwise activation applied to a layer's pre-activation ``a``.

    ``relu``: max(a, 0); ``leaky_relu``: a for a > 0 else ``negative_slope``·a; ``prelu``: the
    same with trained slopes, recorded per Taylor round in the layer's ``slope`` array
    (``num_parameters`` of them: 1 shared or one per neuron); ``hardtanh``: clamp(a, ``min_val``,
    ``max_val``) (ReLU6 is hardtanh(0, 6)); ``identity``: no activation, no mask; ``smooth``
    (1.3): a differentiable function named by ``function`` (``gelu``, ``tanh``, ``softmax``…),
    not necessarily elementwise, with no states: Jacobians through it are exact by autograd.
    """

    kind: str
    negative_slope: float | None = None
    min_val: float | None = None
    max_val: float | None = None
    num_parameters: int | None = None
    function: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "negative_slope": self.negative_slope}
        if self.kind == "hardtanh":
            out.update(min_val=self.min_val, max_val=self.max_val)
        if self.kind == "prelu":
            out["num_parameters"] = self.num_parameters
        if self.kind == "smooth":
            out["function"] = self.function
        return out

    @classmethod
    def from_dict(cls, data: object, where: str = "activation") -> Activation:
        d = parse_mapping(data, where)
        kind = parse_str(_req(d, "kind", where), f"{where}.kind", ACTIVATIONS)
        slope = d.get("negative_slope")
        if kind == "leaky_relu":
            slope = parse_float(slope, f"{where}.negative_slope")
        elif slope is not None:
            raise _fail(f"{where}.negative_slope", f"must be null for {kind}")
        lo = hi = None
        if kind == "hardtanh":
            lo = parse_float(_req(d, "min_val", where), f"{where}.min_val")
            hi = parse_float(_req(d, "max_val", where), f"{where}.max_val")
            if not lo < hi:
                raise _fail(f"{where}.max_val", f"must exceed min_val ({lo}), found {hi}")
        count = None
        if kind == "prelu":
            count = parse_int(_req(d, "num_parameters", where), f"{where}.num_parameters", 1)
        function = None
        if kind == "smooth":
            function = parse_str(_req(d, "function", where), f"{where}.function")
            if not function:
                raise _fail(f"{where}.function", "must name the function")
        return cls(kind=kind, negative_slope=slope, min_val=lo, max_val=hi, num_parameters=count,
                   function=function)

    @property
    def has_mask(self) -> bool:
        """Whether the activation has states (a piecewise-linear kind)."""
        return self.kind in STATE_ACTIVATIONS

    @property
    def threshold(self) -> float:
        """The state is 1 when ``a > threshold`` (spec 'Packed activations')."""
        return float(self.min_val) if self.kind == "hardtanh" else 0.0


@dataclass(frozen=True)
class Geometry:
    """Shapes (per sample) and convolution parameters of a layer (format 1.1).

    ``output_shape`` is ``[neurons, *positions]``: neurons are output features or channels, and
    positions the spatial (conv) or sequence (embedding, linear 1.3) axes over which weights
    are shared. ``padding_idx`` (1.3, embedding only): the vocabulary entry whose row is fixed,
    not a parameter of the Taylor model.
    """

    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    weight_shape: tuple[int, ...]
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    output_padding: tuple[int, ...] = ()
    groups: int = 1
    padding_idx: int | None = None

    @property
    def positions(self) -> tuple[int, ...]:
        return self.output_shape[1:]

    @property
    def units(self) -> int:
        """Output units: neurons × positions (the length of the unpacked mask)."""
        return math.prod(self.output_shape)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"input_shape": list(self.input_shape),
                               "output_shape": list(self.output_shape),
                               "weight_shape": list(self.weight_shape)}
        if self.stride:
            out.update(stride=list(self.stride), padding=list(self.padding),
                       dilation=list(self.dilation), output_padding=list(self.output_padding),
                       groups=self.groups)
        if self.padding_idx is not None:
            out["padding_idx"] = self.padding_idx
        return out

    @classmethod
    def from_dict(cls, data: object, where: str = "geometry") -> Geometry:
        d = parse_mapping(data, where)

        def shape(key: str, minimum: int = 1, required: bool = True) -> tuple[int, ...]:
            raw = _req(d, key, where) if required else d.get(key, [])
            if not isinstance(raw, list | tuple):
                raise _fail(f"{where}.{key}", f"expected a list of integers, found {raw!r}")
            return tuple(parse_int(v, f"{where}.{key}[{i}]", minimum) for i, v in enumerate(raw))

        conv = "stride" in d
        g = cls(input_shape=shape("input_shape"), output_shape=shape("output_shape"),
                weight_shape=shape("weight_shape"),
                stride=shape("stride", 1, conv), padding=shape("padding", 0, conv),
                dilation=shape("dilation", 1, conv),
                output_padding=shape("output_padding", 0, conv),
                groups=parse_int(d.get("groups", 1), f"{where}.groups", 1),
                padding_idx=parse_opt_int(d.get("padding_idx"), f"{where}.padding_idx", 0))
        if not g.output_shape:
            raise _fail(f"{where}.output_shape", "must hold at least the number of neurons")
        if conv:
            k = len(g.positions)
            for key in ("stride", "padding", "dilation", "output_padding"):
                if len(getattr(g, key)) != k:
                    raise _fail(f"{where}.{key}", f"expected {k} values (one per spatial axis)")
        return g


@dataclass(frozen=True)
class LayerAttrs:
    """Attributes of one tracked layer group ``layers/<name>``."""

    name: str
    index: int
    kind: str
    in_features: int
    out_features: int
    bias: bool
    activation: Activation
    jacobian: str
    geometry: Geometry | None = None  # 1.1; None means linear (in_features,) → (out_features,)
    # (1.3: a linear layer on (batch, *positions, features) stores it)
    format_version: str = FORMAT_VERSION

    @property
    def shape(self) -> Geometry:
        """The layer's geometry, derived for a plain linear layer."""
        if self.geometry is not None:
            return self.geometry
        return Geometry((self.in_features,), (self.out_features,),
                        (self.out_features, self.in_features))

    def to_dict(self) -> dict[str, Any]:
        out = {
            "format_version": self.format_version,
            "node": "layer",
            "name": self.name,
            "index": self.index,
            "kind": self.kind,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias,
            "activation": self.activation.to_dict(),
            "jacobian": self.jacobian,
        }
        if self.geometry is not None:
            out["geometry"] = self.geometry.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: object, where: str = "layer attributes") -> LayerAttrs:
        d = parse_mapping(data, where)
        version = _req(d, "format_version", where)
        parse_format_version(version, f"{where}.format_version")
        parse_str(_req(d, "node", where), f"{where}.node", ("layer",))
        return cls(
            format_version=str(version),
            name=parse_layer_name(_req(d, "name", where), f"{where}.name"),
            index=parse_int(_req(d, "index", where), f"{where}.index", 0),
            kind=parse_str(_req(d, "kind", where), f"{where}.kind", LAYER_KINDS),
            in_features=parse_int(_req(d, "in_features", where), f"{where}.in_features", 1),
            out_features=parse_int(_req(d, "out_features", where), f"{where}.out_features", 1),
            bias=parse_bool(_req(d, "bias", where), f"{where}.bias"),
            activation=Activation.from_dict(_req(d, "activation", where), f"{where}.activation"),
            jacobian=parse_str(_req(d, "jacobian", where), f"{where}.jacobian", JACOBIAN_KINDS),
            geometry=_parse_geometry(d, where),
        )


def _parse_geometry(d: Mapping[str, Any], where: str) -> Geometry | None:
    kind = d.get("kind")
    if "geometry" not in d:
        if kind != "linear":
            raise _fail(f"{where}.geometry", f"required for layers of kind {kind!r}")
        return None
    g = Geometry.from_dict(d["geometry"], f"{where}.geometry")
    if (kind in ("conv", "conv_transpose")) != bool(g.stride):
        raise _fail(f"{where}.geometry", f"stride/padding/dilation are required exactly for "
                                         f"convolutions, layer kind is {kind!r}")
    if g.padding_idx is not None and (kind != "embedding" or g.padding_idx >= g.weight_shape[0]):
        raise _fail(f"{where}.geometry.padding_idx",
                    f"must be a vocabulary entry of an embedding (layer kind {kind!r}, weight "
                    f"shape {list(g.weight_shape)}), found {g.padding_idx}")
    if kind == "linear":
        n, *q = g.output_shape
        if len(g.weight_shape) != 2 or g.weight_shape[0] != n or \
                tuple(g.input_shape) != (*q, g.weight_shape[1]):
            raise _fail(f"{where}.geometry", "a linear layer's geometry is input_shape "
                        "[*positions, in_features], output_shape [neurons, *positions], "
                        f"weight_shape [neurons, in_features]; found {g.to_dict()}")
    return g


@dataclass(frozen=True)
class ModuleAttrs:
    """A parameter-free call whose per-sample state is recorded (format 1.1): ``maxpool``
    (which input won each window), ``dropout`` (which inputs were kept) or, 1.3,
    ``activation``: a piecewise-linear activation not applied directly to a tracked layer's
    output (after a residual addition, a normalisation), described by ``activation``."""

    name: str
    kind: str
    input_shape: tuple[int, ...]
    format_version: str = FORMAT_VERSION
    activation: Activation | None = None  # kind "activation" only

    @property
    def units(self) -> int:
        return math.prod(self.input_shape)

    def to_dict(self) -> dict[str, Any]:
        out = {"format_version": self.format_version, "node": "module", "name": self.name,
               "kind": self.kind, "input_shape": list(self.input_shape)}
        if self.activation is not None:
            out["activation"] = self.activation.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: object, where: str = "module attributes") -> ModuleAttrs:
        d = parse_mapping(data, where)
        version = _req(d, "format_version", where)
        parse_format_version(version, f"{where}.format_version")
        parse_str(_req(d, "node", where), f"{where}.node", ("module",))
        raw = _req(d, "input_shape", where)
        if not isinstance(raw, list | tuple) or not raw:
            raise _fail(f"{where}.input_shape", "expected a non-empty list of integers")
        kind = parse_str(_req(d, "kind", where), f"{where}.kind", MODULE_KINDS)
        act = None
        if kind == "activation":
            act = Activation.from_dict(_req(d, "activation", where), f"{where}.activation")
            if not act.has_mask:
                raise _fail(f"{where}.activation.kind", "must be a kind with states "
                                                        f"({', '.join(STATE_ACTIVATIONS)})")
        return cls(name=parse_layer_name(_req(d, "name", where), f"{where}.name"),
                   kind=kind,
                   input_shape=tuple(parse_int(v, f"{where}.input_shape[{i}]", 1)
                                     for i, v in enumerate(raw)),
                   format_version=str(version), activation=act)


@dataclass(frozen=True)
class ProbeUnits:
    """Which columns of the probe configuration belong to which layer (network order)."""

    layers: tuple[str, ...]
    counts: tuple[int, ...]

    @property
    def total(self) -> int:
        return sum(self.counts)

    def offsets(self) -> tuple[int, ...]:
        out, acc = [], 0
        for c in self.counts:
            out.append(acc)
            acc += c
        return tuple(out)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "node": "probe",
            "units": [{"layer": n, "count": c} for n, c in zip(self.layers, self.counts,
                                                               strict=True)],
        }

    @classmethod
    def from_dict(cls, data: object, where: str = "probe attributes") -> ProbeUnits:
        d = parse_mapping(data, where)
        parse_format_version(_req(d, "format_version", where), f"{where}.format_version")
        parse_str(_req(d, "node", where), f"{where}.node", ("probe",))
        units = _req(d, "units", where)
        if not isinstance(units, list):
            raise _fail(f"{where}.units", "expected a list")
        names, counts = [], []
        for i, u in enumerate(units):
            m = parse_mapping(u, f"{where}.units[{i}]")
            names.append(parse_layer_name(_req(m, "layer", f"{where}.units[{i}]"),
                                          f"{where}.units[{i}].layer"))
            counts.append(parse_int(_req(m, "count", f"{where}.units[{i}]"),
                                    f"{where}.units[{i}].count", 1))
        return cls(tuple(names), tuple(counts))


def node_attrs(attrs: Mapping[str, Any], where: str) -> Mapping[str, Any]:
    """The ``ntrace`` sub-document of a node's attributes, or a precise error."""
    if ATTR_KEY not in attrs:
        raise _fail(where, f"no {ATTR_KEY!r} attribute: this is not an ntrace node")
    return parse_mapping(attrs[ATTR_KEY], f"{where} '{ATTR_KEY}'")
