"""Blockwise, lazy reading of a trace's Taylor data into float64 torch tensors.

Only committed rows are read (``Trace.read`` cuts to the commit record), a block of Taylor
rounds at a time, sized so one block stays under ``block_bytes`` (float32 data read, plus the
float64 designs computed from it); nothing else of the trace is held. Index letters (spec
section 1): ``b`` Taylor round within the block, ``s`` recorded sample, ``o`` output unit,
``j`` neuron, ``c`` position in the layer's tracked list, ``i`` entry of a neuron's
augmented row (its parameters, then the bias; for a linear layer the input feature, with a
trailing 1 when the layer has a bias). See :mod:`ntrace.ops` for the layouts.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ntrace.analyze.plan import LayerPlan
from ntrace.format.metadata import CLASS_TARGET_LOSSES
from ntrace.format.reader import Trace

DTYPE = torch.float64


@dataclass
class LayerBlock:
    """One layer's data for a block of Taylor rounds.

    Rank-one kinds (linear on (batch, features)): ``x`` (b, s, i) augmented inputs, ``jac``
    (b, s, o, c). Other kinds (linear on positions too): ``x`` the raw inputs (b, s,
    *input_shape) (int64 for an embedding), ``jac`` (b, s, o, c, *positions). ``w`` (b, j, i)
    is every neuron's augmented row; ``jac`` None means the identity Jacobian (the output
    layer)."""

    lp: LayerPlan
    x: torch.Tensor
    w: torch.Tensor
    jac: torch.Tensor | None
    outputs: int
    _design: torch.Tensor | None = field(default=None, repr=False)

    @property
    def rounds(self) -> int:
        return self.w.shape[0]

    @property
    def samples(self) -> int:
        return self.x.shape[1]

    def pre(self) -> torch.Tensor:
        """Pre-activations a = W x + bias of every neuron, (b, s, j) (linear layers)."""
        return torch.einsum("bsi,bji->bsj", self.x, self.w)

    def columns(self, pos: np.ndarray) -> torch.Tensor:
        """Jacobian columns of the tracked positions ``pos``: (b, s, o, c, *positions);
        the identity Jacobian gives unit vectors (neuron j at position q is output unit
        j·Q + q)."""
        idx = torch.as_tensor(pos, device=self.w.device)
        if self.jac is not None:
            return self.jac[:, :, :, idx]
        kind = self.lp.kind
        eye = torch.eye(self.outputs, dtype=self.w.dtype, device=self.w.device)
        eye = eye.reshape(self.outputs, kind.neurons, *kind.positions)
        cols = eye[:, torch.as_tensor(self.lp.tracked, device=eye.device)[idx]]
        return cols.expand(self.rounds, self.samples, *cols.shape)

    def design(self) -> torch.Tensor:
        """The designs ``M`` of the stored neurons (``lp.stored``), (b, s, o, c, i): the
        Taylor output moves by ``M[..., c, :] (u − w_j)`` when neuron j = tracked[stored[c]]
        takes the row u. Computed once per block."""
        if self._design is None:
            cols = self.columns(self.lp.stored)
            b, s, o, c = cols.shape[:4]
            if self.lp.kind.rank_one:  # M = g x̃ᵀ, the bias entry included in x̃
                self._design = cols.unsqueeze(-1) * self.x[:, :, None, None, :]
            else:
                neurons = torch.as_tensor(self.lp.tracked[self.lp.stored], device=cols.device)
                M = self.lp.kind.design(self.x.reshape(b * s, *self.x.shape[2:]),
                                        cols.reshape(b * s, o, c, *cols.shape[4:]), neurons)
                if self.lp.bias:
                    bias = cols.reshape(b * s, o, c, -1).sum(-1, keepdim=True)
                    M = torch.cat([M, bias], dim=-1)
                self._design = M.reshape(b, s, o, c, -1)
        return self._design

    def stored_rows(self) -> torch.Tensor:
        """Augmented rows w of the stored neurons, (b, c, i)."""
        idx = torch.as_tensor(self.lp.tracked[self.lp.stored], device=self.w.device)
        return self.w[:, idx]

    def offset(self) -> torch.Tensor:
        """``M w``: the stored neurons' contribution at the iterate, (b, s, o, c)."""
        return torch.einsum("bsoci,bci->bsoc", self.design(), self.stored_rows())


