"""Negative log-likelihood Taylor losses: linear in the candidate parameters.

With ℓ(f, y) = −f_y the Taylor loss of round t is ``TL_t(u) = −(1/S) Σ_s T_s[y_s]``, and
``T_s[y_s] = f_s[y_s] + M_s[y_s] (u − w)``: an affine function ``gᵀu + c`` whose statistics
(the design rows at the target, summed) accumulate round by round like the MSE Gram
statistics. Its minimum over a ball or box is closed-form; unconstrained it is unbounded
below unless g = 0 (:func:`ntrace.analyze.solve.solve_linear`). Index letters as in
:mod:`ntrace.analyze.source`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ntrace.analyze.plan import LayerPlan
from ntrace.analyze.source import LayerBlock, RoundBlock


@dataclass(frozen=True)
class Affine:
    """A batch of B affine functions ``gᵀu + c`` on R^D."""

    g: torch.Tensor  # (B, D)
    c: torch.Tensor  # (B,)

    def value(self, u: torch.Tensor) -> torch.Tensor:
        return (self.g * u).sum(1) + self.c


def _rows_at_target(lb: LayerBlock, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Design rows at the target output, M[y] (b, s, c, i), and (M w)[y] (b, s, c), for
    the stored neurons."""
    lp = lb.lp
    if lp.kind.rank_one:  # M = g x̃ᵀ: only the column's entry at y is needed
        g = lb.columns(lp.stored)  # (b, s, o, c)
        gy = torch.gather(g, 2, y[:, :, None, None].expand(-1, -1, 1, g.shape[3]))[:, :, 0]
        My = gy.unsqueeze(-1) * lb.x.unsqueeze(2)
    else:
        M = lb.design()  # (b, s, o, c, i)
        My = torch.gather(M, 2, y[:, :, None, None, None].expand(-1, -1, 1, *M.shape[3:]))
        My = My[:, :, 0]
    return My, torch.einsum("bsci,bci->bsc", My, lb.stored_rows())


class NLLStats:
    """Sums over rounds of ``G = (1/S) Σ_s M_s[y_s]`` (per layer, stored neurons),
    ``m = (1/S) Σ_s (M_s w)[y_s]`` and ``F = (1/S) Σ_s f_s[y_s]``."""

    def __init__(self, plans: Sequence[LayerPlan], device: torch.device) -> None:
        self.plans = {lp.name: lp for lp in plans}
        kw: dict[str, Any] = {"dtype": torch.float64, "device": device}
        self.G = {lp.name: torch.zeros(len(lp.stored), lp.d_aug, **kw) for lp in plans}
        self.m = {lp.name: torch.zeros(len(lp.stored), **kw) for lp in plans}
        self.F = torch.zeros((), **kw)
        self.count = 0

    def terms(self, block: RoundBlock
              ) -> tuple[torch.Tensor, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        """Per round: F (b,), and per layer (G (b, c, i), m (b, c))."""
        y = block.target
        s = y.shape[1]
        F = torch.gather(block.output, 2, y.unsqueeze(-1))[..., 0].sum(1) / s
        out = {}
        for name in self.plans:
            My, mw = _rows_at_target(block.layers[name], y)
            out[name] = (My.sum(1) / s, mw.sum(1) / s)
        return F, out

    def add(self, block: RoundBlock) -> None:
        F, per = self.terms(block)
        self.F += F.sum()
        for name, (G, m) in per.items():
            self.G[name] += G.sum(0)
            self.m[name] += m.sum(0)
        self.count += block.stop - block.start

    def neurons(self, lp: LayerPlan) -> Affine:
        sel = torch.as_tensor(lp.stored_selected, device=self.F.device)
        return Affine(-self.G[lp.name][sel] / self.count,
                      (self.m[lp.name][sel] - self.F) / self.count)

    def chain(self, names: Sequence[str]) -> Affine:
        g = torch.cat([self.G[n].reshape(-1) for n in names])[None]
        c = sum((self.m[n].sum() for n in names), -self.F)
        return Affine(-g / self.count, (c / self.count).reshape(1))

    def per_round(self, block: RoundBlock, lp: LayerPlan) -> Affine:
        """Each round's own objective for the selected neurons, rounds-major."""
        F, per = self.terms(block)
        G, m = per[lp.name]
        sel = torch.as_tensor(lp.stored_selected, device=F.device)
        return Affine(-G[:, sel].reshape(-1, lp.d_aug), (m[:, sel] - F[:, None]).reshape(-1))
