"""Exploration (d): for each snapshot n, the fraction of hidden units whose state has ever
changed by then, at any probe point: units u with ``A_k[q, u] ≠ A_0[q, u]`` for some k ≤ n
and some q (0 at n = 0, never decreasing). Each part (a snapshot range) finds, per unit, the
first snapshot in its range where the unit's states differ from snapshot 0 (XOR against
snapshot 0, OR over probe points, on the packed bytes); the parts combine by a minimum."""

from __future__ import annotations

import numpy as np
import xarray as xr

from ntrace.analyze.metrics.base import (
    Configs,
    Part,
    Probe,
    Reader,
    SnapshotPassMetric,
    check,
    snapshot_part,
)
from ntrace.analyze.options import AnalysisOptions
from ntrace.analyze.results import var


def first_changes(read: Reader, snapshots: int, units: int, block_bytes: int = 32 << 20,
                  part: Part | None = None) -> np.ndarray:
    """Per unit, the first snapshot of ``part`` (default all) whose states of the unit
    differ from snapshot 0 at some probe point; ``snapshots`` where none does."""
    check(snapshots, block_bytes)
    k_lo, k_hi = snapshot_part("first changes", part, snapshots)
    first = read(0, 1)  # (1, q, unit_byte)
    out = np.full(units, snapshots, dtype=np.int64)
    per = max(1, block_bytes // max(1, 2 * first.nbytes + 8 * first.shape[2]))
    for k0 in range(k_lo, k_hi, per):
        k1 = min(k0 + per, k_hi)
        differ = np.bitwise_or.reduce(np.bitwise_xor(read(k0, k1), first), axis=1)
        changed = np.unpackbits(differ, axis=-1, bitorder="little")[:, :units].astype(bool)
        new = changed.any(0) & (out == snapshots)
        out[new] = k0 + changed.argmax(0)[new]
    return out


def _fraction(first: np.ndarray, snapshots: int) -> np.ndarray:
    """(snapshot,) fraction of units whose first change is at or before each snapshot."""
    counts = np.bincount(first[first < snapshots], minlength=snapshots)
    return np.cumsum(counts) / float(len(first))


def changed_unit_fraction(read: Reader, snapshots: int, units: int,
                          block_bytes: int = 32 << 20) -> np.ndarray:
    """(d) for every snapshot."""
    return _fraction(first_changes(read, snapshots, units, block_bytes), snapshots)


def changed_unit_fraction_dense(A: np.ndarray) -> np.ndarray:
    """(d) on an unpacked bool array (snapshot, probe, unit): the reference."""
    differs = (A != A[:1]).any(axis=1)  # (snapshot, unit)
    return np.logical_or.accumulate(differs, axis=0).mean(axis=1)


class ChangedUnits(SnapshotPassMetric):
    name = "changed"

    def compute(self, configs: Configs, probe: Probe, part: Part, opts: AnalysisOptions
                ) -> np.ndarray:
        return first_changes(configs.rows, probe.snapshots, probe.units, opts.block_bytes,
                             part)

    def combine(self, probe: Probe, results: list[np.ndarray], opts: AnalysisOptions
                ) -> np.ndarray:
        return _fraction(np.minimum.reduce(results), probe.snapshots)

    def variables(self, probe: Probe, value: np.ndarray) -> dict[str, xr.Variable]:
        return {"changed_unit_fraction": var(
            "snapshot", value, "fraction of hidden units whose state at some probe point has "
            "changed since snapshot 0, by snapshot n (0 at n=0)")}
