"""The in-memory data of losses that are not quadratic (cross-entropy, binary logistic).

Their hindsight optima need every recorded (round, sample) pair, so the analysis keeps, for
the rounds read so far: outputs and targets, and per layer either the factors of a linear
layer's rank-one design (inputs, pre-activations, Jacobian columns) or, for other kinds, the
designs M (p × row) of the stored neurons and their offsets M w. The memory this takes is
computed before anything is read and refused above ``max_memory``.
"""

from __future__ import annotations

from typing import Any

import torch

import ntrace.analyze.crossentropy as ce
from ntrace.analyze.plan import LayerPlan
from ntrace.analyze.source import RoundBlock, neuron_columns
from ntrace.errors import UsageError
from ntrace.format.sizes import human_bytes
from ntrace.losses import CrossEntropy, Link


def _layer_bytes(lp: LayerPlan, rows: int, outputs: int) -> int:
    if lp.kind.rank_one:
        jac = outputs * len(lp.tracked) if lp.jacobian == "stored" else 0
        return 8 * rows * (lp.d_aug + len(lp.tracked) + jac)
    return 8 * rows * len(lp.stored) * outputs * (lp.d_aug + 1)


class WorkingSet:
    """Data of every (round, sample) up to the last checkpoint, preallocated."""

    def __init__(self, plans: list[LayerPlan], rows: int, outputs: int,
                 device: torch.device, max_memory: int, link: Link | None = None) -> None:
        self.link = link or CrossEntropy()
        classes = self.link.classes
        per = {lp.name: _layer_bytes(lp, rows, outputs) for lp in plans}
        need = 8 * rows * (outputs + (1 if classes else outputs)) + sum(per.values())
        if need > max_memory:
            big = sorted(per.items(), key=lambda kv: -kv[1])[:3]
            parts = ", ".join(f"layer {n}: {human_bytes(b)}" for n, b in big)
            raise UsageError(
                f"the {self.link.name} analysis must hold {human_bytes(need)} of Taylor data in "
                f"memory ({parts}), above max_memory {human_bytes(max_memory)}; analyse "
                "fewer layers (--layer) or neurons (--neuron), fewer Taylor rounds (explicit "
                "--checkpoints ending earlier), or raise --max-memory")
        kw: dict[str, Any] = {"dtype": torch.float64, "device": device}
        self.f = torch.empty(rows, outputs, **kw)
        self.y = (torch.empty(rows, dtype=torch.int64, device=device) if classes
                  else torch.empty(rows, outputs, **kw))
        self.plans = {lp.name: lp for lp in plans}
        self.x: dict[str, torch.Tensor] = {}
        self.a: dict[str, torch.Tensor] = {}
        self.J: dict[str, torch.Tensor | None] = {}
        self.M: dict[str, torch.Tensor] = {}  # (c, rows, o, i) designs of the stored neurons
        self.Mw: dict[str, torch.Tensor] = {}  # (c, rows, o)
        for lp in plans:
            if lp.kind.rank_one:
                self.x[lp.name] = torch.empty(rows, lp.d_aug, **kw)
                self.a[lp.name] = torch.empty(rows, len(lp.tracked), **kw)
                self.J[lp.name] = (torch.empty(rows, outputs, len(lp.tracked), **kw)
                                   if lp.jacobian == "stored" else None)
            else:
                self.M[lp.name] = torch.empty(len(lp.stored), rows, outputs, lp.d_aug, **kw)
                self.Mw[lp.name] = torch.empty(len(lp.stored), rows, outputs, **kw)
        self.rows = 0

    def add(self, block: RoundBlock) -> None:
        b, s = block.sample_loss.shape
        r0, r1 = self.rows, self.rows + b * s
        self.f[r0:r1] = block.output.reshape(b * s, -1)
        self.y[r0:r1] = block.target.reshape(b * s, *block.target.shape[2:])
        for name, lp in self.plans.items():
            lb = block.layers[name]
            if not lp.kind.rank_one:
                M = lb.design()  # (b, s, o, c, i)
                self.M[name][:, r0:r1] = M.reshape(b * s, *M.shape[2:]).permute(2, 0, 1, 3)
                self.Mw[name][:, r0:r1] = lb.offset().reshape(b * s, -1, M.shape[3]
                                                               ).permute(2, 0, 1)
                continue
            self.x[name][r0:r1] = lb.x.reshape(b * s, -1)
            tracked = torch.as_tensor(lp.tracked, device=lb.x.device)
            self.a[name][r0:r1] = lb.pre()[..., tracked].reshape(b * s, -1)
            J = self.J[name]
            if J is not None:
                assert lb.jac is not None
                J[r0:r1] = lb.jac.reshape(b * s, *lb.jac.shape[2:])
        self.rows = r1

    def neurons(self, lp: LayerPlan) -> ce.NeuronCE | ce.DenseCE:
        """The selected neurons' problems over the rows so far."""
        n, name = self.rows, lp.name
        if not lp.kind.rank_one:
            M, Mw = self.M[name], self.Mw[name]
            if len(lp.selected) != len(lp.stored):
                sel = torch.as_tensor(lp.stored_selected, device=M.device)
                M, Mw = M[sel], Mw[sel]
            return ce.DenseCE(M[:, :n], self.f[None, :n] - Mw[:, :n], self.y[None, :n],
                              self.link)
        sel = torch.as_tensor(lp.selected, device=self.f.device)
        J = self.J[name]
        if J is None:
            eye = torch.eye(self.f.shape[1], dtype=self.f.dtype, device=self.f.device)
            g = eye[torch.as_tensor(lp.neurons, device=eye.device)][:, None, :]
            g = g.expand(-1, n, -1)
        else:
            g = J[:n][:, :, sel].permute(2, 0, 1)
        a = self.a[name][:n][:, sel].T
        return ce.NeuronCE(self.f[None, :n], self.y[None, :n], self.x[name][None, :n],
                           g.contiguous(), a.contiguous(),
                           torch.zeros(len(sel), dtype=torch.int64, device=self.f.device),
                           self.link)

    def chain(self, names: list[str]) -> ce.ChainCE:
        """One problem in which the named layers (every neuron tracked) vary together."""
        n = self.rows
        terms: list[ce.Term] = []
        for m in names:
            if m in self.M:
                M = self.M[m][:, :n]  # (j, k, o, i) → (k, o, j·i)
                terms.append(ce.DenseTerm(M.permute(1, 2, 0, 3).reshape(n, M.shape[2], -1),
                                          self.Mw[m][:, :n].sum(0)))
            else:
                J = self.J[m]
                terms.append(ce.KronTerm(None if J is None else J[:n],  # type: ignore[arg-type]
                                         self.x[m][:n], self.a[m][:n]))
        return ce.ChainCE(self.f[:n], self.y[:n], terms, self.link)


