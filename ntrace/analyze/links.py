"""Per-sample losses that are not quadratic, as functions ψ(z, y) of the Taylor output z
(length o): what the iterative solvers and their duality certificates need of each.

- ``cross_entropy``: ψ = logsumexp(z) − z_y, y a class index;
- ``bce_with_logits``: ψ = (1/o) Σ_o [log(1 + e^{z_o}) − y_o z_o], y in [0, 1]^o.

Both are ψ(z) = max_π [π·z − φ(π)] − (linear in z) with φ convex on a box or simplex, which
gives the Fenchel dual used as a certificate (:mod:`ntrace.analyze.crossentropy`): for any
feasible π_k with Σ_k M_kᵀ θ_k = 0, ``(1/K) Σ_k [θ_k·r_k + H(π_k)]`` is a lower bound on the
minimum, with θ the dual residual and H the entropy term of the link.
"""

from __future__ import annotations

import torch


def _expand(z: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """z (..., o) shaped to broadcast against v (..., o, *extra)."""
    return z.reshape(*z.shape, *([1] * (v.ndim - z.ndim)))


class CrossEntropy:
    name = "cross_entropy"
    classes = True  # targets are class indices

    def loss(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.logsumexp(z, -1) - torch.gather(z, -1, y.unsqueeze(-1)).squeeze(-1)

    def grad(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """∂ψ/∂z = softmax(z) − e_y."""
        r = torch.softmax(z, -1)
        return r - torch.nn.functional.one_hot(y, z.shape[-1]).to(z.dtype)

    def cmul(self, z: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """∇²ψ v = (diag π − ππᵀ) v along the output axis of v (..., o, *extra)."""
        pi = _expand(torch.softmax(z, -1), v)
        pv = pi * v
        return pv - pi * pv.sum(z.ndim - 1, keepdim=True)

    def dual(self, z: torch.Tensor, y: torch.Tensor, dz: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Dual point from softmax(z) moved to first order along the Newton step's output
        change ``dz``: residual θ (..., o), entropy term (...), feasibility (...)."""
        pi = torch.softmax(z, -1)
        p = pi * (1 + dz - (pi * dz).sum(-1, keepdim=True))
        theta = p - torch.nn.functional.one_hot(y, z.shape[-1]).to(z.dtype)
        pc = p.clamp(min=0)
        return theta, -torch.special.xlogy(pc, pc).sum(-1), (p >= 0).all(-1)

    def recession(self, R: torch.Tensor, y: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """LP data of the attainment test from the output rows R (K, o, D) of the design:
        ψ stays bounded along d iff (R d)[o] ≤ (R d)[y] for every o. Returns rows of
        ``A_ub d ≤ 0``, of ``A_eq d = 0`` and the objective (to minimise)."""
        S = R - R.gather(1, y[:, None, None].expand(-1, 1, R.shape[2]))
        keep = torch.ones(S.shape[:2], dtype=torch.bool, device=S.device)
        keep[torch.arange(len(y), device=S.device), y] = False
        ub = S[keep]
        return ub, ub[:0], ub.sum(0)


class BinaryLogistic:
    name = "bce_with_logits"
    classes = False

    def loss(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (torch.nn.functional.softplus(z) - y * z).mean(-1)

    def grad(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (torch.sigmoid(z) - y) / z.shape[-1]

    def cmul(self, z: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        s = torch.sigmoid(z)
        return _expand(s * (1 - s) / z.shape[-1], v) * v

    def dual(self, z: torch.Tensor, y: torch.Tensor, dz: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s = torch.sigmoid(z)
        p = s + s * (1 - s) * dz
        o = z.shape[-1]
        pc = p.clamp(0, 1)
        ent = -(torch.special.xlogy(pc, pc) + torch.special.xlogy(1 - pc, 1 - pc)).sum(-1) / o
        return (p - y) / o, ent, ((p >= 0) & (p <= 1)).all(-1)

    def recession(self, R: torch.Tensor, y: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """softplus(z) − y z stays bounded along δ = (R d)[o] iff δ ≤ 0 where y = 0, δ ≥ 0
        where y = 1 (then it decreases to its infimum), δ = 0 where 0 < y < 1."""
        R = R.reshape(-1, R.shape[-1])
        y = y.reshape(-1)
        one, zero = y >= 1, y <= 0
        ub = torch.cat([R[zero], -R[one]])
        return ub, R[~(one | zero)], ub.sum(0)


Link = CrossEntropy | BinaryLogistic
LINKS: dict[str, Link] = {"cross_entropy": CrossEntropy(), "bce_with_logits": BinaryLogistic()}
