"""Exploration of activation configurations (paper section 3.3), from packed probe states.

The measures are plugins, one module each, listed in :data:`ntrace.analyze.metrics.METRICS`
(among them: (a) the Hamming distance of each snapshot to the nearest earlier configuration,
(b) switches per probe point, (c) per-unit log-volumes). This module holds their combined
results with the coordinates they share, and the public names of the paper's three kernels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import xarray as xr

from ntrace.analyze.metrics.base import Configs, Metric, Probe, popcount, to_words
from ntrace.analyze.metrics.distance import (
    distance_rows,
    min_previous_distance,
    min_previous_distance_dense,
)
from ntrace.analyze.metrics.switches import switch_counts, switch_fraction, switch_fraction_dense
from ntrace.analyze.metrics.volume import LogVolume, log_volume, log_volume_bytes, log_volume_dense
from ntrace.analyze.results import var
from ntrace.format.reader import Trace

__all__ = [
    "Configs",
    "Exploration",
    "LogVolume",
    "Probe",
    "distance_rows",
    "log_volume",
    "log_volume_bytes",
    "log_volume_dense",
    "min_previous_distance",
    "min_previous_distance_dense",
    "popcount",
    "switch_counts",
    "switch_fraction",
    "switch_fraction_dense",
    "to_words",
]


@dataclass(frozen=True)
class Exploration:
    """The metrics measured over snapshots [0, K) and their combined results (``values``,
    by metric name)."""

    probe: Probe
    metrics: tuple[Metric, ...]
    values: dict[str, Any]
    snapshot_round: np.ndarray  # (snapshot,)
    unit_layer: np.ndarray  # (unit,) position in ``unit_layer_names``
    unit_index: np.ndarray  # (unit,) neuron index within its layer
    unit_layer_names: tuple[str, ...]  # the probe's layers (spec: probe units)

    @classmethod
    def of(cls, trace: Trace, probe: Probe, metrics: tuple[Metric, ...],
           values: dict[str, Any]) -> Exploration:
        """The results ``values`` of ``metrics`` with the coordinates read from ``trace``."""
        units = trace.probe_units
        assert units is not None
        lay = np.concatenate([np.full(c, i) for i, c in enumerate(units.counts)])
        idx = np.concatenate([np.arange(c) for c in units.counts])
        rounds = trace.read("probe/round_index", slice(0, probe.snapshots)).astype(np.int64)
        return cls(probe, metrics, values, rounds, lay, idx, units.layers)

    def variables(self) -> tuple[dict[str, xr.Variable], dict[str, xr.Variable],
                                 dict[str, Any]]:
        """Data variables, coordinates and the ``exploration`` attribute of the results."""
        coords = {
            "snapshot_round": var("snapshot", self.snapshot_round, "training round of the "
                                  "snapshot"),
            "unit_layer": var("unit", np.asarray(self.unit_layer_names, dtype=str)[
                self.unit_layer], "layer of the hidden unit"),
            "unit_index": var("unit", self.unit_index, "neuron index within its layer"),
        }
        data: dict[str, xr.Variable] = {}
        attrs: dict[str, Any] = {}
        for m in self.metrics:
            data.update(m.variables(self.probe, self.values[m.name]))
            attrs.update(m.attrs(self.values[m.name]))
        return data, coords, attrs
