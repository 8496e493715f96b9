"""MSE Taylor losses as quadratics, and their Gram statistics accumulated round by round.

With MSE every Taylor loss is ``q(u) = uᵀ A u − 2 bᵀ u + c`` in the (augmented, flattened
neuron-major) candidate parameters ``u``. The hindsight objective ``(1/T) Σ_{t<T} TL_t`` is
the same quadratic with summed statistics divided by T, so statistics are accumulated once,
incrementally, and every checkpoint costs only its new rounds.

Derivation (one round, S samples, p outputs, e_s = f_s − y_s, a_s the pre-activations):
neuron j with Jacobian column g_s: α_s = |g_s|²/p, β_s = g_s·e_s/p, then
``A = Σ_s α_s x̃x̃ᵀ/S``, ``b = Σ_s (α_s a_sj − β_s) x̃/S``, ``c = Σ_s (|e|²/p − 2β a + α a²)/S``.
Layer/network: T_s = h_s + G_s u with G_s = [J_l ⊗ x̃_l]_l and h_s = e_s − Σ_l J_l a_l,
so ``A = Σ_s G_sᵀG_s/(Sp)`` (blocks Σ_s (J_lᵀJ_m) ⊗ (x̃_l x̃_mᵀ)), ``b = −Σ_s G_sᵀh_s/(Sp)``,
``c = Σ_s |h_s|²/(Sp)``. Layers of other kinds (convolutions, embeddings) have no Kronecker
structure: their designs M (p × row per neuron, :mod:`ntrace.ops`) are formed, and
the same formulas use G_s = [M_s]; Hessian blocks touching such a layer are Σ G_lᵀG_m.
Index letters as in :mod:`ntrace.analyze.source`; ``k`` = (b, s).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ntrace.analyze.plan import LayerPlan
from ntrace.analyze.source import RoundBlock, full_jacobian, neuron_columns


@dataclass(frozen=True)
class Quadratic:
    """A batch of B quadratics ``uᵀ A u − 2 bᵀ u + c`` on R^D."""

    A: torch.Tensor  # (B, D, D), symmetric positive semi-definite
    b: torch.Tensor  # (B, D)
    c: torch.Tensor  # (B,)

    def value(self, u: torch.Tensor) -> torch.Tensor:
        Au = torch.bmm(self.A, u.unsqueeze(-1)).squeeze(-1)
        return (u * Au).sum(1) - 2 * (self.b * u).sum(1) + self.c

    def value_grad(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        Au = torch.bmm(self.A, u.unsqueeze(-1)).squeeze(-1)
        val = (u * Au).sum(1) - 2 * (self.b * u).sum(1) + self.c
        return val, 2 * (Au - self.b)

    def take(self, idx: torch.Tensor) -> Quadratic:
        return Quadratic(self.A[idx], self.b[idx], self.c[idx])


def _outer(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Row-wise outer products flattened: (k, i), (k, m) → (k, i·m)."""
    return (x.unsqueeze(2) * y.unsqueeze(1)).reshape(x.shape[0], -1)


