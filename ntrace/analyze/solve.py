"""Batched convex solvers for hindsight Taylor optima, each returning a certificate.

Every solve returns, per problem, the point, its objective value and ``gap``: an upper bound
on (value − optimum). Ball and box use the Frank–Wolfe gap ``max_{s∈H} ⟨∇f(u), u − s⟩``;
unconstrained quadratics use ``¼ ∇ᵀA⁺∇`` (exact for a convex quadratic); unconstrained
cross-entropy uses a Fenchel duality gap (:mod:`ntrace.analyze.crossentropy`).

- ball + quadratic: the trust-region subproblem solved exactly (Moré–Sorensen: Newton on
  1/R − 1/|u(λ)| with batched Cholesky factorisations, warm-started from the last λ);
- none + quadratic: eigendecomposition and pseudo-inverse (the least-squares optimum);
- linear objectives (nll): closed form (:func:`solve_linear`);
- box, and anything not quadratic: accelerated projected gradient (FISTA) with backtracking,
  function-value restarts and an optional diagonal metric, stopping at ``gap <= tol``.
Problems are batched along the first axis; converged ones leave the working batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from ntrace.analyze.domain import Domain
from ntrace.analyze.quadratic import Quadratic

CONVERGED, NOT_CONVERGED, UNBOUNDED, NOT_SOLVED = 0, 1, 2, 3
STATUS_NAMES = ("converged", "not_converged", "unbounded", "not_solved")


class Objective(Protocol):
    """A batch of smooth convex functions of u (B, D)."""

    def value(self, u: torch.Tensor) -> torch.Tensor: ...

    def value_grad(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def take(self, idx: torch.Tensor) -> Objective: ...


Certificate = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``certificate(active, x, grad)`` → an upper bound on value − optimum per active problem
(replaces the Frank–Wolfe gap of the domain)."""


@dataclass
class Solution:
    """Per problem: point ``x``, ``value``, certified ``gap``, iterations, status code, and
    the trust-region multiplier ``lam`` (for warm starts; NaN where unused)."""

    x: torch.Tensor
    value: torch.Tensor
    gap: torch.Tensor
    iterations: torch.Tensor
    status: torch.Tensor
    lam: torch.Tensor


def _status(gap: torch.Tensor, tol: float) -> torch.Tensor:
    return torch.where(gap <= tol, CONVERGED, NOT_CONVERGED).to(torch.int8)


def solve_quadratic(q: Quadratic, dom: Domain, tol: float, max_iter: int,
                    x0: torch.Tensor | None = None, lam0: torch.Tensor | None = None
                    ) -> Solution:
    """Minimise each quadratic over its set, to a certified gap ≤ ``tol`` when reachable."""
    if dom.kind != "box":
        keep = torch.diagonal(q.A, dim1=1, dim2=2).gt(0).any(0)
        if not bool(keep.any()):
            return constant(q, dom)
        if not bool(keep.all()):
            return _reduced(q, dom, keep, tol, max_iter, x0, lam0)
    if dom.kind == "none":
        return least_squares(q, tol)
    if dom.kind == "ball":
        sol = trust_region(q, dom, tol, lam0)
        bad = sol.gap > tol
        if bool(bad.any()):  # rare: polish with projected gradient from the exact answer
            idx = bad.nonzero().squeeze(1)
            ref = fista(q.take(idx), dom.take(idx), sol.x[idx], tol, max_iter,
                        lipschitz=lipschitz(q.A[idx]), backtrack=True)
            better = ref.gap < sol.gap[idx]
            for name in ("x", "value", "gap", "iterations"):
                getattr(sol, name)[idx[better]] = getattr(ref, name)[better]
        sol.status = _status(sol.gap, tol)
        return sol
    # diagonal (Jacobi) metric; a problem with A = 0 (a neuron that never fires) gets 1
    metric = torch.clamp(torch.diagonal(q.A, dim1=1, dim2=2), min=0)
    top = metric.amax(1, keepdim=True)
    metric = torch.where(top > 0, torch.maximum(metric, top * 1e-12), torch.ones_like(metric))
    start = dom.start() if x0 is None else dom.project(x0)
    L = lipschitz(q.A / metric.sqrt().unsqueeze(1) / metric.sqrt().unsqueeze(2))
    return fista(q, dom, start, tol, max_iter, lipschitz=L, metric=metric, backtrack=True)