def per_round_problem(lp: LayerPlan, block: RoundBlock, outputs: int, link: Link
                      ) -> ce.NeuronCE | ce.DenseCE:
    """Each round's own problem for the selected neurons, rounds-major (round·C + neuron)."""
    lb = block.layers[lp.name]
    b, s = block.sample_loss.shape
    if not lp.kind.rank_one:
        sel = torch.as_tensor(lp.stored_selected, device=block.output.device)
        M = lb.design()[:, :, :, sel]  # (b, s, o, c, i)
        C = M.shape[3]
        r = block.output.unsqueeze(-1) - lb.offset()[..., sel]  # (b, s, o, c)
        y = block.target.repeat_interleave(C, dim=0)
        return ce.DenseCE(M.permute(0, 3, 1, 2, 4).reshape(b * C, s, outputs, -1),
                          r.permute(0, 3, 1, 2).reshape(b * C, s, outputs), y, link)
    g = neuron_columns(lp, lb, outputs)  # (b, s, o, c)
    C = g.shape[-1]
    g = g.permute(0, 3, 1, 2).reshape(b * C, s, outputs)
    a = lb.pre()[..., torch.as_tensor(lp.neurons, device=lb.x.device)]
    a = a.permute(0, 2, 1).reshape(b * C, s)
    grp = torch.arange(b, device=lb.x.device).repeat_interleave(C)
    return ce.NeuronCE(block.output, block.target, lb.x, g.contiguous(), a.contiguous(), grp,
                       link)
