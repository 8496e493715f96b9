"""Regret against the hindsight Taylor optimum, and its growth exponent.

At a checkpoint of N Taylor rounds: the cumulative loss ``Σ_{t<N} ℓ_t(W_t)`` (each ℓ_t the
mean recorded sample loss, equal to TL_t at the iterate), ``N × optimum``, their difference
the regret, and each divided by √N. The exponent is the least-squares slope of log regret on
log N over the fitted checkpoints (those whose regret is resolved: above the certified error
of N × optimum and the rounding of the losses), with a Student-t confidence interval.
Checkpoint regrets are cumulative and so correlated: the interval describes the fit, and is
narrower than an interval over independent runs would be.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ntrace.errors import UsageError


@dataclass(frozen=True)
class Exponent:
    """Fitted slopes (one per unit) with confidence bounds and the number of points used."""

    slope: np.ndarray
    low: np.ndarray
    high: np.ndarray
    points: np.ndarray


def cumulative_loss(losses: np.ndarray, counts: np.ndarray | tuple[int, ...]) -> np.ndarray:
    """``Σ_{t<N} losses[t]`` for each N in ``counts``."""
    c = np.concatenate([[0.0], np.cumsum(np.asarray(losses, dtype=np.float64))])
    counts = np.asarray(counts, dtype=np.int64)
    if counts.size and (counts.min() < 0 or counts.max() > len(losses)):
        raise UsageError(f"checkpoint counts must lie in [0, {len(losses)}], found "
                         f"{counts.min()}..{counts.max()}")
    return c[counts]


def regret(cum_loss: np.ndarray, optimum: np.ndarray, counts: np.ndarray | tuple[int, ...]
           ) -> np.ndarray:
    """``cum_loss[k] − counts[k] × optimum[k, ...]`` (optimum may have trailing unit axes)."""
    n = np.asarray(counts, dtype=np.float64)
    opt = np.asarray(optimum, dtype=np.float64)
    shape = (len(n),) + (1,) * (opt.ndim - 1)
    return np.asarray(cum_loss, dtype=np.float64).reshape(shape) - n.reshape(shape) * opt


def _t_two_sided(t: float, df: int) -> float:
    """P(|T| ≤ t) for Student's t with integer ``df`` (closed form, A&S 26.7.3–4)."""
    theta = math.atan(t / math.sqrt(df))
    c2 = math.cos(theta) ** 2
    if df % 2 == 1:
        acc, term = 0.0, math.cos(theta)
        if df > 1:
            acc = term
            for k in range(1, (df - 3) // 2 + 1):
                term *= c2 * (2 * k) / (2 * k + 1)
                acc += term
        return (2 / math.pi) * (theta + math.sin(theta) * acc)
    acc, term = 1.0, 1.0
    for k in range(1, (df - 2) // 2 + 1):
        term *= c2 * (2 * k - 1) / (2 * k)
        acc += term
    return math.sin(theta) * acc


def t_quantile(p: float, df: int) -> float:
    """Quantile of Student's t (p > 1/2) by bisection on its closed-form distribution."""
    if df < 1:
        return math.nan
    target = 2 * p - 1
    lo, hi = 0.0, 1.0
    while _t_two_sided(hi, df) < target:
        hi *= 2
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if _t_two_sided(mid, df) < target:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-13 * hi:
            break
    return 0.5 * (lo + hi)


def resolution(counts: np.ndarray | tuple[int, ...], gap: np.ndarray, cum_loss: np.ndarray
               ) -> np.ndarray:
    """The smallest regret that is not noise: twice the certified error of N × optimum plus
    1e-6 of the cumulative loss (float32 rounding of the recorded losses)."""
    n = np.asarray(counts, dtype=np.float64)
    g = np.asarray(gap, dtype=np.float64)
    shape = (len(n),) + (1,) * (g.ndim - 1)
    return 2 * n.reshape(shape) * np.nan_to_num(g, nan=np.inf) \
        + 1e-6 * np.abs(np.asarray(cum_loss, dtype=np.float64)).reshape(shape)


def fit_exponent(counts: np.ndarray | tuple[int, ...], values: np.ndarray,
                 min_count: float = 1.0, confidence: float = 0.95,
                 floor: np.ndarray | None = None) -> Exponent:
    """Slope of log(values) on log(counts) per unit (values: (checkpoint,) or
    (checkpoint, unit)), over checkpoints with count ≥ ``min_count`` and a finite value
    above ``floor`` (default 0; see :func:`resolution`); NaN where fewer than 3 remain."""
    n = np.asarray(counts, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    if v.shape[0] != n.shape[0]:
        raise UsageError(f"values have {v.shape[0]} checkpoints but counts {n.shape[0]}")
    flat = v.reshape(v.shape[0], -1)
    low_flat = (np.zeros_like(flat) if floor is None
                else np.broadcast_to(np.asarray(floor, dtype=np.float64), v.shape)
                .reshape(flat.shape))
    U = flat.shape[1]
    slope, low, high = np.full(U, np.nan), np.full(U, np.nan), np.full(U, np.nan)
    pts = np.zeros(U, dtype=np.int64)
    q = 0.5 + confidence / 2
    for u in range(U):
        ok = (n >= min_count) & np.isfinite(flat[:, u]) & (flat[:, u] > low_flat[:, u]) \
            & (flat[:, u] > 0) & (n > 0)
        m = int(ok.sum())
        pts[u] = m
        if m < 3:
            continue
        x, y = np.log(n[ok]), np.log(flat[ok, u])
        xm = x - x.mean()
        sxx = float((xm * xm).sum())
        if sxx == 0.0:
            continue
        b = float((xm * (y - y.mean())).sum() / sxx)
        resid = y - y.mean() - b * xm
        se = math.sqrt(float((resid * resid).sum()) / (m - 2) / sxx)
        h = t_quantile(q, m - 2) * se
        slope[u], low[u], high[u] = b, b - h, b + h
    shape = v.shape[1:]
    return Exponent(slope.reshape(shape), low.reshape(shape), high.reshape(shape),
                    pts.reshape(shape))
