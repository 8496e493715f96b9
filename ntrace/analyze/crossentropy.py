"""Cross-entropy (and binary logistic) Taylor losses: batched objectives, a duality-gap
certificate, attainment test.

Such a Taylor loss is not quadratic, so its hindsight optimum needs every recorded
(round, sample) pair ``k``: the logits are ``z_k(u) = r_k + M_k u`` (linear in the candidate
parameters u) and ``f(u) = (1/K) Σ_k ψ(z_k, y_k)`` with ψ from :mod:`ntrace.losses`
(cross-entropy: logsumexp(z) − z_y). The working set (:mod:`ntrace.analyze.workingset`) is
held in memory, bounded by ``max_memory``. Three problem classes: :class:`NeuronCE` (linear
layers, M_k = g_k x_kᵀ kept factored), :class:`DenseCE` (other kinds, M_k formed) and
:class:`ChainCE` (whole layers).

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
from dataclasses import dataclass

import torch

from ntrace.analyze.solve import curvature, lipschitz
from ntrace.losses import CrossEntropy, Link

CE = CrossEntropy()


class NeuronCE:
    """Neuron-scale problems of a linear layer: only one row u (length i) varies per problem,
    and the design is rank one, z_k = f_k + g_k (x_k·u − a_k).

    Data are grouped (``R`` groups of ``K`` samples: R = 1 for hindsight, R = rounds for
    per-round best responses); problem b uses group ``grp[b]``. Shapes: f (R, K, o),
    y (R, K) class indices or (R, K, o) float targets, x (R, K, i) shared by a group;
    g (B, K, o) Jacobian columns, a (B, K)."""

    def __init__(self, f: torch.Tensor, y: torch.Tensor, x: torch.Tensor, g: torch.Tensor,
                 a: torch.Tensor, grp: torch.Tensor, link: Link = CE) -> None:
        self.f, self.y, self.x, self.g, self.a, self.grp = f, y, x, g, a, grp
        self.link = link

    def take(self, idx: torch.Tensor) -> NeuronCE:
        return NeuronCE(self.f, self.y, self.x, self.g[idx], self.a[idx], self.grp[idx],
                        self.link)

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
            return self.f.expand(B, *self.f.shape[1:]), self.y.expand(B, *self.y.shape[1:])
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
        val = self.link.loss(z, y).mean(1)
        if not grad:
            return val, val
        dz = (self.link.grad(z, y) * self.g).sum(-1)
        return val, self._xt(dz)

    def hessian(self, u: torch.Tensor) -> torch.Tensor:
        """(B, i, i): (1/K) Σ_k (g_kᵀ C_k g_k) x_k x_kᵀ, C_k the link's curvature."""
        z = self._logits(u)
        w = (self.g * self.link.cmul(z, self.g)).sum(-1)
        K = w.shape[1]
        if self.x.shape[0] == 1:
            x = self.x[0]
            return torch.einsum("bk,ki,km->bim", w, x, x) / K
        x = self.x[self.grp]
        return torch.einsum("bk,bki,bkm->bim", w, x, x) / K

    def dual(self, u: torch.Tensor, nu: torch.Tensor) -> torch.Tensor:
        """A lower bound on the optimum from the primal point u and Newton step ν
        (−inf where the corrected dual point is infeasible)."""
        z = self._logits(u)
        f, y = self._fy(self.grp)
        theta, ent, ok = self.link.dual(z, y, self.g * self._xdot(nu).unsqueeze(-1))
        r = f - self.g * self.a.unsqueeze(-1)  # z at u = 0
        val = ((theta * r).sum(-1) + ent).mean(1)
        rho = self._xt((theta * self.g).sum(-1))  # (1/K) Σ M_kᵀθ_k, ~0 by construction
        val = val - (u * rho).sum(1).abs()
        return torch.where(ok.all(-1), val, torch.full_like(val, -math.inf))

    def recession(self, b: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """LP data for problem b: rows of ``A_ub d ≤ 0``, rows of ``A_eq d = 0`` and the
        objective c (to minimise; a negative minimum means a strict recession direction)."""
        x = self.x[0] if self.x.shape[0] == 1 else self.x[self.grp[b]]
        _, y = self._fy(self.grp[b:b + 1])
        g = self.g[b]
        if not isinstance(self.link, CrossEntropy):
            return self.link.recession(g.unsqueeze(-1) * x[:, None, :], y[0])
        s = g - torch.gather(g, -1, y[0].unsqueeze(-1))  # (K, o): (g_o − g_y), 0 at o = y
        tol = 1e-12 * s.abs().amax().clamp(min=1e-300)
        pos = (s > tol).any(-1)
        neg = (s < -tol).any(-1)
        ub = torch.cat([x[pos & ~neg], -x[neg & ~pos]])
        eq = x[pos & neg]
        c = (s.sum(-1)[:, None] * x).sum(0)
        return ub, eq, c


class DenseCE:
    """Neuron-scale problems with a full design (layer kinds other than linear): problem b
    has z_k = r_k + M_k u, M (B, K, o, D), r (B, K, o) = the outputs with the neuron's own
    term removed; y (B or 1, K) class indices or (B or 1, K, o) float targets."""

    def __init__(self, M: torch.Tensor, r: torch.Tensor, y: torch.Tensor, link: Link = CE
                 ) -> None:
        self.M, self.r, self.y, self.link = M, r, y, link

    def take(self, idx: torch.Tensor) -> DenseCE:
        return DenseCE(self.M[idx], self.r[idx], self.y if self.y.shape[0] == 1 else
                       self.y[idx], self.link)

    def _y(self) -> torch.Tensor:
        return self.y.expand(self.M.shape[0], *self.y.shape[1:])

    def _z(self, u: torch.Tensor) -> torch.Tensor:
        return self.r + torch.einsum("bkod,bd->bko", self.M, u)

    def value(self, u: torch.Tensor) -> torch.Tensor:
        return self.link.loss(self._z(u), self._y()).mean(1)

    def value_grad(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z, y = self._z(u), self._y()
        theta = self.link.grad(z, y)
        return (self.link.loss(z, y).mean(1),
                torch.einsum("bkod,bko->bd", self.M, theta) / z.shape[1])

    def hessian(self, u: torch.Tensor) -> torch.Tensor:
        """(B, D, D): (1/K) Σ_k M_kᵀ C_k M_k."""
        z = self._z(u)
        return torch.einsum("bkod,bkoe->bde", self.M, self.link.cmul(z, self.M)) / z.shape[1]

    def hvp(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Hessian–vector products (B, D) without forming the Hessian."""
        z = self._z(u)
        Cv = self.link.cmul(z, torch.einsum("bkod,bd->bko", self.M, v))
        return torch.einsum("bkod,bko->bd", self.M, Cv) / z.shape[1]

    def dual(self, u: torch.Tensor, nu: torch.Tensor) -> torch.Tensor:
        z = self._z(u)
        dz = torch.einsum("bkod,bd->bko", self.M, nu)
        theta, ent, ok = self.link.dual(z, self._y(), dz)
        val = ((theta * self.r).sum(-1) + ent).mean(1)
        rho = torch.einsum("bkod,bko->bd", self.M, theta) / z.shape[1]
        val = val - (u * rho).sum(1).abs()
        return torch.where(ok.all(-1), val, torch.full_like(val, -math.inf))

    def recession(self, b: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.link.recession(self.M[b], self._y()[b])


@dataclass
class KronTerm:
    """A linear layer in a chain problem: J (K, o, n) (``None`` = identity), augmented
    inputs x (K, i), pre-activations a (K, n); its design is J ⊗ x, never formed."""

    J: torch.Tensor
    x: torch.Tensor
    a: torch.Tensor

    @property
    def size(self) -> int:
        return self.a.shape[1] * self.x.shape[1]

    def apply(self, v: torch.Tensor) -> torch.Tensor:
        return torch.einsum("koj,kj->ko", self.J, self.x @ v.reshape(self.a.shape[1], -1).T)

    def offset(self) -> torch.Tensor:
        return torch.einsum("koj,kj->ko", self.J, self.a)

    def adjoint(self, theta: torch.Tensor) -> torch.Tensor:
        return (torch.einsum("koj,ko->kj", self.J, theta).T @ self.x).reshape(-1)

    def dense(self) -> torch.Tensor:
        return (self.J.unsqueeze(-1) * self.x[:, None, None, :]).reshape(
            self.J.shape[0], self.J.shape[1], -1)


@dataclass
class DenseTerm:
    """A layer of another kind in a chain problem: design G (K, o, D), offset G w (K, o)."""

    G: torch.Tensor
    Gw: torch.Tensor

    @property
    def size(self) -> int:
        return self.G.shape[2]

    def apply(self, v: torch.Tensor) -> torch.Tensor:
        return self.G @ v

    def offset(self) -> torch.Tensor:
        return self.Gw

    def adjoint(self, theta: torch.Tensor) -> torch.Tensor:
        return torch.einsum("kod,ko->d", self.G, theta)

    def dense(self) -> torch.Tensor:
        return self.G


Term = KronTerm | DenseTerm


class ChainCE:
    """One problem in which whole layers vary (layer scale: one layer; network: all).

    ``terms`` hold each layer's design (:class:`KronTerm` or :class:`DenseTerm`); shared
    f (K, o), y (K,) or (K, o). u is the concatenation of each layer's augmented rows
    flattened neuron-major."""

    def __init__(self, f: torch.Tensor, y: torch.Tensor, terms: Sequence[Term],
                 link: Link = CE) -> None:
        self.f, self.y, self.link = f, y, link
        eye = torch.eye(f.shape[1], dtype=f.dtype, device=f.device)
        self.terms = [KronTerm(eye.expand(f.shape[0], -1, -1), t.x, t.a)
                      if isinstance(t, KronTerm) and t.J is None else t for t in terms]
        self.sizes = [t.size for t in self.terms]

    def take(self, idx: torch.Tensor) -> ChainCE:
        return self

    def _split(self, u: torch.Tensor) -> list[torch.Tensor]:
        out, o = [], 0
        for n in self.sizes:
            out.append(u[0, o:o + n])
            o += n
        return out

    def _dz(self, vs: Sequence[torch.Tensor], shift: bool) -> torch.Tensor:
        z = torch.zeros_like(self.f)
        for t, v in zip(self.terms, vs, strict=True):
            z = z + t.apply(v) - (t.offset() if shift else 0)
        return z

    def value(self, u: torch.Tensor) -> torch.Tensor:
        z = self.f + self._dz(self._split(u), True)
        return self.link.loss(z, self.y).mean()[None]

    def value_grad(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.f + self._dz(self._split(u), True)
        val = self.link.loss(z, self.y).mean()
        r = self.link.grad(z, self.y)
        return val[None], torch.cat([t.adjoint(r) for t in self.terms])[None] / len(self.y)

    def hessian(self, u: torch.Tensor) -> torch.Tensor:
        """(1, D, D): (1/K) Σ_k G_kᵀ C_k G_k in the layer-block layout."""
        z = self.f + self._dz(self._split(u), True)
        K = len(self.y)
        D = sum(self.sizes)
        H = torch.empty(D, D, dtype=z.dtype, device=z.device)
        offs = [sum(self.sizes[:i]) for i in range(len(self.sizes))]
        for l_, tl in enumerate(self.terms):
            for m_, tm in enumerate(self.terms):
                if m_ < l_:
                    continue
                if isinstance(tl, KronTerm) and isinstance(tm, KronTerm):
                    CJ = self.link.cmul(z, tm.J)
                    KK = torch.einsum("koj,kon->kjn", tl.J, CJ).reshape(K, -1)
                    XX = (tl.x.unsqueeze(2) * tm.x.unsqueeze(1)).reshape(K, -1)
                    blk = (KK.T @ XX / K).reshape(tl.a.shape[1], tm.a.shape[1], tl.x.shape[1],
                                                   tm.x.shape[1])
                    blk = blk.permute(0, 2, 1, 3).reshape(self.sizes[l_], self.sizes[m_])
                else:
                    blk = torch.einsum("kod,koe->de", tl.dense(),
                                       self.link.cmul(z, tm.dense())) / K
                H[offs[l_]:offs[l_] + self.sizes[l_], offs[m_]:offs[m_] + self.sizes[m_]] = blk
                H[offs[m_]:offs[m_] + self.sizes[m_], offs[l_]:offs[l_] + self.sizes[l_]] = blk.T
        return H[None]

    def dual(self, u: torch.Tensor, nu: torch.Tensor) -> torch.Tensor:
        vs = self._split(u)
        z = self.f + self._dz(vs, True)
        theta, ent, ok = self.link.dual(z, self.y, self._dz(self._split(nu), False))
        r = z - self._dz(vs, False)
        val = ((theta * r).sum(-1) + ent).mean()
        rho = torch.cat([t.adjoint(theta) for t in self.terms]) / len(self.y)
        val = val - (u[0] * rho).sum().abs()
        return torch.where(ok.all(), val, torch.full_like(val, -math.inf))[None]

    def recession(self, b: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        del b
        return self.link.recession(torch.cat([t.dense() for t in self.terms], dim=-1), self.y)


Problem = NeuronCE | DenseCE | ChainCE


def max_curvature(problem: Problem, u: torch.Tensor) -> torch.Tensor:
    """λ_max of each problem's Hessian at u: from the formed Hessian, or from Hessian–vector
    products where the Hessian of a full design would cost K·o times more to form."""
    if isinstance(problem, DenseCE) and problem.M.shape[-1] > 256:
        return curvature(lambda v: problem.hvp(u, v), u)
    return lipschitz(problem.hessian(u)) / 2


def reduce(problem: Problem, center: torch.Tensor
           ) -> tuple[NeuronCE | DenseCE, torch.Tensor] | None:
    """The problem restricted to the row space of its design, around ``center`` (B, D):
    u = center + Qᵀ z with Q (B, r, D) orthonormal rows, r ≤ (samples × outputs). The
    objective depends on u only through M u, so over the whole space or a ball centred at
    ``center`` nothing is lost (a component outside the row space changes no output and
    only uses up radius); values, gradients' norms and certificates are the same in z.
    None when the row space is not much smaller than the parameters (or for chain
    problems)."""
    if isinstance(problem, DenseCE):
        B, K, o, D = problem.M.shape
        if 2 * K * o > D:
            return None
        # Mᵀ = Q R with orthonormal Q (D × K·o): M u = Rᵀ Qᵀ u
        Q, R = torch.linalg.qr(problem.M.reshape(B, K * o, D).transpose(1, 2))
        r = problem.r + torch.einsum("bkod,bd->bko", problem.M, center)
        return DenseCE(R.transpose(1, 2).reshape(B, K, o, -1), r, problem.y,
                       problem.link), Q.transpose(1, 2)
    if isinstance(problem, NeuronCE) and problem.x.shape[0] == 1:
        K, D = problem.x.shape[1:]
        if 2 * K > D:
            return None
        Q, R = torch.linalg.qr(problem.x[0].T)  # x·u − a = (Rᵀ z)_k − (a − x·center)
        a = problem.a - center @ problem.x[0].T
        return (NeuronCE(problem.f, problem.y, R.T[None], problem.g, a, problem.grp,
                         problem.link), Q.T.expand(center.shape[0], -1, -1))
    return None


def unattained(problem: Problem, b: int, max_entries: int = 30_000_000
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


def newton(problem: Problem, x0: torch.Tensor, tol: float, max_iter: int
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