class _NeuronStats:
    """Running sums of one layer's neuron-scale quadratics (one per selected neuron);
    subclasses say how a block of rounds contributes (``terms``) and how the sums become the
    hindsight quadratic (``quadratic``)."""

    lp: LayerPlan
    A: torch.Tensor
    b: torch.Tensor
    c: torch.Tensor
    count: int

    def terms(self, block: RoundBlock, err: torch.Tensor, per_round: bool
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def add(self, block: RoundBlock, err: torch.Tensor) -> None:
        A, b, c = self.terms(block, err, per_round=False)
        self.A += A
        self.b += b
        self.c += c
        self.count += block.stop - block.start

    def per_round(self, block: RoundBlock, err: torch.Tensor) -> Quadratic:
        """Each round's own quadratic, rounds-major: problem index = round·C + neuron."""
        A, b, c = self.terms(block, err, per_round=True)
        i = self.lp.d_aug
        A = A.reshape(-1, i, i)
        return Quadratic(0.5 * (A + A.transpose(1, 2)), b.reshape(-1, i), c.reshape(-1))


class NeuronGram(_NeuronStats):
    """Neuron-scale statistics of one layer's selected neurons (one quadratic per neuron)."""

    def __init__(self, lp: LayerPlan, outputs: int, device: torch.device) -> None:
        self.lp = lp
        self.p = outputs
        c, i = len(lp.selected), lp.d_aug
        kw: dict[str, Any] = {"dtype": torch.float64, "device": device}
        # identity Jacobian (output layer): α = 1/p for every neuron, so one shared A
        self.shared = lp.jacobian == "identity"
        self.A = torch.zeros(1 if self.shared else c, i * i, **kw)
        self.b = torch.zeros(c, i, **kw)
        self.c = torch.zeros(c, **kw)
        self.count = 0

    def terms(self, block: RoundBlock, err: torch.Tensor, per_round: bool
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(A, b, c) of this block: summed over rounds, or per round with a leading b axis."""
        lb = block.layers[self.lp.name]
        bsz, s = lb.x.shape[:2]
        cols = torch.as_tensor(self.lp.neurons, device=lb.x.device)
        if self.shared:  # g_s = e_j: α = 1/p, β = e_sj/p
            beta = err[..., cols] / self.p
            alpha = torch.full_like(beta, 1.0 / self.p)
        else:
            g = neuron_columns(self.lp, lb, self.p)  # (b, s, o, c)
            alpha = g.pow(2).sum(2) / self.p  # (b, s, c)
            beta = torch.einsum("bsoc,bso->bsc", g, err) / self.p
        a = lb.pre()[..., cols]
        lin = alpha * a - beta
        const = err.pow(2).sum(-1, keepdim=True) / self.p - 2 * beta * a + alpha * a.pow(2)
        x = lb.x
        w = alpha[..., :1] if self.shared else alpha
        if per_round:
            xx = (x.unsqueeze(3) * x.unsqueeze(2)).reshape(bsz, s, -1)  # (b, s, i·i)
            A = torch.bmm(w.transpose(1, 2), xx) / s  # (b, c, i·i)
            if self.shared:
                A = A.expand(-1, alpha.shape[-1], -1)
            bb = torch.einsum("bsc,bsi->bci", lin, x) / s
            return A, bb, const.sum(1) / s
        k = bsz * s
        xf = x.reshape(k, -1)
        wf = w.reshape(k, -1)
        if wf.shape[1] <= xf.shape[1]:  # Σ_k w_kc x_k x_kᵀ without forming every x_k x_kᵀ
            A = torch.bmm((wf.T.unsqueeze(2) * xf).transpose(1, 2),
                          xf.expand(wf.shape[1], -1, -1)).reshape(wf.shape[1], -1) / s
        else:
            A = wf.T @ _outer(xf, xf) / s
        bb = lin.reshape(k, -1).T @ xf / s
        return A, bb, const.sum((0, 1)) / s

    def quadratic(self) -> Quadratic:
        """The hindsight quadratic over the rounds added so far (one per selected neuron)."""
        i = self.lp.d_aug
        A = self.A.reshape(-1, i, i) / self.count
        A = 0.5 * (A + A.transpose(1, 2))
        if self.shared:
            A = A.expand(len(self.lp.selected), -1, -1).contiguous()
        return Quadratic(A, self.b / self.count, self.c / self.count)


class DenseNeuronGram(_NeuronStats):
    """Neuron-scale statistics of a layer of another kind, from its designs M (b, s, o, c, i):
    T − y = M_c u − h_c with h_c = M_c w_c − e, so ``A = Σ_s M_cᵀM_c/(Sp)``,
    ``b = Σ_s M_cᵀh_c/(Sp)``, ``c = Σ_s |h_c|²/(Sp)`` (one quadratic per selected neuron)."""

    def __init__(self, lp: LayerPlan, outputs: int, device: torch.device) -> None:
        self.lp = lp
        self.p = outputs
        c, i = len(lp.selected), lp.d_aug
        kw: dict[str, Any] = {"dtype": torch.float64, "device": device}
        self.A = torch.zeros(c, i, i, **kw)
        self.b = torch.zeros(c, i, **kw)
        self.c = torch.zeros(c, **kw)
        self.count = 0

    def terms(self, block: RoundBlock, err: torch.Tensor, per_round: bool
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        lb = block.layers[self.lp.name]
        sel = torch.as_tensor(self.lp.stored_selected, device=err.device)
        M = lb.design()[:, :, :, sel]  # (b, s, o, c, i)
        h = lb.offset()[..., sel] - err.unsqueeze(-1)  # (b, s, o, c)
        scale = 1.0 / (M.shape[1] * self.p)
        if per_round:
            return (torch.einsum("bsoci,bsocm->bcim", M, M) * scale,
                    torch.einsum("bsoci,bsoc->bci", M, h) * scale,
                    h.pow(2).sum((1, 2)) * scale)
        return (torch.einsum("bsoci,bsocm->cim", M, M) * scale,
                torch.einsum("bsoci,bsoc->ci", M, h) * scale, h.pow(2).sum((0, 1, 2)) * scale)

    def quadratic(self) -> Quadratic:
        A = self.A / self.count
        return Quadratic(0.5 * (A + A.transpose(1, 2)), self.b / self.count,
                         self.c / self.count)



def layer_factors(lp: LayerPlan, block: RoundBlock, outputs: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A layer's Taylor term over a block's k = (b, s) samples, every neuron varying:
    linear layers (J (k, o, n), x (k, i), J a (k, o)), the design J ⊗ x kept factored; other
    kinds (G (k, o, n·i), empty, G w (k, o)) with the design G formed."""
    lb = block.layers[lp.name]
    k = lb.rounds * lb.samples
    if lp.kind.rank_one:
        j = full_jacobian(lp, lb, outputs).reshape(k, outputs, -1)
        return j, lb.x.reshape(k, -1), torch.einsum("koj,kj->ko", j, lb.pre().reshape(k, -1))
    G = lb.design().reshape(k, outputs, -1)
    return G, G.new_empty(0), lb.offset().sum(-1).reshape(k, outputs)


class ChainGram:
    """Layer-scale statistics of ``layer_names`` and, when ``network``, the network-scale
    statistics of all ``plans`` together (Hessian blocks of every pair of layers)."""

    def __init__(self, plans: Sequence[LayerPlan], layer_names: Sequence[str], network: bool,
                 outputs: int, device: torch.device) -> None:
        self.plans = list(plans)
        self.layer_names = list(layer_names)
        self.network = network
        self.p = outputs
        kw: dict[str, Any] = {"dtype": torch.float64, "device": device}
        self.kw = kw
        self.H: dict[tuple[int, int], torch.Tensor] = {}
        for l_, a in enumerate(self.plans):
            for m_, b in enumerate(self.plans):
                if (l_ == m_ and (network or a.name in self.layer_names)) or \
                        (network and l_ < m_):
                    # linear pairs keep the Kronecker layout (n_l n_m, i_l i_m); others (D_l, D_m)
                    self.H[(l_, m_)] = (torch.zeros(a.out_features * b.out_features,
                                                    a.d_aug * b.d_aug, **kw)
                                        if self._kron(l_, m_) else torch.zeros(a.dim, b.dim, **kw))
        self.bL = {p.name: torch.zeros(p.out_features, p.d_aug, **kw) for p in self.plans
                   if p.name in self.layer_names}
        self.cL = {n: torch.zeros((), **kw) for n in self.bL}
        self.bN = [torch.zeros(p.out_features, p.d_aug, **kw) for p in self.plans] \
            if network else []
        self.cN = torch.zeros((), **kw)
        self.count = 0

    def add(self, block: RoundBlock, err: torch.Tensor) -> None:
        bsz, s = err.shape[:2]
        k = bsz * s
        scale = 1.0 / (s * self.p)
        e = err.reshape(k, -1)
        J, X, Ja = zip(*(layer_factors(lp, block, self.p) for lp in self.plans), strict=True)
        dense: dict[int, torch.Tensor] = {}

        def design(l_: int) -> torch.Tensor:  # (k·o, D_l), linear ones formed on demand
            if l_ not in dense:
                G = J[l_] if not self.plans[l_].kind.rank_one else \
                    J[l_].unsqueeze(-1) * X[l_][:, None, None, :]
                dense[l_] = G.reshape(k * self.p, -1)
            return dense[l_]

        for (l_, m_), acc in self.H.items():
            if self._kron(l_, m_):
                KK = torch.einsum("koj,kon->kjn", J[l_], J[m_]).reshape(k, -1)
                acc.addmm_(KK.T, _outer(X[l_], X[m_]), alpha=scale)
            else:
                acc.addmm_(design(l_).T, design(m_), alpha=scale)
        for l_, lp in enumerate(self.plans):
            if lp.name in self.bL:
                h = e - Ja[l_]
                self.bL[lp.name] -= self._adjoint(l_, J[l_], X[l_], h) * scale
                self.cL[lp.name] += h.pow(2).sum() * scale
        if self.network:
            h = e - torch.stack(Ja).sum(0)
            for l_ in range(len(self.plans)):
                self.bN[l_] -= self._adjoint(l_, J[l_], X[l_], h) * scale
            self.cN += h.pow(2).sum() * scale
        self.count += block.stop - block.start

    def _kron(self, l_: int, m_: int) -> bool:
        return self.plans[l_].kind.rank_one and self.plans[m_].kind.rank_one

    def _adjoint(self, l_: int, J: torch.Tensor, X: torch.Tensor, h: torch.Tensor
                 ) -> torch.Tensor:
        """Σ_k G_kᵀ h_k as (n, i)."""
        lp = self.plans[l_]
        if lp.kind.rank_one:
            return torch.einsum("koj,ko->kj", J, h).T @ X
        return torch.einsum("kod,ko->d", J, h).reshape(lp.out_features, lp.d_aug)

    def _block(self, l_: int, m_: int, out: torch.Tensor) -> None:
        """Copy the (l, m) Hessian block, divided by the round count, into ``out``."""
        a, b = self.plans[l_], self.plans[m_]
        if l_ > m_:
            tmp = torch.empty(b.dim, a.dim, **self.kw)
            self._block(m_, l_, tmp)
            out.copy_(tmp.T)
            return
        if not self._kron(l_, m_):
            out.copy_(self.H[(l_, m_)]).div_(self.count)
            return
        r = self.H[(l_, m_)].view(a.out_features, b.out_features, a.d_aug, b.d_aug)
        out.view(a.out_features, a.d_aug, b.out_features, b.d_aug).copy_(r.permute(0, 2, 1, 3))
        out.div_(self.count)

    def layer(self, name: str) -> Quadratic:
        """The hindsight quadratic of one layer (batch of one)."""
        l_ = next(i for i, p in enumerate(self.plans) if p.name == name)
        D = self.plans[l_].dim
        A = torch.empty(1, D, D, **self.kw)
        self._block(l_, l_, A[0])
        return Quadratic(A, (self.bL[name] / self.count).reshape(1, -1),
                         (self.cL[name] / self.count).reshape(1))

    def whole(self) -> Quadratic:
        """The hindsight quadratic of the network (batch of one)."""
        dims = [p.dim for p in self.plans]
        D = sum(dims)
        A = torch.empty(1, D, D, **self.kw)
        offs = [sum(dims[:i]) for i in range(len(dims))]
        for l_ in range(len(self.plans)):
            for m_ in range(len(self.plans)):
                self._block(l_, m_, A[0, offs[l_]:offs[l_] + dims[l_],
                                      offs[m_]:offs[m_] + dims[m_]])
        b = torch.cat([x.reshape(-1) for x in self.bN]) / self.count
        return Quadratic(A, b[None], (self.cN / self.count).reshape(1))
