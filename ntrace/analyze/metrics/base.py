"""What every exploration metric plugin is given and must provide.

``A_n`` is the (probe point q × hidden unit u) 0/1 matrix of snapshot n, stored bit-packed
along units (``probe/config``, LSB first, zero pad bits). A metric reads it through
:class:`Configs` (rows of snapshots, or all snapshots for a range of unit bytes), never
holding more than about ``block_bytes``, and is computed in *parts* (ranges of snapshots or
of unit bytes) that combine exactly into the whole: in process one part covers everything,
on Dask each part is a task (:mod:`ntrace.analyze.graph`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import xarray as xr

from ntrace.analyze.options import AnalysisOptions
from ntrace.errors import UsageError
from ntrace.format.reader import Trace

Reader = Callable[[int, int], np.ndarray]
"""``read(k0, k1)`` → packed configurations of snapshots [k0, k1): (b, probe, unit_byte)."""

Part = tuple[int, int]
"""A half-open range of snapshots or of unit bytes, as the metric defines."""

_TABLE = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def popcount(words: np.ndarray) -> np.ndarray:
    """Set bits of each uint64 word (``np.bitwise_count`` on numpy ≥ 2, a byte table else)."""
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(words)
    b = words.view(np.uint8).reshape(*words.shape, 8)
    return _TABLE[b].sum(-1, dtype=np.uint8)


def to_words(packed: np.ndarray) -> np.ndarray:
    """(..., nbytes) uint8 → (..., ceil(nbytes/8)) uint64, zero padded (pad bits are 0)."""
    packed = np.ascontiguousarray(packed, dtype=np.uint8)
    nb = packed.shape[-1]
    pad = (-nb) % 8
    if pad:
        widths = [(0, 0)] * (packed.ndim - 1) + [(0, pad)]
        packed = np.pad(packed, widths)
    return packed.view("<u8")


def check(snapshots: int, block_bytes: int) -> None:
    if snapshots < 1:
        raise UsageError(f"exploration needs at least one snapshot, found {snapshots}")
    if block_bytes < 1:
        raise UsageError(f"block_bytes must be positive, found {block_bytes}")


def snapshot_part(what: str, part: Part | None, snapshots: int) -> Part:
    """``part`` (the whole [0, snapshots) when None), refused outside [0, snapshots]."""
    lo, hi = part if part is not None else (0, snapshots)
    if not 0 <= lo <= hi <= snapshots:
        raise UsageError(f"part ({lo}, {hi}) of the {what} lies outside [0, {snapshots}]")
    return lo, hi


def even_ranges(weights: Sequence[float], parts: int) -> list[Part]:
    """Consecutive index ranges of ``weights`` with about equal sums, at most ``parts``."""
    n = len(weights)
    if n == 0:
        return []
    cum = np.cumsum(np.asarray(weights, dtype=np.float64))
    cuts = {0, n}
    for k in range(1, max(1, min(parts, n))):
        cuts.add(int(np.searchsorted(cum, cum[-1] * k / parts)) + 1)
    edges = sorted(c for c in cuts if 0 <= c <= n)
    return [(a, b) for a, b in zip(edges[:-1], edges[1:], strict=True) if b > a]


@dataclass(frozen=True)
class Probe:
    """The shape of the committed probe configurations: a small descriptor tasks carry."""

    snapshots: int  # K committed snapshots
    points: int  # Q probe points
    units: int  # M hidden units
    unit_bytes: int  # packed bytes per (snapshot, probe point)

    @property
    def bits(self) -> int:
        """Probe points × units: the largest possible distance between configurations."""
        return self.points * self.units

    @classmethod
    def of(cls, trace: Trace) -> Probe | None:
        """The trace's probe, or None without one or with fewer than 2 snapshots."""
        units = trace.probe_units
        K = trace.snapshots
        if units is None or not trace.has("probe/config") or K < 2:
            return None
        shape = trace.zarr_array("probe/config").shape
        return cls(K, int(shape[1]), units.total, int(shape[2]))


@dataclass(frozen=True)
class Configs:
    """Readers of the packed configurations of snapshots [0, K): ``rows(k0, k1)`` the
    snapshots [k0, k1), ``units(b0, b1)`` unit bytes [b0, b1) of every snapshot
    (K, probe, b1 − b0)."""

    rows: Reader
    units: Reader

    @classmethod
    def of(cls, trace: Trace, snapshots: int) -> Configs:
        arr = trace.zarr_array("probe/config")

        def rows(k0: int, k1: int) -> np.ndarray:
            return trace.read("probe/config", slice(k0, k1))

        def units(b0: int, b1: int) -> np.ndarray:
            return np.asarray(arr[:snapshots, :, b0:b1])

        return cls(rows, units)


class Metric(ABC):
    """One exploration metric: how it is cut into parts, what a part computes (in process
    or in a Dask task: a picklable result, best a numpy array), how the parts' results
    combine (exactly: minima, integer sums, concatenation) and what lands in the results
    Dataset. Instances are stateless, so tasks can carry them."""

    name: ClassVar[str]
    """Short name, unique among the metrics: it labels the metric's tasks."""

    @abstractmethod
    def parts(self, probe: Probe, opts: AnalysisOptions, tasks: int) -> list[Part]:
        """About ``tasks`` parts covering the metric (one part when ``tasks`` is 1)."""

    @abstractmethod
    def compute(self, configs: Configs, probe: Probe, part: Part, opts: AnalysisOptions
                ) -> Any:
        """The result of one part."""

    @abstractmethod
    def combine(self, probe: Probe, results: list[Any], opts: AnalysisOptions) -> Any:
        """The whole from the results of :meth:`parts`, in their order."""

    @abstractmethod
    def variables(self, probe: Probe, value: Any) -> dict[str, xr.Variable]:
        """Variables of the results Dataset (dimensions ``snapshot``, ``probe``, ``unit``
        or a ``*_rank`` of a sorted curve, whose coordinates the exploration supplies)."""

    def attrs(self, value: Any) -> dict[str, Any]:
        """Entries of the Dataset's ``exploration`` attribute (how it was computed)."""
        del value
        return {}


class SnapshotPassMetric(Metric):
    """A metric computed in one cheap pass over consecutive snapshots: its parts are snapshot
    ranges, half as many as the costlier metrics get."""

    def parts(self, probe: Probe, opts: AnalysisOptions, tasks: int) -> list[Part]:
        return even_ranges([1.0] * probe.snapshots, max(1, tasks // 2))
