"""Cross-entropy Taylor losses: batched objectives, a duality-gap certificate, attainment test.

A cross-entropy Taylor loss is not quadratic, so its hindsight optimum needs every recorded
(round, sample) pair ``k``: the logits are ``z_k(u) = r_k + M_k u`` (linear in the candidate
parameters u) and ``f(u) = (1/K) Σ_k [logsumexp(z_k) − z_k[y_k]]``. The working set (outputs,
targets, layer inputs, pre-activations and Jacobian columns of the rounds so far) is held
in memory, bounded by ``max_memory``.

Certificate without constraints (Fenchel duality): for π_k in the simplex with
Σ_k M_kᵀ(π_k − e_{y_k}) = 0, ``D(π) = (1/K) Σ_k [(π_k − e_{y_k})·r_k + H(π_k)] ≤ min f``.
From softmax(z_k) the constraint is met by π_k ⊙ (1 + M_kν − π_k·M_kν) with ν the Newton
step, so ``f(u) − D(π)`` is a gap that vanishes at the optimum. The infimum is not attained
(e.g. separable data) exactly when some d has (M_k d)[y_k] ≥ (M_k d)[o] for all k, o with one
strict inequality: a linear programme (scipy's HiGHS), see :func:`unattained`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

_CHUNK = 1 << 24  # elements of (problem, sample, output) evaluated at once


def _entropy(p: torch.Tensor) -> torch.Tensor:
    return -torch.special.xlogy(p, p).sum(-1)


class NeuronCE:
    """Neuron-scale problems: only one row u (length i) of one layer varies per problem.

    Data are grouped (``R`` groups of ``K`` samples: R = 1 for hindsight, R = rounds for
    per-round best responses); problem b uses group ``grp[b]``. Shapes: f (R, K, o),
    y (R, K), x (R, K, i) shared by a group; g (B, K, o) Jacobian columns, a (B, K)."""

    def __init__(self, f: torch.Tensor, y: torch.Tensor, x: torch.Tensor, g: torch.Tensor,
                 a: torch.Tensor, grp: torch.Tensor) -> None:
        self.f, self.y, self.x, self.g, self.a, self.grp = f, y, x, g, a, grp

    def take(self, idx: torch.Tensor) -> NeuronCE:
        return NeuronCE(self.f, self.y, self.x, self.g[idx], self.a[idx], self.grp[idx])

    def _xdot(self, u: torch.Tensor) -> torch.Tensor:
        if self.x.shape[0] == 1:
            return u @ self.x[0].T  # (B, K)
        return torch.einsum("bki,bi->bk", self.x[self.grp], u)

    def _xt(self, w: torch.Tensor) -> torch.Tensor:
        """Σ_k w[b, k] x_k / K, (B, i)."""
        if self.x.shape[0] == 1:
            return w @ self.x[0] / w.shape[1]
        return torch.einsum("bk,bki->bi", w, self.x[self.grp]) / w.shape[1]

    def _fy(self, grp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.f.shape[0] == 1:
            B = grp.shape[0]
            return self.f.expand(B, *self.f.shape[1:]), self.y.expand(B, self.y.shape[1])
        return self.f[grp], self.y[grp]

    def _logits(self, u: torch.Tensor) -> torch.Tensor:
        f, _ = self._fy(self.grp)
        return f + self.g * (self._xdot(u) - self.a).unsqueeze(-1)

    def value(self, u: torch.Tensor) -> torch.Tensor:
        return self.value_grad(u, grad=False)[0]

    def value_grad(self, u: torch.Tensor, grad: bool = True
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        z = self._logits(u)
        _, y = self._fy(self.grp)
        lse = torch.logsumexp(z, -1)
        val = (lse - torch.gather(z, -1, y.unsqueeze(-1)).squeeze(-1)).mean(1)
        if not grad:
            return val, val
        pi = torch.softmax(z, -1)
        dz = (pi * self.g).sum(-1) - torch.gather(self.g, -1, y.unsqueeze(-1)).squeeze(-1)
        return val, self._xt(dz)

    def hessian(self, u: torch.Tensor) -> torch.Tensor:
        """(B, i, i): (1/K) Σ_k Var_π(g_k) x_k x_kᵀ."""
        pi = torch.softmax(self._logits(u), -1)
        w = (pi * self.g.pow(2)).sum(-1) - (pi * self.g).sum(-1).pow(2)
        K = w.shape[1]
        if self.x.shape[0] == 1:
            x = self.x[0]
            return torch.einsum("bk,ki,km->bim", w, x, x) / K
        x = self.x[self.grp]
        return torch.einsum("bk,bki,bkm->bim", w, x, x) / K

    def dual(self, u: torch.Tensor, nu: torch.Tensor) -> torch.Tensor:
        """A lower bound on the optimum from the primal point u and Newton step ν
        (−inf where the corrected π leaves the simplex)."""
        z = self._logits(u)
        f, y = self._fy(self.grp)
        pi = torch.softmax(z, -1)
        dz = self.g * self._xdot(nu).unsqueeze(-1)
        p = pi * (1 + dz - (pi * dz).sum(-1, keepdim=True))
        onehot = torch.nn.functional.one_hot(y, p.shape[-1]).to(p.dtype)
        theta = p - onehot
        r = f - self.g * self.a.unsqueeze(-1)  # z at u = 0
        val = ((theta * r).sum(-1) + _entropy(p.clamp(min=0))).mean(1)
        rho = self._xt((theta * self.g).sum(-1))  # (1/K) Σ M_kᵀθ_k, ~0 by construction
        val = val - (u * rho).sum(1).abs()
        return torch.where((p >= 0).all(-1).all(-1), val, torch.full_like(val, -math.inf))

    def recession(self, b: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """LP data for problem b: rows of ``A_ub d ≤ 0``, rows of ``A_eq d = 0`` and the
        objective c (Σ of all (M_k d)[o] − (M_k d)[y_k], to minimise)."""
        x = self.x[0] if self.x.shape[0] == 1 else self.x[self.grp[b]]
        _, y = self._fy(self.grp[b:b + 1])
        g = self.g[b]
        s = g - torch.gather(g, -1, y[0].unsqueeze(-1))  # (K, o): (g_o − g_y), 0 at o = y
        tol = 1e-12 * s.abs().amax().clamp(min=1e-300)
        pos = (s > tol).any(-1)
        neg = (s < -tol).any(-1)
        ub = torch.cat([x[pos & ~neg], -x[neg & ~pos]])
        eq = x[pos & neg]
        c = (s.sum(-1)[:, None] * x).sum(0)
        return ub, eq, c


class ChainCE:
    """One problem in which whole layers vary (layer scale: one layer; network: all).

    Per layer: J (K, o, n) (``None`` = identity), x (K, i), a (K, n); shared f (K, o), y (K,).
    u is the concatenation of each layer's augmented weights flattened neuron-major."""

    def __init__(self, f: torch.Tensor, y: torch.Tensor,
                 layers: Sequence[tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]]
                 ) -> None:
        self.f, self.y = f, y
        self.layers = [(J if J is not None else
                        torch.eye(f.shape[1], dtype=f.dtype, device=f.device)
                        .expand(f.shape[0], -1, -1), x, a) for J, x, a in layers]
        self.sizes = [a.shape[1] * x.shape[1] for _, x, a in self.layers]

    def take(self, idx: torch.Tensor) -> ChainCE:
        return self

    def _split(self, u: torch.Tensor) -> list[torch.Tensor]:
        out, o = [], 0
        for (_, x, a), n in zip(self.layers, self.sizes, strict=True):
            out.append(u[0, o:o + n].reshape(a.shape[1], x.shape[1]))
            o += n
        return out

    def _dz(self, vs: Sequence[torch.Tensor], shift: bool) -> torch.Tensor:
        z = torch.zeros_like(self.f)
        for (J, x, a), V in zip(self.layers, vs, strict=True):
            d = x @ V.T - (a if shift else 0)
            z = z + torch.einsum("koj,kj->ko", J, d)
        return z

    def value(self, u: torch.Tensor) -> torch.Tensor:
        z = self.f + self._dz(self._split(u), True)
        return (torch.logsumexp(z, -1) - z.gather(1, self.y[:, None]).squeeze(1)).mean()[None]

    def value_grad(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.f + self._dz(self._split(u), True)
        val = (torch.logsumexp(z, -1) - z.gather(1, self.y[:, None]).squeeze(1)).mean()
        r = torch.softmax(z, -1)
        r[torch.arange(len(self.y)), self.y] -= 1
        grads = [(torch.einsum("koj,ko->kj", J, r).T @ x).reshape(-1) / len(self.y)
                 for J, x, _ in self.layers]
        return val[None], torch.cat(grads)[None]

    def hessian(self, u: torch.Tensor) -> torch.Tensor:
        """(1, D, D): (1/K) Σ_k G_kᵀ (diag π − ππᵀ) G_k in the layer-block layout."""
        z = self.f + self._dz(self._split(u), True)
        pi = torch.softmax(z, -1)
        K = len(self.y)
        D = sum(self.sizes)
        H = torch.empty(D, D, dtype=z.dtype, device=z.device)
        offs = [sum(self.sizes[:i]) for i in range(len(self.sizes))]
        for l_, (Jl, xl, al) in enumerate(self.layers):
            for m_, (Jm, xm, am) in enumerate(self.layers):
                if m_ < l_:
                    continue
                pj = pi.unsqueeze(-1) * Jm
                CJ = pj - pi.unsqueeze(-1) * pj.sum(1, keepdim=True)
                KK = torch.einsum("koj,kon->kjn", Jl, CJ).reshape(K, -1)
                XX = (xl.unsqueeze(2) * xm.unsqueeze(1)).reshape(K, -1)
                blk = (KK.T @ XX / K).reshape(al.shape[1], am.shape[1], xl.shape[1],
                                               xm.shape[1])
                blk = blk.permute(0, 2, 1, 3).reshape(self.sizes[l_], self.sizes[m_])
                H[offs[l_]:offs[l_] + self.sizes[l_], offs[m_]:offs[m_] + self.sizes[m_]] = blk
                H[offs[m_]:offs[m_] + self.sizes[m_], offs[l_]:offs[l_] + self.sizes[l_]] = blk.T
        return H[None]

    def dual(self, u: torch.Tensor, nu: torch.Tensor) -> torch.Tensor:
        vs = self._split(u)
        z = self.f + self._dz(vs, True)
        pi = torch.softmax(z, -1)
        dz = self._dz(self._split(nu), False)
        p = pi * (1 + dz - (pi * dz).sum(-1, keepdim=True))
        onehot = torch.nn.functional.one_hot(self.y, p.shape[-1]).to(p.dtype)
        theta = p - onehot
        r = z - self._dz(vs, False)
        val = ((theta * r).sum(-1) + _entropy(p.clamp(min=0))).mean()
        rho = torch.cat([(torch.einsum("koj,ko->kj", J, theta).T @ x).reshape(-1)
                         for J, x, _ in self.layers]) / len(self.y)
        val = val - (u[0] * rho).sum().abs()
        return torch.where((p >= 0).all(), val, torch.full_like(val, -math.inf))[None]

    def recession(self, b: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        del b
        rows = []
        for J, x, _ in self.layers:
            dJ = J - J.gather(1, self.y[:, None, None].expand(-1, 1, J.shape[2]))  # (K, o, n)
            rows.append((dJ.unsqueeze(-1) * x[:, None, None, :]).reshape(
                J.shape[0], J.shape[1], -1))
        R = torch.cat(rows, dim=-1)  # (K, o, D)
        keep = torch.ones(R.shape[:2], dtype=torch.bool, device=R.device)
        keep[torch.arange(len(self.y)), self.y] = False
        ub = R[keep]
        return ub, ub[:0], ub.sum(0)


def unattained(problem: NeuronCE | ChainCE, b: int, max_entries: int = 30_000_000
               ) -> bool | None:
    """True when the infimum of problem b is not attained (a strict recession direction
    exists), False when it is, None when the test could not run (scipy missing, too big)."""
    try:
        from scipy.optimize import linprog
    except ImportError:  # scipy is optional: attainment then stays unknown
        return None
    ub, eq, c = problem.recession(b)
    D = c.shape[0]
    if (ub.shape[0] + eq.shape[0]) * D > max_entries:
        return None
    scale = c.abs().sum().item()
    if scale == 0.0:
        return False
    res = linprog(c.cpu().numpy() / scale,
                  A_ub=ub.cpu().numpy() if ub.shape[0] else None,
                  b_ub=[0.0] * ub.shape[0] if ub.shape[0] else None,
                  A_eq=eq.cpu().numpy() if eq.shape[0] else None,
                  b_eq=[0.0] * eq.shape[0] if eq.shape[0] else None,
                  bounds=[(-1.0, 1.0)] * D, method="highs")
    if res.status != 0:
        return None
    return bool(res.fun < -1e-9)


def _pinv_solve(H: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """H⁺ g per problem, eigenvalues below 1e-13·λ_max treated as zero."""
    lam, Q = torch.linalg.eigh(H)
    keep = lam > lam[:, -1:].clamp(min=1e-300) * 1e-13
    inv = torch.where(keep, 1.0 / torch.where(keep, lam, torch.ones_like(lam)),
                      torch.zeros_like(lam))
    return torch.einsum("bdk,bk->bd", Q, torch.einsum("bdk,bd->bk", Q, g) * inv)


def newton(problem: NeuronCE | ChainCE, x0: torch.Tensor, tol: float, max_iter: int
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Damped Newton for the unconstrained problem; stops per problem when the duality gap
    is ≤ tol. Returns best point, value, gap and iterations (call only where attained)."""
    B = x0.shape[0]
    x = x0.clone()
    best_x, dev, dt = x0.clone(), x0.device, x0.dtype
    best_v = torch.full((B,), math.inf, dtype=dt, device=dev)
    best_gap = torch.full((B,), math.inf, dtype=dt, device=dev)
    its = torch.zeros(B, dtype=torch.int64, device=dev)
    active = torch.arange(B, device=dev)
    for it in range(min(max_iter, 200)):
        sub = problem.take(active)
        xa = x[active]
        v, g = sub.value_grad(xa)
        step = -_pinv_solve(sub.hessian(xa), g)
        gap = (v - sub.dual(xa, step)).clamp(min=0)
        gap = torch.where(torch.isnan(gap), torch.full_like(gap, math.inf), gap)
        better = gap < best_gap[active]
        bi = active[better]
        best_x[bi], best_v[bi], best_gap[bi] = xa[better], v[better], gap[better]
        its[active] = it
        keep = gap > tol
        active, xa, v, g, step = active[keep], xa[keep], v[keep], g[keep], step[keep]
        if not active.numel():
            break
        sub = problem.take(active)
        slope = (g * step).sum(1)
        t = torch.ones_like(v)
        for _ in range(40):
            vn = sub.value(xa + t[:, None] * step)
            ok = vn <= v + 0.25 * t * slope
            if bool(ok.all()):
                break
            t = torch.where(ok, t, 0.5 * t)
        x[active] = xa + t[:, None] * step
    return best_x, best_v, best_gap, its
