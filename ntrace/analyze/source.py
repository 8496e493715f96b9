"""Blockwise, lazy reading of a trace's Taylor data into float64 torch tensors.

Only committed rows are read (``Trace.read`` cuts to the commit record), a block of Taylor
rounds at a time, sized so one block stays under ``block_bytes`` of float32 data; nothing
else of the trace is held. Index letters (spec section 1): ``b`` Taylor round within the
block, ``s`` recorded sample, ``o`` output unit, ``j`` neuron, ``c`` position in the layer's
tracked list, ``i`` input feature *augmented* with a trailing 1 when the layer has a bias.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ntrace.analyze.plan import LayerPlan
from ntrace.format.reader import Trace

DTYPE = torch.float64


@dataclass
class LayerBlock:
    """One layer's data for a block of Taylor rounds."""

    x: torch.Tensor  # (b, s, i) augmented inputs
    w: torch.Tensor  # (b, j, i) augmented weights [W | bias], all neurons
    jac: torch.Tensor | None  # (b, s, o, c) tracked Jacobian columns; None = identity J

    def pre(self) -> torch.Tensor:
        """Pre-activations a = W x + bias of every neuron, (b, s, j)."""
        return torch.einsum("bsi,bji->bsj", self.x, self.w)


@dataclass
class RoundBlock:
    """Taylor rounds ``[start, stop)``: outputs, targets, per-sample losses and layer data."""

    start: int
    stop: int
    sample_loss: torch.Tensor  # (b, s)
    output: torch.Tensor  # (b, s, o)
    target: torch.Tensor  # (b, s, o) float for mse, (b, s) int64 for cross_entropy
    layers: dict[str, LayerBlock]


def _augment(x: np.ndarray, bias: bool) -> np.ndarray:
    if not bias:
        return x
    ones = np.ones((*x.shape[:-1], 1), dtype=x.dtype)
    return np.concatenate([x, ones], axis=-1)


class TaylorSource:
    """Iterates over blocks of committed Taylor rounds of ``trace`` for the given layers."""

    def __init__(self, trace: Trace, layers: Sequence[LayerPlan], device: torch.device,
                 block_bytes: int) -> None:
        self.trace = trace
        self.layers = list(layers)
        self.device = device
        self.block_bytes = block_bytes
        a = trace.attrs
        self.samples = a.sampling.samples_per_round
        self.outputs = a.output_size
        self.loss = a.loss.id

    def round_bytes(self, jacobian: bool = True, weights_only: bool = False) -> int:
        """float32 bytes of one Taylor round as read by :meth:`blocks`."""
        s, p = self.samples, self.outputs
        total = 0 if weights_only else 4 * (s + 2 * s * p)
        for lp in self.layers:
            total += 4 * lp.out_features * lp.d_aug
            if not weights_only:
                total += 4 * s * lp.d_aug
                if jacobian and lp.jacobian == "stored":
                    total += 4 * s * p * len(lp.tracked)
        return max(total, 1)

    def block_rounds(self, jacobian: bool = True, weights_only: bool = False) -> int:
        return max(1, self.block_bytes // self.round_bytes(jacobian, weights_only))

    def _tensor(self, a: np.ndarray, dtype: torch.dtype = DTYPE) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(self.device, dtype)

    def _weights(self, lp: LayerPlan, rows: slice) -> torch.Tensor:
        w = self.trace.read(f"layers/{lp.name}/weight", rows)
        if lp.bias:
            b = self.trace.read(f"layers/{lp.name}/bias", rows)
            w = np.concatenate([w, b[..., None]], axis=-1)
        return self._tensor(w)

    def ranges(self, start: int, stop: int, breaks: Sequence[int] = (),
               jacobian: bool = True, weights_only: bool = False) -> Iterator[tuple[int, int]]:
        """Block boundaries over ``[start, stop)``, also cut at every count in ``breaks``."""
        step = self.block_rounds(jacobian, weights_only)
        cuts = sorted({c for c in breaks if start < c < stop})
        t = start
        while t < stop:
            nxt = min(t + step, stop)
            for c in cuts:
                if t < c < nxt:
                    nxt = c
                    break
            yield t, nxt
            t = nxt

    def weight_blocks(self, start: int, stop: int) -> Iterator[tuple[int, int,
                                                                     dict[str, torch.Tensor]]]:
        """Augmented weights ``(b, j, i)`` of each layer, block by block."""
        for t0, t1 in self.ranges(start, stop, weights_only=True):
            rows = slice(t0, t1)
            yield t0, t1, {lp.name: self._weights(lp, rows) for lp in self.layers}

    def blocks(self, start: int, stop: int, breaks: Sequence[int] = (),
               jacobian: bool = True) -> Iterator[RoundBlock]:
        """Every array a Taylor loss needs, for consecutive blocks of rounds."""
        for t0, t1 in self.ranges(start, stop, breaks, jacobian):
            yield self.read_block(t0, t1, jacobian)

    def read_block(self, t0: int, t1: int, jacobian: bool = True) -> RoundBlock:
        rows = slice(t0, t1)
        tr = self.trace
        if self.loss == "cross_entropy":
            target = self._tensor(tr.read("taylor/target", rows), torch.int64)
        else:
            target = self._tensor(tr.read("taylor/target", rows))
        layers = {}
        for lp in self.layers:
            x = _augment(tr.read(f"layers/{lp.name}/input", rows), lp.bias)
            jac = None
            if lp.jacobian == "stored" and jacobian:
                jac = self._tensor(tr.read(f"layers/{lp.name}/jacobian", rows))
            layers[lp.name] = LayerBlock(x=self._tensor(x), w=self._weights(lp, rows), jac=jac)
        return RoundBlock(start=t0, stop=t1,
                          sample_loss=self._tensor(tr.read("taylor/sample_loss", rows)),
                          output=self._tensor(tr.read("taylor/output", rows)),
                          target=target, layers=layers)


def neuron_columns(lp: LayerPlan, block: LayerBlock, outputs: int) -> torch.Tensor:
    """Jacobian columns ``g`` of the selected neurons, (b, s, o, c_sel); identity J → unit
    vectors e_j (the output layer with identity activation, so neuron j is output j)."""
    if block.jac is not None:
        return block.jac[..., torch.as_tensor(lp.selected, device=block.jac.device)]
    b, s = block.x.shape[:2]
    eye = torch.eye(outputs, dtype=block.x.dtype, device=block.x.device)
    cols = eye[:, torch.as_tensor(lp.neurons, device=eye.device)]  # (o, c_sel)
    return cols.expand(b, s, *cols.shape)


def full_jacobian(lp: LayerPlan, block: LayerBlock, outputs: int) -> torch.Tensor:
    """J of every neuron, (b, s, o, j); needs every neuron tracked."""
    if block.jac is not None:
        return block.jac
    b, s = block.x.shape[:2]
    eye = torch.eye(outputs, dtype=block.x.dtype, device=block.x.device)
    return eye.expand(b, s, outputs, outputs)
