"""What one round of a trace holds, as the writer takes it: a round's Taylor data (per
tracked layer and module), a probe snapshot, and the fixed probe set. Arrays whose
shapes follow spec/taylor-trace.md section 3; ``TraceWriter.write_round`` checks them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from ntrace.format.bits import pack
from ntrace.format.metadata import ProbeUnits

Array = Any  # a torch tensor while recording (device, then host), a numpy array for the writer


@dataclass
class LayerRound:
    """One tracked layer's data for one Taylor round (s = recorded samples, p = outputs).

    The one per-layer record: the recorder fills it with tensors, the writer thread maps them
    to numpy (:meth:`map`) and the writer stores each field as the array of the same name
    (``LAYER_FIELDS``). ``mask``/``mask_high`` hold states (s, neuron) as booleans, which the
    writer packs (:meth:`TaylorRound.packed`), or already packed uint8 (s, neuron_byte)."""

    weight: Array  # (neuron, in_feature)
    input: Array  # (s, in_feature)
    bias: Array | None = None  # (neuron,)
    jacobian: Array | None = None  # (s, p, tracked, *positions)
    mask: Array | None = None  # (s, neuron): a > threshold (packed on disk)
    mask_high: Array | None = None  # hardtanh only: a >= max_val (packed on disk)
    slope: Array | None = None  # prelu only: (num_parameters,)
    gradient_error: Array | None = None  # () BatchNorm approximation only (spec 3.4)

    def map(self, fn: Callable[[str, Array], Array]) -> LayerRound:
        """The same record with ``fn(field, value)`` applied to every field that is given."""
        return replace(self, **{f: fn(f, v) for f in LAYER_FIELDS
                                if (v := getattr(self, f)) is not None})


# the arrays of ``layers/<name>/`` a LayerRound becomes (spec section 3.2), one per field
LAYER_FIELDS = ("weight", "bias", "input", "jacobian", "mask", "mask_high", "slope",
                "gradient_error")
PACKED_FIELDS = frozenset({"mask", "mask_high"})  # bit-packed on disk (spec section 4)


@dataclass
class TaylorRound:
    """The Taylor data of one recorded round; arrays as in :class:`LayerRound`. Module states
    are booleans (s, unit) or packed uint8 (s, unit_byte)."""

    round_index: int
    sample_index: Array  # (s,) int64
    sample_loss: Array  # (s,)
    output: Array  # (s, p)
    target: Array  # (s, p) float or (s,) int
    layers: dict[str, LayerRound] = field(default_factory=dict)
    modules: dict[str, Array] = field(default_factory=dict)  # name → states (s, unit)

    def map(self, fn: Callable[[str, Array], Array]) -> TaylorRound:
        """The same round with ``fn(field, value)`` applied to every array."""
        return replace(
            self, **{f: fn(f, getattr(self, f)) for f in SAMPLE_FIELDS},
            layers={name: lr.map(fn) for name, lr in self.layers.items()},
            modules={name: fn("state", v) for name, v in self.modules.items()})

    def packed(self) -> TaylorRound:
        """Numpy arrays, with boolean states bit-packed as the trace stores them."""
        def one(f: str, v: Array) -> np.ndarray:
            v = np.asarray(v)
            return pack(v) if v.dtype == np.bool_ and f in PACKED_FIELDS | {"state"} else v

        return self.map(one)

    def arrays(self) -> dict[str, Array]:
        """Every array path of the trace this round writes a row of, with that row."""
        out: dict[str, Array] = {f"taylor/{f}": getattr(self, f) for f in SAMPLE_FIELDS}
        for name, lr in self.layers.items():
            out.update({f"layers/{name}/{f}": getattr(lr, f) for f in LAYER_FIELDS})
        out.update({f"modules/{name}/state": v for name, v in self.modules.items()})
        return out


SAMPLE_FIELDS = ("sample_index", "sample_loss", "output", "target")  # taylor/ arrays


@dataclass
class Snapshot:
    """The packed activation configuration of the probe set at one round."""

    round_index: int
    config: np.ndarray  # (probe, unit_byte) uint8


@dataclass(frozen=True)
class ProbeSetup:
    """The fixed probe set and the hidden units whose states it records."""

    sample_index: np.ndarray  # (probe,) int64
    input: np.ndarray  # (probe, feature) float32
    units: ProbeUnits
