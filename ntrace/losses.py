"""The per-sample losses of the spec ('Losses'), in torch: one class per loss id, used by the
recorder (the losses it writes) and the analyzer (Taylor losses and their solvers). The numpy
copy in :mod:`ntrace.format.validate` stays apart on purpose: it is the independent check.

``loss(z, y)`` is ℓ per sample over the last axis of ``z`` (any leading axes): ``mse`` = mean
over outputs of (z − y)²; ``cross_entropy`` = logsumexp(z) − z_y; ``nll`` = −z_y (linear in
z); ``bce_with_logits`` = mean over outputs of log(1 + e^z) − y z. Targets are class indices
for the losses in ``CLASS_TARGET_LOSSES``, values shaped like ``z`` otherwise.

The two losses that are neither quadratic nor linear (the *links* ψ(z, y) of the iterative
solvers) also give their gradient, curvature products, the dual point of their Fenchel
certificate and the recession test of attainment. Both are ψ(z) = max_π [π·z − φ(π)] −
(linear in z) with φ convex on a box or simplex: for any feasible π_k with Σ_k M_kᵀ θ_k = 0,
``(1/K) Σ_k [θ_k·r_k + H(π_k)]`` is a lower bound on the minimum, θ the dual residual and H
the entropy term of the link (:mod:`ntrace.analyze.crossentropy`).
"""

from __future__ import annotations

import torch

from ntrace.errors import UsageError
from ntrace.format.metadata import CLASS_TARGET_LOSSES


def _expand(z: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """z (..., o) shaped to broadcast against v (..., o, *extra)."""
    return z.reshape(*z.shape, *([1] * (v.ndim - z.ndim)))


def _picked(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """z_y: the entry of each row of z at its class index."""
    return torch.gather(z, -1, y.unsqueeze(-1)).squeeze(-1)


class Loss:
    """One loss id of the spec; ``loss(z, y)`` per sample over the last axis of ``z``."""

    name: str

    @property
    def classes(self) -> bool:
        """True when targets are class indices."""
        return self.name in CLASS_TARGET_LOSSES

    def loss(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class MSE(Loss):
    name = "mse"

    def loss(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (z - y).pow(2).mean(dim=-1)


class NLL(Loss):
    name = "nll"

    def loss(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return -_picked(z, y)


class CrossEntropy(Loss):
    name = "cross_entropy"

    def loss(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.logsumexp(z, -1) - _picked(z, y)

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


class BinaryLogistic(Loss):
    name = "bce_with_logits"

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
LOSSES: dict[str, Loss] = {c.name: c() for c in (MSE, CrossEntropy, BinaryLogistic, NLL)}
LINKS: dict[str, Link] = {k: v for k, v in LOSSES.items()
                          if isinstance(v, CrossEntropy | BinaryLogistic)}


def get_loss(loss_id: str) -> Loss:
    """The loss of spec id ``loss_id``, or a usage error naming the ids there are."""
    if loss_id not in LOSSES:
        raise UsageError(f"unknown loss {loss_id!r}; use mse, cross_entropy, bce_with_logits "
                         "or nll")
    return LOSSES[loss_id]


def per_sample_loss(loss_id: str, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """ℓ_i for each row i of a model's ``output`` (batch, *outputs), target checked against
    it; the minibatch loss is the mean of these. Evaluated in float64 and returned in the
    output's dtype, so a float32 loss is correctly rounded whatever cancels in the formula."""
    loss = get_loss(loss_id)
    if loss_id in CLASS_TARGET_LOSSES:
        if target.ndim != 1 or target.dtype not in (torch.int64, torch.int32, torch.uint8):
            raise UsageError(f"{loss_id}: target must be a 1-D tensor of class indices, found "
                             f"shape {tuple(target.shape)} dtype {target.dtype}")
        y = target.long()
    else:
        if target.shape != output.shape:
            raise UsageError(f"{loss_id}: target shape {tuple(target.shape)} differs from "
                             f"output shape {tuple(output.shape)}")
        y = target.flatten(1).to(torch.float64)
    return loss.loss(output.flatten(1).to(torch.float64), y).to(output.dtype)
