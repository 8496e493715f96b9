"""The array layout of format 1.x: every array's path, dimension names and dtype.

This module is the single source of truth that the writer, the reader and the validator
share; ``spec/taylor-trace.md`` describes the same table in prose. Shapes are given without
the leading append dimension (``round``, ``taylor_round`` or ``snapshot``) where there is one.
"""

from __future__ import annotations

from dataclasses import dataclass

from ntrace.format.bits import packed_length
from ntrace.format.metadata import CLASS_TARGET_LOSSES, LayerAttrs, ModuleAttrs, TraceAttrs

ROUND, TAYLOR, SNAPSHOT = "round", "taylor_round", "snapshot"
APPEND_DIMS = (ROUND, TAYLOR, SNAPSHOT)


@dataclass(frozen=True)
class ArrayLayout:
    """One array: ``path`` from the trace root, ``dims`` (all of them), ``dtype`` and the
    fixed part of its shape (``shape[1:]`` when ``dims[0]`` is an append dimension)."""

    path: str
    dims: tuple[str, ...]
    dtype: str
    tail: tuple[int, ...]
    kind: str = "float"  # float | int | bits: selects the codec chain

    @property
    def append_dim(self) -> str | None:
        return self.dims[0] if self.dims and self.dims[0] in APPEND_DIMS else None

    @property
    def per_sample(self) -> bool:
        """True for arrays with one row per recorded sample (``taylor_round, sample, ...``):
        under multi-process recording each process writes its own block of that axis."""
        return len(self.dims) > 1 and self.dims[0] == TAYLOR and self.dims[1] == "sample"

    def shape(self, length: int | None = None) -> tuple[int, ...]:
        if self.append_dim is None:
            return self.tail
        assert length is not None
        return (length, *self.tail)


def root_arrays() -> list[ArrayLayout]:
    return [ArrayLayout("loss", (ROUND,), "float32", ())]


def taylor_arrays(attrs: TraceAttrs) -> list[ArrayLayout]:
    s = attrs.sampling.samples_per_round
    p = attrs.output_size
    if attrs.loss.id in CLASS_TARGET_LOSSES:
        target = ArrayLayout("taylor/target", (TAYLOR, "sample"), "int64", (s,), "int")
    else:
        target = ArrayLayout("taylor/target", (TAYLOR, "sample", "output_unit"), "float32", (s, p))
    return [
        ArrayLayout("taylor/round_index", (TAYLOR,), "int64", (), "int"),
        ArrayLayout("taylor/sample_index", (TAYLOR, "sample"), "int64", (s,), "int"),
        ArrayLayout("taylor/sample_loss", (TAYLOR, "sample"), "float32", (s,)),
        ArrayLayout("taylor/output", (TAYLOR, "sample", "output_unit"), "float32", (s, p)),
        target,
    ]


def _axes(prefix: str, n: int) -> tuple[str, ...]:
    return tuple(f"{prefix}{i}" for i in range(n))


def layer_arrays(attrs: TraceAttrs, layer: LayerAttrs, tracked: int) -> list[ArrayLayout]:
    """Arrays of group ``layers/<name>``; ``tracked`` is the number of tracked neurons."""
    g = f"layers/{layer.name}"
    s, p = attrs.sampling.samples_per_round, attrs.output_size
    geo = layer.shape
    n = geo.output_shape[0]
    k = len(geo.positions)
    if layer.kind == "linear":  # 1.3: on (*positions, in_feature) inputs
        w_dims: tuple[str, ...] = ("neuron", "in_feature")
        x_dims: tuple[str, ...] = (*_axes("x", k), "in_feature")
    elif layer.kind == "conv":
        w_dims = ("neuron", "group_channel", *_axes("k", k))
        x_dims = ("in_channel", *_axes("x", k))
    elif layer.kind == "conv_transpose":
        w_dims = ("in_channel", "group_neuron", *_axes("k", k))
        x_dims = ("in_channel", *_axes("x", k))
    else:  # embedding: input holds indices, one per position
        w_dims = ("vocabulary", "neuron")
        x_dims = _axes("x", len(geo.input_shape))
    x_kind, x_dtype = ("int", "int64") if layer.kind == "embedding" else ("float", "float32")
    out = [
        ArrayLayout(f"{g}/tracked", ("tracked",), "int64", (tracked,), "int"),
        ArrayLayout(f"{g}/weight", (TAYLOR, *w_dims), "float32", geo.weight_shape),
    ]
    if layer.bias:
        out.append(ArrayLayout(f"{g}/bias", (TAYLOR, "neuron"), "float32", (n,)))
    out.append(ArrayLayout(f"{g}/input", (TAYLOR, "sample", *x_dims), x_dtype,
                           (s, *geo.input_shape), x_kind))
    if layer.jacobian == "stored":
        out.append(ArrayLayout(f"{g}/jacobian",
                               (TAYLOR, "sample", "output_unit", "tracked", *_axes("y", k)),
                               "float32", (s, p, tracked, *geo.positions)))
    act = layer.activation
    if act.has_mask:
        packed = (s, packed_length(geo.units))
        out.append(ArrayLayout(f"{g}/mask", (TAYLOR, "sample", "neuron_byte"), "uint8", packed,
                               "bits"))
        if act.kind == "hardtanh":
            out.append(ArrayLayout(f"{g}/mask_high", (TAYLOR, "sample", "neuron_byte"), "uint8",
                                   packed, "bits"))
        if act.kind == "prelu":
            out.append(ArrayLayout(f"{g}/slope", (TAYLOR, "slope"), "float32",
                                   (int(act.num_parameters or 1),)))
    if attrs.batchnorm is not None:  # 1.3: the measured error of the approximation
        out.append(ArrayLayout(f"{g}/gradient_error", (TAYLOR,), "float32", ()))
    return out


def module_arrays(attrs: TraceAttrs, module: ModuleAttrs) -> list[ArrayLayout]:
    """Arrays of group ``modules/<name>``: the per-sample state of a max-pool or dropout."""
    s = attrs.sampling.samples_per_round
    return [ArrayLayout(f"modules/{module.name}/state", (TAYLOR, "sample", "unit_byte"), "uint8",
                        (s, packed_length(module.units)), "bits")]


def probe_arrays(probe_size: int, features: int, units: int) -> list[ArrayLayout]:
    return [
        ArrayLayout("probe/sample_index", ("probe",), "int64", (probe_size,), "int"),
        ArrayLayout("probe/input", ("probe", "feature"), "float32", (probe_size, features)),
        ArrayLayout("probe/round_index", (SNAPSHOT,), "int64", (), "int"),
        ArrayLayout("probe/config", (SNAPSHOT, "probe", "unit_byte"), "uint8",
                    (probe_size, packed_length(units)), "bits"),
    ]


COMMIT_FIELD = {ROUND: "rounds", TAYLOR: "taylor_rounds", SNAPSHOT: "snapshots"}
