"""Exploration (a): for each snapshot n ≥ 1, ``min_{k<n} ‖A_n − A_k‖²_F``, the Hamming
distance to the nearest earlier configuration (XOR + popcount on 64-bit words, blocked
pairwise, never unpacked). Parts are ranges of row blocks, cut so each compares about as many
pairs; their results concatenate."""

from __future__ import annotations

import math

import numpy as np
import xarray as xr

from ntrace.analyze.metrics.base import (
    Configs,
    Metric,
    Part,
    Probe,
    Reader,
    check,
    even_ranges,
    popcount,
    to_words,
)
from ntrace.analyze.options import AnalysisOptions
from ntrace.analyze.results import var
from ntrace.errors import UsageError


def _pairwise(a: np.ndarray, b: np.ndarray, chunk: int) -> np.ndarray:
    """Hamming distances between rows of word matrices a (n, W) and b (m, W)."""
    out = np.zeros((a.shape[0], b.shape[0]), dtype=np.int64)
    for w0 in range(0, a.shape[1], chunk):
        x = np.bitwise_xor(a[:, None, w0:w0 + chunk], b[None, :, w0:w0 + chunk])
        out += popcount(x).sum(-1, dtype=np.int64)
    return out


def distance_rows(words: int, snapshots: int, block_bytes: int) -> int:
    """Snapshots per row block of :func:`min_previous_distance` for configurations of
    ``words`` 64-bit words; parts of the pass must start at multiples of it."""
    chunk = max(1, min(words, (block_bytes // 8) // 64))
    return max(1, min(snapshots, int(math.sqrt(block_bytes / (8 * min(words, chunk))))))


def min_previous_distance(read: Reader, snapshots: int, block_bytes: int = 32 << 20,
                          part: Part | None = None) -> np.ndarray:
    """(a): ``min_{k<n} ‖A_n − A_k‖²_F`` for every snapshot n (−1 for n = 0).

    With ``part = (n0, n1)`` only snapshots [n0, n1) are computed and returned (n0 a multiple
    of :func:`distance_rows`); the parts of a split pass give exactly the whole pass."""
    check(snapshots, block_bytes)
    n_lo, n_hi = part if part is not None else (0, snapshots)
    out = np.full(n_hi - n_lo, -1, dtype=np.int64)
    if snapshots < 2 or n_hi <= n_lo:
        return out
    first = to_words(read(0, 1)).reshape(1, -1)
    W = first.shape[1]
    chunk = max(1, min(W, (block_bytes // 8) // 64))
    rows = distance_rows(W, snapshots, block_bytes)
    if n_lo % rows or not 0 <= n_lo < n_hi <= snapshots:
        raise UsageError(f"part ({n_lo}, {n_hi}) of the distance pass must start at a multiple "
                         f"of {rows} snapshots and lie within [0, {snapshots}]")
    cache: dict[int, np.ndarray] = {}
    cached = 0

    def keep(start: int, blk: np.ndarray) -> None:
        nonlocal cached
        if start not in cache and cached + blk.nbytes <= 4 * block_bytes:
            cache[start] = blk
            cached += blk.nbytes

    for n0 in range(n_lo, n_hi, rows):
        n1 = min(n0 + rows, n_hi)
        cur = to_words(read(n0, n1)).reshape(n1 - n0, -1)
        best = np.full(n1 - n0, np.iinfo(np.int64).max)
        for k0 in range(0, n0, rows):
            prev = cache.get(k0)
            if prev is None:
                prev = to_words(read(k0, min(k0 + rows, n0))).reshape(-1, W)
                keep(k0, prev)
            best = np.minimum(best, _pairwise(cur, prev, chunk).min(1))
        d = _pairwise(cur, cur, chunk)
        d[np.triu_indices(n1 - n0)] = np.iinfo(np.int64).max
        best = np.minimum(best, d.min(1))
        out[n0 - n_lo:n1 - n_lo] = best
        keep(n0, cur)
    if n_lo == 0:
        out[0] = -1
    return out


def min_previous_distance_dense(A: np.ndarray) -> np.ndarray:
    """(a) on an unpacked bool array (snapshot, probe, unit): the reference."""
    K = A.shape[0]
    flat = A.reshape(K, -1)
    out = np.full(K, -1, dtype=np.int64)
    for n in range(1, K):
        out[n] = int((flat[:n] != flat[n]).sum(1).min())
    return out


class MinDistance(Metric):
    name = "distance"

    def parts(self, probe: Probe, opts: AnalysisOptions, tasks: int) -> list[Part]:
        """Whole row blocks; block i compares i + 1 blocks, so cut on that weight."""
        K = probe.snapshots
        rows = distance_rows(probe.points * math.ceil(probe.unit_bytes / 8), K,
                             opts.block_bytes)
        n_blk = math.ceil(K / rows)
        return [(a * rows, min(b * rows, K))
                for a, b in even_ranges([i + 1 for i in range(n_blk)], tasks)]

    def compute(self, configs: Configs, probe: Probe, part: Part, opts: AnalysisOptions
                ) -> np.ndarray:
        return min_previous_distance(configs.rows, probe.snapshots, opts.block_bytes, part)

    def combine(self, probe: Probe, results: list[np.ndarray], opts: AnalysisOptions
                ) -> np.ndarray:
        return np.concatenate(results)

    def variables(self, probe: Probe, value: np.ndarray) -> dict[str, xr.Variable]:
        frac = np.where(value >= 0, value / max(probe.bits, 1), np.nan)
        return {
            "min_distance": var("snapshot", value, "min_{k<n} ||A_n - A_k||_F^2 (Hamming "
                                "distance to the nearest earlier configuration; -1 at n=0)"),
            "min_distance_fraction": var("snapshot", frac, "min_distance / (probe x units)"),
        }
