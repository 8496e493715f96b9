"""Exploration (b): per probe point, state switches between consecutive snapshots ÷ possible
switches ((snapshots − 1) × units), counted on the packed words. Parts are snapshot ranges;
their integer counts add up."""

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
    popcount,
    snapshot_part,
    to_words,
)
from ntrace.analyze.options import AnalysisOptions
from ntrace.analyze.results import var
from ntrace.errors import UsageError


def switch_counts(read: Reader, snapshots: int, block_bytes: int = 32 << 20,
                  part: Part | None = None) -> np.ndarray:
    """(b) numerator: per probe point, state switches between consecutive snapshots.

    With ``part = (k0, k1)`` only the switches into snapshots [k0, k1) are counted (snapshot
    k0 − 1 is read too); the counts of the parts of [0, snapshots) add up to the whole."""
    check(snapshots, block_bytes)
    k_lo, k_hi = snapshot_part("switch count", part, snapshots)
    first = read(0, 1)
    counts = np.zeros(first.shape[1], dtype=np.int64)
    prev = to_words(read(k_lo - 1, k_lo)) if k_lo > 0 else None
    per = max(1, block_bytes // max(1, first.nbytes * 3))
    for k0 in range(k_lo, k_hi, per):
        cur = to_words(read(k0, min(k0 + per, k_hi)))  # (b, q, w)
        seq = cur if prev is None else np.concatenate([prev, cur])
        if len(seq) > 1:
            x = np.bitwise_xor(seq[1:], seq[:-1])
            counts += popcount(x).sum(axis=(0, 2), dtype=np.int64)
        prev = cur[-1:]
    return counts


def _fraction(counts: np.ndarray, snapshots: int, units: int) -> np.ndarray:
    return counts / float((snapshots - 1) * units)


def switch_fraction(read: Reader, snapshots: int, units: int,
                    block_bytes: int = 32 << 20) -> np.ndarray:
    """(b): switches ÷ ((snapshots − 1) × units) per probe point (unsorted)."""
    if snapshots < 2:
        raise UsageError("switch fractions need at least 2 snapshots")
    return _fraction(switch_counts(read, snapshots, block_bytes), snapshots, units)


def switch_fraction_dense(A: np.ndarray) -> np.ndarray:
    """(b) on an unpacked bool array (snapshot, probe, unit): the reference."""
    K, _, M = A.shape
    return (A[1:] != A[:-1]).sum(axis=(0, 2)) / float((K - 1) * M)


class SwitchFraction(SnapshotPassMetric):
    name = "switch"

    def compute(self, configs: Configs, probe: Probe, part: Part, opts: AnalysisOptions
                ) -> np.ndarray:
        return switch_counts(configs.rows, probe.snapshots, opts.block_bytes, part)

    def combine(self, probe: Probe, results: list[np.ndarray], opts: AnalysisOptions
                ) -> np.ndarray:
        return _fraction(np.sum(results, axis=0), probe.snapshots, probe.units)

    def variables(self, probe: Probe, value: np.ndarray) -> dict[str, xr.Variable]:
        return {
            "switch_fraction": var("probe", value, "activation switches over all snapshots / "
                                   "possible switches, per probe point"),
            "switch_fraction_sorted": var("probe_rank", np.sort(value)[::-1],
                                          "switch_fraction sorted, largest first"),
        }
