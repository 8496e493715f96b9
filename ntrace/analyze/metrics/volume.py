"""Exploration (c): per unit, Σ log σ_i over the first ``rank`` singular values of its
(snapshot × probe) 0/1 matrix after subtracting each column's time average, each σ_i floored
at ``floor`` (a unit that never switches scores rank × log floor). Unpacks a block of units
at a time; parts are blocks of unit bytes, whose results concatenate."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import xarray as xr

from ntrace.analyze.metrics.base import Configs, Metric, Part, Probe, check, even_ranges
from ntrace.analyze.options import AnalysisOptions
from ntrace.analyze.results import var
from ntrace.errors import UsageError


@dataclass(frozen=True)
class LogVolume:
    """(c): per unit, Σ log max(σ_i, floor) over the first ``rank`` singular values."""

    value: np.ndarray  # (unit,)
    rank: int  # singular values used: min(requested rank, snapshots, probe points)
    floor: float


def _rank(rank: int, snapshots: int, probes: int) -> int:
    """Singular values there are to use."""
    return min(rank, snapshots, probes)


def log_volume_bytes(snapshots: int, probes: int, units: int, block_bytes: int) -> int:
    """Unit bytes (8 units each) per block of :func:`log_volume`; parts of the unit axis
    must start at multiples of it."""
    per_unit = max(1, snapshots * probes * 8)
    return max(1, min((units + 7) // 8, block_bytes // (per_unit * 8)))


def log_volume(read_units: Callable[[int, int], np.ndarray], snapshots: int, probes: int,
               units: int, rank: int = 50, floor: float = 1e-6,
               block_bytes: int = 32 << 20, device: str = "cpu",
               part: Part | None = None) -> LogVolume:
    """(c) for every unit. ``read_units(b0, b1)`` returns packed bytes [b0, b1) of the unit
    axis for all snapshots: (snapshots, probe, b1 − b0). With ``part = (b0, b1)`` (unit
    bytes, b0 a multiple of :func:`log_volume_bytes`) only units [8 b0, min(8 b1, units))
    are computed, in the same blocks as the whole pass."""
    check(snapshots, block_bytes)
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
    r = _rank(rank, snapshots, probes)
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


def log_volume_dense(A: np.ndarray, rank: int = 50, floor: float = 1e-6) -> np.ndarray:
    """(c) on an unpacked bool array (snapshot, probe, unit), with numpy's SVD: the
    reference."""
    out = []
    for u in range(A.shape[2]):
        B = A[:, :, u].astype(np.float64)
        B = B - B.mean(0, keepdims=True)
        s = np.linalg.svd(B, compute_uv=False)[:rank]
        out.append(float(np.log(np.maximum(s, floor)).sum()))
    return np.asarray(out)


class Volume(Metric):
    name = "volume"

    def parts(self, probe: Probe, opts: AnalysisOptions, tasks: int) -> list[Part]:
        """Whole blocks of unit bytes."""
        per = log_volume_bytes(probe.snapshots, probe.points, probe.units, opts.block_bytes)
        total = (probe.units + 7) // 8
        n_vb = math.ceil(total / per)
        return [(a * per, min(b * per, total)) for a, b in even_ranges([1.0] * n_vb, tasks)]

    def compute(self, configs: Configs, probe: Probe, part: Part, opts: AnalysisOptions
                ) -> np.ndarray:
        return log_volume(configs.units, probe.snapshots, probe.points, probe.units,
                          opts.svd_rank, opts.sv_floor, opts.block_bytes, opts.device,
                          part).value

    def combine(self, probe: Probe, results: list[np.ndarray], opts: AnalysisOptions
                ) -> LogVolume:
        return LogVolume(np.concatenate(results),
                         _rank(opts.svd_rank, probe.snapshots, probe.points), opts.sv_floor)

    def variables(self, probe: Probe, value: LogVolume) -> dict[str, xr.Variable]:
        return {
            "log_volume": var("unit", value.value, f"sum of log max(sigma_i, {value.floor:g}) "
                              f"over the first {value.rank} singular values of the unit's "
                              "centred (snapshot x probe) 0/1 matrix"),
            "log_volume_sorted": var("unit_rank", np.sort(value.value)[::-1], "log_volume "
                                     "sorted, largest first"),
        }

    def attrs(self, value: LogVolume) -> dict[str, Any]:
        return {"singular_values": value.rank, "singular_value_floor": value.floor,
                "floor_rule": "log max(sigma_i, floor)"}