@dataclass
class RoundBlock:
    """Taylor rounds ``[start, stop)``: outputs, targets, per-sample losses and layer data."""

    start: int
    stop: int
    sample_loss: torch.Tensor  # (b, s)
    output: torch.Tensor  # (b, s, o)
    target: torch.Tensor  # (b, s, o) float (mse, bce_with_logits); (b, s) int64 (classes)
    layers: dict[str, LayerBlock]


def read_float64(trace: Trace, path: str, block_bytes: int) -> np.ndarray:
    """Every committed row of ``path`` as float64, read in chunk-aligned blocks straight into
    the result (no float32 copy of the whole array; ``make_plan`` bounds its size)."""
    out = np.empty((trace.length(path) or 0, *trace.layouts[path].tail), np.float64)
    for start, block in trace.blocks(path, block_bytes):
        out[start:start + len(block)] = block
    return out


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
        """Bytes of one Taylor round as read by :meth:`blocks` (float32 data, and the float64
        designs of non-linear kinds)."""
        s, p = self.samples, self.outputs
        total = 0 if weights_only else 4 * (s + 2 * s * p)
        for lp in self.layers:
            total += 4 * lp.out_features * lp.d_aug
            if not weights_only:
                k = lp.kind
                total += 4 * s * (lp.d_aug if k.rank_one else math.prod(k.input_shape))
                if jacobian and lp.jacobian == "stored":
                    total += 4 * s * p * len(lp.tracked) * math.prod(k.positions)
                if jacobian and not k.rank_one:
                    total += 8 * s * p * len(lp.stored) * lp.d_aug
        return max(total, 1)

    def block_rounds(self, jacobian: bool = True, weights_only: bool = False) -> int:
        return max(1, self.block_bytes // self.round_bytes(jacobian, weights_only))

    def _tensor(self, a: np.ndarray, dtype: torch.dtype = DTYPE) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(self.device, dtype)

    def _weights(self, lp: LayerPlan, rows: slice) -> torch.Tensor:
        """Augmented rows of every neuron, (b, j, i)."""
        w = lp.kind.rows(self._tensor(self.trace.read(f"layers/{lp.name}/weight", rows)))
        if lp.bias:
            b = self._tensor(self.trace.read(f"layers/{lp.name}/bias", rows))
            w = torch.cat([w, b[..., None]], dim=-1)
        return w

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
        if self.loss in CLASS_TARGET_LOSSES:
            target = self._tensor(tr.read("taylor/target", rows), torch.int64)
        else:
            target = self._tensor(tr.read("taylor/target", rows))
        layers = {}
        for lp in self.layers:
            raw = tr.read(f"layers/{lp.name}/input", rows)
            if lp.kind.rank_one:
                x = self._tensor(_augment(raw, lp.bias))
            else:
                x = self._tensor(raw, torch.int64 if raw.dtype.kind in "iu" else DTYPE)
            jac = None
            if lp.jacobian == "stored" and jacobian:
                jac = self._tensor(tr.read(f"layers/{lp.name}/jacobian", rows))
            layers[lp.name] = LayerBlock(lp=lp, x=x, w=self._weights(lp, rows), jac=jac,
                                         outputs=self.outputs)
        return RoundBlock(start=t0, stop=t1,
                          sample_loss=self._tensor(tr.read("taylor/sample_loss", rows)),
                          output=self._tensor(tr.read("taylor/output", rows)),
                          target=target, layers=layers)


def neuron_columns(lp: LayerPlan, block: LayerBlock, outputs: int) -> torch.Tensor:
    """Jacobian columns ``g`` of the selected neurons of a linear layer, (b, s, o, c_sel);
    identity J → unit vectors e_j (the output layer, so neuron j is output j)."""
    if block.jac is not None:
        return block.jac[..., torch.as_tensor(lp.selected, device=block.jac.device)]
    b, s = block.x.shape[:2]
    eye = torch.eye(outputs, dtype=block.x.dtype, device=block.x.device)
    cols = eye[:, torch.as_tensor(lp.neurons, device=eye.device)]  # (o, c_sel)
    return cols.expand(b, s, *cols.shape)


def full_jacobian(lp: LayerPlan, block: LayerBlock, outputs: int) -> torch.Tensor:
    """J of every neuron of a linear layer, (b, s, o, j); needs every neuron tracked."""
    if block.jac is not None:
        return block.jac
    b, s = block.x.shape[:2]
    eye = torch.eye(outputs, dtype=block.x.dtype, device=block.x.device)
    return eye.expand(b, s, outputs, outputs)
