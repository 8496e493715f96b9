"""What one round of a trace holds, as the writer takes it: a round's Taylor data (per
tracked layer and module), a probe snapshot, and the fixed probe set. Plain numpy arrays whose
shapes follow spec/taylor-trace.md section 3; ``TraceWriter.write_round`` checks them."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ntrace.format.metadata import ProbeUnits


@dataclass
class LayerRound:
    """One tracked layer's data for one Taylor round (s = recorded samples, p = outputs)."""

    weight: np.ndarray  # (neuron, in_feature)
    input: np.ndarray  # (s, in_feature)
    bias: np.ndarray | None = None  # (neuron,)
    jacobian: np.ndarray | None = None  # (s, p, tracked, *positions)
    mask: np.ndarray | None = None  # (s, neuron_byte) packed uint8
    mask_high: np.ndarray | None = None  # hardtanh only: a >= max_val, packed
    slope: np.ndarray | None = None  # prelu only: (num_parameters,)


LAYER_FIELDS = ("weight", "bias", "input", "jacobian", "mask", "mask_high", "slope")


@dataclass
class TaylorRound:
    """The Taylor data of one recorded round."""

    round_index: int
    sample_index: np.ndarray  # (s,) int64
    sample_loss: np.ndarray  # (s,)
    output: np.ndarray  # (s, p)
    target: np.ndarray  # (s, p) float or (s,) int
    layers: dict[str, LayerRound] = field(default_factory=dict)
    modules: dict[str, np.ndarray] = field(default_factory=dict)  # name → packed (s, unit_byte)


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
