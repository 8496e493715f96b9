"""Regret and its exponent on synthetic sequences whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from ntrace.analyze import cumulative_loss, fit_exponent, regret
from ntrace.analyze.regret import t_quantile
from ntrace.errors import UsageError


def test_regret_of_a_known_sequence() -> None:
    # losses 1/√t·(1/2) summed give ≈ √N; an optimum of 0 makes regret the cumulative loss
    losses = np.array([1.0, 2.0, 3.0, 4.0])
    counts = (1, 2, 4)
    cum = cumulative_loss(losses, counts)
    np.testing.assert_array_equal(cum, [1.0, 3.0, 10.0])
    opt = np.array([[0.5, 1.0], [1.0, 1.5], [2.0, 2.5]])
    np.testing.assert_array_equal(regret(cum, opt, counts),
                                  [[0.5, 0.0], [1.0, 0.0], [2.0, 0.0]])
    with pytest.raises(UsageError, match="checkpoint counts"):
        cumulative_loss(losses, (5,))


def test_exponent_of_a_power_law_is_exact() -> None:
    n = np.unique(np.round(np.geomspace(1, 1000, 30))).astype(int)
    R = np.stack([3.0 * n**0.5, 0.2 * n**1.0, -np.ones(len(n))], axis=1)
    ex = fit_exponent(n, R)
    np.testing.assert_allclose(ex.slope[:2], [0.5, 1.0], atol=1e-12)
    np.testing.assert_allclose(ex.high[:2] - ex.low[:2], 0.0, atol=1e-9)
    assert np.isnan(ex.slope[2]) and ex.points[2] == 0  # never positive: no fit


def test_exponent_interval_matches_scipy_linregress() -> None:
    rng = np.random.default_rng(0)
    n = np.unique(np.round(np.geomspace(10, 5000, 25))).astype(int)
    R = 2.0 * n**0.5 * np.exp(rng.normal(0, 0.1, len(n)))
    ex = fit_exponent(n, R, min_count=20, confidence=0.9)
    keep = n >= 20
    ref = stats.linregress(np.log(n[keep]), np.log(R[keep]))
    h = stats.t.ppf(0.95, keep.sum() - 2) * ref.stderr
    assert float(ex.slope) == pytest.approx(ref.slope, rel=1e-12)
    assert float(ex.low) == pytest.approx(ref.slope - h, rel=1e-6)
    assert float(ex.high) == pytest.approx(ref.slope + h, rel=1e-6)
    assert ex.low < 0.5 < ex.high
    assert int(ex.points) == keep.sum()


@pytest.mark.parametrize("df", [1, 2, 3, 5, 10, 30, 200])
def test_t_quantile_matches_scipy(df: int) -> None:
    for p in (0.9, 0.95, 0.975, 0.995):
        assert t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), rel=1e-9)
