"""The array layout of format 1.x: every array's path, dimension names and dtype.

This module is the single source of truth that the writer, the reader and the validator
share; ``spec/taylor-trace.md`` describes the same table in prose. Shapes are given without
the leading append dimension (``round``, ``taylor_round`` or ``snapshot``) where there is one.
"""

from __future__ import annotations

from dataclasses import dataclass

from ntrace.format.bits import packed_length
from ntrace.format.metadata import LayerAttrs, TraceAttrs

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
    if attrs.loss.id == "cross_entropy":
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


def layer_arrays(attrs: TraceAttrs, layer: LayerAttrs, tracked: int) -> list[ArrayLayout]:
    """Arrays of group ``layers/<name>``; ``tracked`` is the number of tracked neurons."""
    g = f"layers/{layer.name}"
    s, p = attrs.sampling.samples_per_round, attrs.output_size
    n, d = layer.out_features, layer.in_features
    out = [
        ArrayLayout(f"{g}/tracked", ("tracked",), "int64", (tracked,), "int"),
        ArrayLayout(f"{g}/weight", (TAYLOR, "neuron", "in_feature"), "float32", (n, d)),
    ]
    if layer.bias:
        out.append(ArrayLayout(f"{g}/bias", (TAYLOR, "neuron"), "float32", (n,)))
    out.append(ArrayLayout(f"{g}/input", (TAYLOR, "sample", "in_feature"), "float32", (s, d)))
    if layer.jacobian == "stored":
        out.append(ArrayLayout(f"{g}/jacobian", (TAYLOR, "sample", "output_unit", "tracked"),
                               "float32", (s, p, tracked)))
    if layer.activation.has_mask:
        out.append(ArrayLayout(f"{g}/mask", (TAYLOR, "sample", "neuron_byte"), "uint8",
                               (s, packed_length(n)), "bits"))
    return out


def probe_arrays(probe_size: int, features: int, units: int) -> list[ArrayLayout]:
    return [
        ArrayLayout("probe/sample_index", ("probe",), "int64", (probe_size,), "int"),
        ArrayLayout("probe/input", ("probe", "feature"), "float32", (probe_size, features)),
        ArrayLayout("probe/round_index", (SNAPSHOT,), "int64", (), "int"),
        ArrayLayout("probe/config", (SNAPSHOT, "probe", "unit_byte"), "uint8",
                    (probe_size, packed_length(units)), "bits"),
    ]


COMMIT_FIELD = {ROUND: "rounds", TAYLOR: "taylor_rounds", SNAPSHOT: "snapshots"}
