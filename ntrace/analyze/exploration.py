"""Exploration of activation configurations (paper section 3.3), from packed probe states.

``A_n`` is the (probe point q × hidden unit u) 0/1 matrix of snapshot n, stored bit-packed
along units (``probe/config``, LSB first, zero pad bits). Three measures:

(a) for each snapshot n ≥ 1, ``min_{k<n} ‖A_n − A_k‖²_F``: the Hamming distance to the
    nearest earlier configuration (XOR + popcount on 64-bit words, blocked pairwise);
(b) per probe point, state switches between consecutive snapshots ÷ possible switches
    ((snapshots − 1) × units), on the packed words;
(c) per unit, Σ log σ_i over the first ``rank`` singular values of its (snapshot × probe)
    0/1 matrix after subtracting each column's time average, each σ_i floored at
    ``floor`` (a unit that never switches scores rank × log floor).
(a) and (b) never unpack; (c) unpacks a block of units at a time. Memory stays bounded by
``block_bytes`` whatever the number of snapshots. Each measure can also be computed in
``part``s (row blocks of (a), snapshot ranges of (b), unit blocks of (c)) that combine
exactly into the whole: the Dask path (:mod:`ntrace.analyze.cluster`) runs them as tasks.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ntrace.errors import UsageError
from ntrace.format.reader import Trace

Reader = Callable[[int, int], np.ndarray]
"""``read(k0, k1)`` → packed configurations of snapshots [k0, k1): (b, probe, unit_byte)."""

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


def _check(snapshots: int, block_bytes: int) -> None:
    if snapshots < 1:
        raise UsageError(f"exploration needs at least one snapshot, found {snapshots}")
    if block_bytes < 1:
        raise UsageError(f"block_bytes must be positive, found {block_bytes}")


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
                          part: tuple[int, int] | None = None) -> np.ndarray:
    """(a): ``min_{k<n} ‖A_n − A_k‖²_F`` for every snapshot n (−1 for n = 0).

    With ``part = (n0, n1)`` only snapshots [n0, n1) are computed and returned (n0 a multiple
    of :func:`distance_rows`); the parts of a split pass give exactly the whole pass."""
    _check(snapshots, block_bytes)
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


def switch_counts(read: Reader, snapshots: int, block_bytes: int = 32 << 20,
                  part: tuple[int, int] | None = None) -> np.ndarray:
    """(b) numerator: per probe point, state switches between consecutive snapshots.

    With ``part = (k0, k1)`` only the switches into snapshots [k0, k1) are counted (snapshot
    k0 − 1 is read too); the counts of the parts of [0, snapshots) add up to the whole."""
    _check(snapshots, block_bytes)
    k_lo, k_hi = part if part is not None else (0, snapshots)
    if not 0 <= k_lo <= k_hi <= snapshots:
        raise UsageError(f"part ({k_lo}, {k_hi}) of the switch count lies outside "
                         f"[0, {snapshots}]")
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


def switch_fraction(read: Reader, snapshots: int, units: int,
                    block_bytes: int = 32 << 20) -> np.ndarray:
    """(b): switches ÷ ((snapshots − 1) × units) per probe point (unsorted)."""
    if snapshots < 2:
        raise UsageError("switch fractions need at least 2 snapshots")
    return switch_counts(read, snapshots, block_bytes) / float((snapshots - 1) * units)


def probe_readers(trace: Trace, K: int) -> tuple[Callable[[int, int], np.ndarray],
                                                 Callable[[int, int], np.ndarray]]:
    """Readers of the packed probe configurations of snapshots [0, K): rows of snapshots
    ``(k0, k1)``, and all snapshots for the unit bytes ``(b0, b1)``."""
    arr = trace.zarr_array("probe/config")

    def rows(k0: int, k1: int) -> np.ndarray:
        return trace.read("probe/config", slice(k0, k1))

    def cols(b0: int, b1: int) -> np.ndarray:
        return np.asarray(arr[:K, :, b0:b1])

    return rows, cols


@dataclass(frozen=True)
class LogVolume:
    """(c): per unit, Σ log max(σ_i, floor) over the first ``rank`` singular values."""

    value: np.ndarray  # (unit,)
    rank: int  # singular values used: min(requested rank, snapshots, probe points)
    floor: float


def log_volume_bytes(snapshots: int, probes: int, units: int, block_bytes: int) -> int:
    """Unit bytes (8 units each) per block of :func:`log_volume`; parts of the unit axis
    must start at multiples of it."""
    per_unit = max(1, snapshots * probes * 8)
    return max(1, min((units + 7) // 8, block_bytes // (per_unit * 8)))


def log_volume(read_units: Callable[[int, int], np.ndarray], snapshots: int, probes: int,
               units: int, rank: int = 50, floor: float = 1e-6,
               block_bytes: int = 32 << 20, device: str = "cpu",
               part: tuple[int, int] | None = None) -> LogVolume:
    """(c) for every unit. ``read_units(b0, b1)`` returns packed bytes [b0, b1) of the unit
    axis for all snapshots: (snapshots, probe, b1 − b0). With ``part = (b0, b1)`` (unit
    bytes, b0 a multiple of :func:`log_volume_bytes`) only units [8 b0, min(8 b1, units))
    are computed, in the same blocks as the whole pass."""
    _check(snapshots, block_bytes)
    if rank < 1 or not floor > 0 or units < 1 or probes < 1:
        raise UsageError(f"log_volume needs rank >= 1, floor > 0 and at least one unit and "
                         f"probe point; found rank {rank}, floor {floor}, {units} units, "
                         f"{probes} probe points")
    nbytes = log_volume_bytes(snapshots, probes, units, block_bytes)
    total = (units + 7) // 8
    lo, hi = part if part is not None else (0, total)
    if lo % nbytes or not 0 <= lo <= hi <= total:
        raise UsageError(f"part ({lo}, {hi}) of the unit bytes must start at a multiple of "
                         f"{nbytes} and lie within [0, {total}]")
    r = min(rank, snapshots, probes)
    out = np.empty(max(0, min(8 * hi, units) - 8 * lo))
    dev = torch.device(device)
    for b0 in range(lo, hi, nbytes):
        b1 = min(b0 + nbytes, hi)
        raw = np.unpackbits(read_units(b0, b1), axis=-1, bitorder="little")
        u0, u1 = 8 * b0, min(8 * b1, units)
        A = torch.from_numpy(np.ascontiguousarray(np.moveaxis(raw[..., :u1 - u0], -1, 0)))
        out[u0 - 8 * lo:u1 - 8 * lo] = _logvol(A.to(dev, torch.float64), r, floor).cpu().numpy()
    return LogVolume(out, r, floor)


def _logvol(A: torch.Tensor, r: int, floor: float) -> torch.Tensor:
    """A (unit, snapshot, probe) 0/1 → Σ_{i<r} log max(σ_i, floor) of the centred matrices.
    A QR factorisation first shrinks each matrix to a square one with the same singular
    values (much faster than an SVD of the rectangular matrix)."""
    A = A - A.mean(dim=1, keepdim=True)
    cpu = A.device.type == "cpu"  # LAPACK through numpy is much faster for many small matrices
    if A.shape[1] != A.shape[2]:
        tall = A if A.shape[1] > A.shape[2] else A.transpose(1, 2)
        A = (torch.from_numpy(np.linalg.qr(tall.numpy(), mode="r")) if cpu
             else torch.linalg.qr(tall, mode="r")[1])
    if cpu:
        s = torch.from_numpy(np.linalg.svd(A.numpy(), compute_uv=False))
    else:
        s = torch.linalg.svdvals(A)
    return torch.log(torch.clamp(s[:, :r], min=floor)).sum(1)


# -- unpacked references (tests, benchmark) ---------------------------------------------
def min_previous_distance_dense(A: np.ndarray) -> np.ndarray:
    """(a) on an unpacked bool array (snapshot, probe, unit)."""
    K = A.shape[0]
    flat = A.reshape(K, -1)
    out = np.full(K, -1, dtype=np.int64)
    for n in range(1, K):
        out[n] = int((flat[:n] != flat[n]).sum(1).min())
    return out


def switch_fraction_dense(A: np.ndarray) -> np.ndarray:
    """(b) on an unpacked bool array (snapshot, probe, unit)."""
    K, _, M = A.shape
    return (A[1:] != A[:-1]).sum(axis=(0, 2)) / float((K - 1) * M)


def log_volume_dense(A: np.ndarray, rank: int = 50, floor: float = 1e-6) -> np.ndarray:
    """(c) on an unpacked bool array (snapshot, probe, unit), with numpy's SVD."""
    out = []
    for u in range(A.shape[2]):
        B = A[:, :, u].astype(np.float64)
        B = B - B.mean(0, keepdims=True)
        s = np.linalg.svd(B, compute_uv=False)[:rank]
        out.append(float(np.log(np.maximum(s, floor)).sum()))
    return np.asarray(out)
