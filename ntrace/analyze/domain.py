"""The comparator set H of the hindsight optimum, and the Frank–Wolfe certificate over it.

H is built from the recorded iterates (the augmented weights [W | b] of the analysed Taylor
rounds): ``ball`` is centred at the mean iterate with radius the largest distance of an
iterate from it (so H holds every iterate); ``box`` is the coordinate-wise range of the
iterates; ``none`` is the whole space. Scales share one definition: a neuron's set is built
from its row, a layer's from the whole matrix, the network's from all layers together.
Problems are batched: index ``B`` first, parameters ``D`` flattened neuron-major.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ntrace.analyze.plan import LayerPlan
from ntrace.analyze.source import TaylorSource


@dataclass(frozen=True)
class Domain:
    """A batch of B comparator sets in R^D (all of one kind)."""

    kind: str
    center: torch.Tensor | None = None  # (B, D) ball
    radius: torch.Tensor | None = None  # (B,) ball
    lower: torch.Tensor | None = None  # (B, D) box
    upper: torch.Tensor | None = None  # (B, D) box
    batch: int = 1  # B (kept for the unconstrained kind, which has no tensors)

    def take(self, idx: torch.Tensor) -> Domain:
        def sel(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x[idx]

        return Domain(self.kind, sel(self.center), sel(self.radius), sel(self.lower),
                      sel(self.upper), int(idx.numel()))

    def repeat(self, k: int) -> Domain:
        """Each problem's set repeated ``k`` times (round-major), for per-round solves."""
        def rep(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x.repeat(k, *([1] * (x.ndim - 1)))

        return Domain(self.kind, rep(self.center), rep(self.radius), rep(self.lower),
                      rep(self.upper), self.batch * k)

    def project(self, u: torch.Tensor) -> torch.Tensor:
        """Euclidean projection of each row of ``u`` onto its set."""
        if self.kind == "ball":
            assert self.center is not None and self.radius is not None
            d = u - self.center
            n = d.norm(dim=1, keepdim=True)
            scale = torch.clamp(self.radius[:, None] / torch.clamp(n, min=1e-300), max=1.0)
            return self.center + d * scale
        if self.kind == "box":
            assert self.lower is not None and self.upper is not None
            return torch.minimum(torch.maximum(u, self.lower), self.upper)
        return u

    def lmo(self, grad: torch.Tensor) -> torch.Tensor:
        """argmin over the set of ⟨grad, s⟩ (closed form for a ball and a box)."""
        if self.kind == "ball":
            assert self.center is not None and self.radius is not None
            n = grad.norm(dim=1, keepdim=True)
            return self.center - self.radius[:, None] * grad / torch.clamp(n, min=1e-300)
        if self.kind == "box":
            assert self.lower is not None and self.upper is not None
            return torch.where(grad > 0, self.lower, self.upper)
        raise ValueError("the unconstrained domain has no linear minimisation oracle")

    def fw_gap(self, u: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """max over the set of ⟨grad, u − s⟩ ≥ f(u) − min f: the Frank–Wolfe certificate."""
        if self.kind == "ball":
            assert self.center is not None and self.radius is not None
            return ((grad * (u - self.center)).sum(1) + self.radius * grad.norm(dim=1))
        if self.kind == "box":
            assert self.lower is not None and self.upper is not None
            return (grad * u).sum(1) - torch.minimum(grad * self.lower, grad * self.upper).sum(1)
        return torch.full((u.shape[0],), math.inf, dtype=u.dtype, device=u.device)

    def start(self) -> torch.Tensor:
        """A feasible starting point: the centre of the set (zero when unconstrained)."""
        if self.kind == "ball":
            assert self.center is not None
            return self.center.clone()
        if self.kind == "box":
            assert self.lower is not None and self.upper is not None
            return 0.5 * (self.lower + self.upper)
        raise ValueError("the unconstrained domain has no centre")

    def size(self) -> torch.Tensor:
        """Radius of a ball, half the diagonal of a box, inf when unconstrained."""
        if self.kind == "ball":
            assert self.radius is not None
            return self.radius
        if self.kind == "box":
            assert self.lower is not None and self.upper is not None
            return 0.5 * (self.upper - self.lower).norm(dim=1)
        return torch.full((self.batch,), math.inf, dtype=torch.float64)


@dataclass
class IterateStats:
    """Mean, range and largest distances of the iterates, per layer, neuron and network."""

    mean: dict[str, torch.Tensor]  # (j, i)
    lower: dict[str, torch.Tensor]  # (j, i)
    upper: dict[str, torch.Tensor]  # (j, i)
    neuron_radius: dict[str, torch.Tensor]  # (j,)
    layer_radius: dict[str, torch.Tensor]  # ()
    network_radius: torch.Tensor  # ()
    count: int

    def neuron(self, kind: str, lp: LayerPlan) -> Domain:
        rows = torch.as_tensor(lp.neurons, device=self.mean[lp.name].device)
        return self._make(kind, self.mean[lp.name][rows], self.neuron_radius[lp.name][rows],
                          self.lower[lp.name][rows], self.upper[lp.name][rows])

    def layer(self, kind: str, lp: LayerPlan) -> Domain:
        n = lp.name
        return self._make(kind, self.mean[n].reshape(1, -1), self.layer_radius[n].reshape(1),
                          self.lower[n].reshape(1, -1), self.upper[n].reshape(1, -1))

    def network(self, kind: str, plans: list[LayerPlan]) -> Domain:
        def cat(d: dict[str, torch.Tensor]) -> torch.Tensor:
            return torch.cat([d[lp.name].reshape(-1) for lp in plans])[None]

        return self._make(kind, cat(self.mean), self.network_radius.reshape(1),
                          cat(self.lower), cat(self.upper))

    @staticmethod
    def _make(kind: str, center: torch.Tensor, radius: torch.Tensor, lower: torch.Tensor,
              upper: torch.Tensor) -> Domain:
        B = len(radius)
        if kind == "ball":
            return Domain("ball", center=center.reshape(B, -1), radius=radius, batch=B)
        if kind == "box":
            return Domain("box", lower=lower.reshape(B, -1), upper=upper.reshape(B, -1),
                          batch=B)
        return Domain("none", batch=B)


def iterate_stats(source: TaylorSource, stop: int) -> IterateStats:
    """Two passes over the weight arrays of Taylor rounds ``[0, stop)``: first the mean and
    range, then the largest distances from the mean (weights only are read)."""
    total: dict[str, torch.Tensor] = {}
    lower: dict[str, torch.Tensor] = {}
    upper: dict[str, torch.Tensor] = {}
    for _, _, ws in source.weight_blocks(0, stop):
        for name, w in ws.items():
            if name not in total:
                total[name] = w.sum(0)
                lower[name], upper[name] = w.amin(0), w.amax(0)
            else:
                total[name] += w.sum(0)
                lower[name] = torch.minimum(lower[name], w.amin(0))
                upper[name] = torch.maximum(upper[name], w.amax(0))
    mean = {k: v / stop for k, v in total.items()}
    nrad = {k: torch.zeros(v.shape[0], dtype=v.dtype, device=v.device) for k, v in mean.items()}
    lrad = {k: torch.zeros((), dtype=v.dtype, device=v.device) for k, v in mean.items()}
    netrad = torch.zeros((), dtype=torch.float64, device=source.device)
    for _, _, ws in source.weight_blocks(0, stop):
        net = None
        for name, w in ws.items():
            sq = (w - mean[name]).pow(2).sum(2)  # (b, j)
            nrad[name] = torch.maximum(nrad[name], sq.amax(0).sqrt())
            lsq = sq.sum(1)  # (b,)
            lrad[name] = torch.maximum(lrad[name], lsq.amax().sqrt())
            net = lsq if net is None else net + lsq
        assert net is not None
        netrad = torch.maximum(netrad, net.amax().sqrt())
    return IterateStats(mean=mean, lower=lower, upper=upper, neuron_radius=nrad,
                        layer_radius=lrad, network_radius=netrad, count=stop)