def constant(q: Quadratic, dom: Domain) -> Solution:
    """A batch with zero curvature everywhere (neurons whose Jacobian columns were always 0:
    A = 0 forces b = 0, so every quadratic is its constant c): each optimum is c, at the
    centre of the ball (0 unconstrained), with gap 0."""
    x = dom.center.clone() if dom.center is not None else torch.zeros_like(q.b)
    n = q.c.shape[0]
    return Solution(x, q.c.clone(), torch.zeros_like(q.c),
                    torch.zeros(n, dtype=torch.int64, device=q.c.device),
                    torch.full((n,), CONVERGED, dtype=torch.int8, device=q.c.device),
                    torch.full_like(q.c, math.nan))


def _reduced(q: Quadratic, dom: Domain, keep: torch.Tensor, tol: float, max_iter: int,
             x0: torch.Tensor | None, lam0: torch.Tensor | None) -> Solution:
    """Drop coordinates with zero curvature in every problem (inputs that are always 0):
    A's row and column and b vanish there, so they stay at the centre (0 unconstrained)."""
    sub = Quadratic(q.A[:, keep][:, :, keep], q.b[:, keep], q.c)
    center = None if dom.center is None else dom.center[:, keep]
    sdom = Domain(dom.kind, center, dom.radius, batch=dom.batch)
    sol = solve_quadratic(sub, sdom, tol, max_iter, None if x0 is None else x0[:, keep], lam0)
    x = torch.zeros_like(q.b) if dom.center is None else dom.center.clone()
    x[:, keep] = sol.x
    value, grad = q.value_grad(x)
    if dom.kind == "ball":
        sol.gap = dom.fw_gap(x, grad).clamp(min=0)
    sol.x, sol.value = x, value
    return sol


def solve_linear(g: torch.Tensor, c: torch.Tensor, dom: Domain) -> Solution:
    """Minimise ``gᵀu + c`` over each set in closed form (gap 0): a ball's point opposite
    the gradient, a box's corner; unconstrained, unbounded below unless g vanishes (to
    rounding)."""
    B = g.shape[0]
    n = g.norm(dim=1)
    zero = torch.zeros_like(c)
    status = torch.full((B,), CONVERGED, dtype=torch.int8, device=g.device)
    if dom.kind == "ball":
        assert dom.center is not None and dom.radius is not None
        x = dom.center - dom.radius[:, None] * g / n.clamp(min=1e-300)[:, None]
    elif dom.kind == "box":
        assert dom.lower is not None and dom.upper is not None
        x = torch.where(g > 0, dom.lower, dom.upper)
    else:
        x = torch.zeros_like(g)
        status[n > 1e-12 * c.abs().clamp(min=1.0)] = UNBOUNDED
    value = (g * x).sum(1) + c
    its = torch.zeros(B, dtype=torch.int64, device=g.device)
    return Solution(x, value, zero, its, status, torch.full_like(c, math.nan))


def lipschitz(A: torch.Tensor) -> torch.Tensor:
    """2 λ_max(A) per problem: exact for small D, power iteration (with margin) otherwise."""
    if A.shape[-1] <= 512:
        return 2 * torch.linalg.eigvalsh(A)[:, -1].clamp(min=1e-300)
    v = torch.ones(A.shape[0], A.shape[1], 1, dtype=A.dtype, device=A.device)
    lam = torch.zeros(A.shape[0], dtype=A.dtype, device=A.device)
    for _ in range(60):
        w = torch.bmm(A, v)
        lam = w.norm(dim=(1, 2))
        v = w / lam.clamp(min=1e-300)[:, None, None]
    return 2.2 * lam.clamp(min=1e-300)


def curvature(matvec: Callable[[torch.Tensor], torch.Tensor], like: torch.Tensor,
              iterations: int = 40) -> torch.Tensor:
    """λ_max of each problem's Hessian from Hessian–vector products (power iteration, with
    a margin of 10%), when forming the Hessian would cost more than the products."""
    v = torch.ones_like(like) / like.shape[1] ** 0.5
    lam = torch.zeros(like.shape[0], dtype=like.dtype, device=like.device)
    for _ in range(iterations):
        w = matvec(v)
        lam = w.norm(dim=1)
        v = w / lam.clamp(min=1e-300)[:, None]
    return 1.1 * lam.clamp(min=1e-300)


