"""The batched solvers against independent references (eigendecomposition, numpy lstsq,
scipy), and their certificates: reported gap ≤ tol and true suboptimality ≤ reported gap."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import brentq, minimize

from ntrace.analyze.domain import Domain
from ntrace.analyze.quadratic import Quadratic
from ntrace.analyze.solve import CONVERGED, least_squares, solve_quadratic, trust_region

TOL = 1e-8


def _problems(seed: int, B: int, D: int, rank: int | None = None) -> Quadratic:
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(B, rank or 2 * D, D, generator=g, dtype=torch.float64)
    A = M.transpose(1, 2) @ M / M.shape[1]
    b = torch.randn(B, D, generator=g, dtype=torch.float64)
    if rank is not None:  # keep b in the range of A, as for a least-squares objective
        b = torch.bmm(A, b.unsqueeze(-1)).squeeze(-1)
    return Quadratic(A, b, torch.rand(B, generator=g, dtype=torch.float64) + 5)


def _ball_reference(A: np.ndarray, b: np.ndarray, c: float, m: np.ndarray, R: float) -> float:
    """min over |x − m| ≤ R of xᵀAx − 2bᵀx + c by eigendecomposition and a scalar root."""
    if R == 0:
        return float(m @ A @ m - 2 * b @ m + c)
    lam, Q = np.linalg.eigh(A)
    g = Q.T @ (b - A @ m)
    cut = 1e-12 * lam.max()

    def norm(mu: float) -> float:
        return float(np.sqrt(np.sum((g / (lam + mu)) ** 2)))

    inside = lam > cut
    if np.all(np.abs(g[~inside]) < 1e-12) and np.sqrt(np.sum((g[inside] / lam[inside]) ** 2)) \
            <= R:
        u = np.where(inside, g / np.where(inside, lam, 1.0), 0.0)
    else:
        hi = np.linalg.norm(g) / R + 1.0
        mu = brentq(lambda t: norm(t) - R, 1e-300 if lam.min() > cut else 1e-14, hi,
                    xtol=1e-15, rtol=1e-15)
        u = g / (lam + mu)
    x = m + Q @ u
    return float(x @ A @ x - 2 * b @ x + c)


@pytest.mark.parametrize("rank", [None, 3])
def test_trust_region_matches_eigendecomposition(rank: int | None) -> None:
    q = _problems(0, 12, 7, rank)
    g = torch.Generator().manual_seed(1)
    center = torch.randn(12, 7, generator=g, dtype=torch.float64)
    radius = torch.rand(12, generator=g, dtype=torch.float64) * 2
    radius[0] = 50.0  # interior
    radius[1] = 0.0  # a point
    dom = Domain("ball", center=center, radius=radius, batch=12)
    sol = solve_quadratic(q, dom, TOL, 1000)
    assert (sol.status == CONVERGED).all()
    assert float(sol.gap.max()) <= TOL
    assert ((sol.x - center).norm(dim=1) <= radius * (1 + 1e-12) + 1e-15).all()
    for k in range(12):
        ref = _ball_reference(q.A[k].numpy(), q.b[k].numpy(), float(q.c[k]),
                              center[k].numpy(), float(radius[k]))
        sub = float(sol.value[k]) - ref
        assert sub <= float(sol.gap[k]) + 1e-12
        assert abs(sub) < 1e-9


def test_trust_region_warm_start_reaches_the_same_point() -> None:
    q = _problems(2, 5, 6)
    dom = Domain("ball", center=torch.zeros(5, 6, dtype=torch.float64),
                 radius=torch.full((5,), 0.3, dtype=torch.float64), batch=5)
    cold = trust_region(q, dom, TOL)
    warm = trust_region(q, dom, TOL, lam0=cold.lam * 1.5)
    diff = (warm.value - cold.value).abs()
    assert (diff <= warm.gap + cold.gap + 1e-14).all()
    assert float(warm.gap.max()) <= TOL


def test_least_squares_matches_numpy_lstsq() -> None:
    q = _problems(3, 6, 5, rank=2)
    sol = least_squares(q, TOL)
    for k in range(6):
        A, b = q.A[k].numpy(), q.b[k].numpy()
        x = np.linalg.lstsq(A, b, rcond=None)[0]
        ref = float(x @ A @ x - 2 * b @ x + float(q.c[k]))
        assert float(sol.value[k]) - ref <= float(sol.gap[k]) + 1e-12
        assert float(sol.value[k]) == pytest.approx(ref, abs=1e-10)
    assert float(sol.gap.max()) <= TOL


def test_box_solver_matches_lbfgsb_and_certifies() -> None:
    q = _problems(4, 8, 6)
    g = torch.Generator().manual_seed(5)
    lo = -torch.rand(8, 6, generator=g, dtype=torch.float64) * 0.5
    hi = torch.rand(8, 6, generator=g, dtype=torch.float64) * 0.5
    hi[0, 0] = lo[0, 0]  # a degenerate coordinate
    dom = Domain("box", lower=lo, upper=hi, batch=8)
    sol = solve_quadratic(q, dom, TOL, 50000)
    assert float(sol.gap.max()) <= TOL
    for k in range(8):
        A, b, c = q.A[k].numpy(), q.b[k].numpy(), float(q.c[k])
        res = minimize(lambda x, A=A, b=b, c=c: (x @ A @ x - 2 * b @ x + c,
                                                 2 * (A @ x - b)),
                       np.zeros(6).clip(lo[k].numpy(), hi[k].numpy()), jac=True,
                       method="L-BFGS-B", bounds=list(zip(lo[k].numpy(), hi[k].numpy(),
                                                          strict=True)),
                       options={"ftol": 1e-15, "gtol": 1e-13, "maxiter": 10000})
        assert float(sol.value[k]) - res.fun <= float(sol.gap[k]) + 1e-12
        assert float(sol.value[k]) == pytest.approx(res.fun, abs=1e-7)


@pytest.mark.parametrize("kind", ["ball", "none", "box"])
def test_a_batch_of_dead_neurons_is_its_constant(kind: str) -> None:
    """A = 0 and b = 0 in every problem (neurons that never fired): each optimum is c with
    gap 0, over any set (was an IndexError on an empty reduction for ball and none)."""
    B, D = 3, 5
    q = Quadratic(torch.zeros(B, D, D, dtype=torch.float64), torch.zeros(B, D, dtype=torch.float64),
                  torch.tensor([1.0, 2.0, 3.5], dtype=torch.float64))
    center = torch.randn(B, D, dtype=torch.float64)
    if kind == "ball":
        dom = Domain("ball", center=center, radius=torch.ones(B, dtype=torch.float64), batch=B)
    elif kind == "box":
        dom = Domain("box", lower=center - 1, upper=center + 1, batch=B)
    else:
        dom = Domain("none", batch=B)
    sol = solve_quadratic(q, dom, TOL, 100)
    torch.testing.assert_close(sol.value, q.c)
    assert bool((sol.gap <= TOL).all()) and bool((sol.status == CONVERGED).all())
    assert torch.isfinite(sol.x).all()