def least_squares(q: Quadratic, tol: float) -> Solution:
    """Unconstrained minimum by eigendecomposition: u = A⁺b, certificate ¼ ∇ᵀA⁺∇ (components
    of ∇ on eigenvalues below 1e-13·λ_max are rounding and are left out)."""
    lam, Q = torch.linalg.eigh(q.A)
    cut = lam[:, -1:].clamp(min=1e-300) * 1e-13
    keep = lam > cut
    inv = torch.where(keep, 1.0 / torch.where(keep, lam, torch.ones_like(lam)),
                      torch.zeros_like(lam))
    coef = torch.einsum("bdk,bd->bk", Q, q.b) * inv
    x = torch.einsum("bdk,bk->bd", Q, coef)
    value, grad = q.value_grad(x)
    gq = torch.einsum("bdk,bd->bk", Q, grad)
    gap = 0.25 * (gq.pow(2) * inv).sum(1)
    n = x.shape[0]
    return Solution(x, value, gap, torch.ones(n, dtype=torch.int64, device=x.device),
                    _status(gap, tol), torch.full_like(value, math.nan))


def _chol_solve(A: torch.Tensor, lam: torch.Tensor, g: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Solve (A + λI) u = g; λ grows ×10 where the factorisation fails. Returns u, w = L⁻¹u
    and the λ actually used."""
    lam = lam.clone()
    for _ in range(40):
        M = A.clone()
        M.diagonal(dim1=1, dim2=2).add_(lam[:, None])
        L, info = torch.linalg.cholesky_ex(M)
        bad = info > 0
        if not bool(bad.any()):
            break
        lam = torch.where(bad, torch.clamp(lam * 10, min=1e-300), lam)
    u = torch.cholesky_solve(g.unsqueeze(-1), L)
    w = torch.linalg.solve_triangular(L, u, upper=False)
    return u.squeeze(-1), w.squeeze(-1), lam


def trust_region(q: Quadratic, dom: Domain, tol: float, lam0: torch.Tensor | None = None,
                 rtol: float = 1e-11, max_newton: int = 80) -> Solution:
    """Exact minimum over balls (Moré–Sorensen). With u = x − m and g = b − A m the optimum
    is u(λ) = (A + λI)⁻¹ g with λ ≥ 0, |u| ≤ R and λ(R − |u|) = 0; λ = δ (a shift of
    1e-10·max diag A, for singular A) stands for 0. Newton steps on 1/R − 1/|u(λ)| stop once
    the projected point's certificate is ≤ tol/4 or |u| = R to ``rtol``."""
    assert dom.center is not None and dom.radius is not None
    A, m, R = q.A, dom.center, dom.radius
    B = A.shape[0]
    g = q.b - torch.bmm(A, m.unsqueeze(-1)).squeeze(-1)
    delta = torch.diagonal(A, dim1=1, dim2=2).amax(1).clamp(min=1e-300) * 1e-10
    lam = delta.clone()
    if lam0 is not None:
        lam = torch.where(torch.isfinite(lam0) & (lam0 > delta), lam0, lam)
    lo = delta.clone()
    hi = torch.maximum(g.norm(dim=1) / R.clamp(min=1e-300), delta)
    u = torch.zeros_like(g)
    its = torch.zeros(B, dtype=torch.int64, device=A.device)
    active = R > 0
    for _ in range(max_newton):
        if not bool(active.any()):
            break
        idx = active.nonzero().squeeze(1)
        Ai, gi, r, di = A[idx], g[idx], R[idx], delta[idx]
        ui, wi, li = _chol_solve(Ai, lam[idx], gi)
        n = ui.norm(dim=1)
        its[idx] += 1
        shrink = torch.clamp(r / n.clamp(min=1e-300), max=1.0)
        xi = m[idx] + ui * shrink[:, None]
        grad = 2 * (torch.bmm(Ai, xi.unsqueeze(-1)).squeeze(-1) - q.b[idx])
        gap = dom.take(idx).fw_gap(xi, grad)
        u[idx] = ui * shrink[:, None]
        interior = (li <= di * 1.000001) & (n <= r)
        done = interior | (gap <= 0.25 * tol) | ((n - r).abs() <= rtol * r)
        lo_i = torch.where(n > r, torch.maximum(lo[idx], li), lo[idx])
        hi_i = torch.where(n < r, torch.minimum(hi[idx], li), hi[idx])
        new = li + (n / wi.norm(dim=1).clamp(min=1e-300)).pow(2) * (n - r) / r
        new = torch.where((n < r) & (new <= di), di, new)
        out = ((new <= lo_i) & (new > di)) | (new >= hi_i) | ~torch.isfinite(new)
        new = torch.where(out, 0.5 * (lo_i + hi_i), new)
        done = done | ((hi_i - lo_i) <= 1e-14 * hi_i)
        lo[idx], hi[idx] = lo_i, hi_i
        lam[idx] = torch.where(done, li, new)
        active[idx] = ~done
    x = dom.project(m + u)
    value, grad = q.value_grad(x)
    gap = dom.fw_gap(x, grad).clamp(min=0)
    return Solution(x, value, gap, its, torch.zeros(B, dtype=torch.int8, device=A.device), lam)


def fista(obj: Objective, dom: Domain, x0: torch.Tensor, tol: float, max_iter: int,
          lipschitz: torch.Tensor | None = None, metric: torch.Tensor | None = None,
          backtrack: bool = True, check_every: int = 10,
          certificate: Certificate | None = None) -> Solution:
    """Accelerated projected gradient, batched. ``metric`` (B, D) is a diagonal scaling
    (box/none only: projection stays coordinate-wise). ``lipschitz`` is the starting
    estimate of L in that metric; backtracking doubles it where the descent test fails."""
    B, D = x0.shape
    dev, dt = x0.device, x0.dtype
    if metric is None:
        metric = torch.ones(B, D, dtype=dt, device=dev)
    L = (torch.ones(B, dtype=dt, device=dev) if lipschitz is None else lipschitz.clone())
    x = dom.project(x0)
    best_x = x.clone()
    best_v = torch.full((B,), math.inf, dtype=dt, device=dev)
    best_gap = torch.full((B,), math.inf, dtype=dt, device=dev)
    its = torch.zeros(B, dtype=torch.int64, device=dev)
    active = torch.arange(B, device=dev)
    y, t = x.clone(), torch.ones(B, dtype=dt, device=dev)
    fx = obj.value(x)
    done_iters = 0
    while active.numel() and done_iters < max_iter:
        sub, dsub, msub = obj.take(active), dom.take(active), metric[active]
        xa, ya, ta, La, fa = x[active], y[active], t[active], L[active], fx[active]
        for _ in range(min(check_every, max_iter - done_iters)):
            fy, gy = sub.value_grad(ya)
            for _ in range(60):
                xn = dsub.project(ya - gy / (La[:, None] * msub))
                if not backtrack:
                    fxn = sub.value(xn)
                    break
                fxn = sub.value(xn)
                d = xn - ya
                bound = fy + (gy * d).sum(1) + 0.5 * La * (msub * d * d).sum(1)
                ok = fxn <= bound + 1e-13 * fy.abs().clamp(min=1e-30)
                if bool(ok.all()):
                    break
                La = torch.where(ok, La, 2 * La)
            restart = fxn > fa
            tn = 0.5 * (1 + torch.sqrt(1 + 4 * ta * ta))
            mom = torch.where(restart, torch.zeros_like(ta), (ta - 1) / tn)
            ya = xn + mom[:, None] * (xn - xa)
            ta = torch.where(restart, torch.ones_like(ta), tn)
            xa, fa = xn, fxn
            done_iters += 1
        its[active] = done_iters
        v, g = sub.value_grad(xa)
        gap = dsub.fw_gap(xa, g) if certificate is None else certificate(active, xa, g)
        gap = gap.clamp(min=0)
        better = gap < best_gap[active]
        bi = active[better]
        best_x[bi], best_v[bi], best_gap[bi] = xa[better], v[better], gap[better]
        x[active], y[active], t[active], L[active], fx[active] = xa, ya, ta, La, fa
        active = active[~(gap <= tol)]  # a NaN certificate keeps the problem active
    never = torch.isinf(best_v)
    if bool(never.any()):  # no finite certificate was ever reached: report the last point
        idx = never.nonzero().squeeze(1)
        best_x[idx] = x[idx]
        best_v[idx] = obj.take(idx).value(x[idx])
        best_gap[idx] = math.nan
    return Solution(best_x, best_v, best_gap, its, _status(best_gap, tol),
                    torch.full((B,), math.nan, dtype=dt, device=dev))
