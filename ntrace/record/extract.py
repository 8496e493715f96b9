"""What a Taylor round records, taken from the logged forward of a training step.

Index convention: ``s`` recorded samples (the first ``S`` of the minibatch), ``o`` output
unit, ``n`` neuron (feature or channel), ``*q`` output positions. Pre-activations are laid out
(s, n, *q) — Embedding's (s, *q, n) is moved — so states and Jacobians index neurons first.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ntrace.record.graph_jacobian import choose_modes, jacobian_forward, jacobians_reverse
from ntrace.record.handlers import states
from ntrace.record.jacobian import jacobians_recursive
from ntrace.record.structure import CallLog, StateModule, Structure, TrackedLayer, Watcher


@dataclass
class LayerData:
    """One tracked layer's tensors for one Taylor round (still on the training device)."""

    weight: torch.Tensor
    input: torch.Tensor
    bias: torch.Tensor | None
    jacobian: torch.Tensor | None
    states: torch.Tensor | None  # bool (s, units)
    states_high: torch.Tensor | None
    slope: torch.Tensor | None


def pre_activation(layer: TrackedLayer, out: torch.Tensor) -> torch.Tensor:
    """A layer's logged output as (batch, neurons, *positions)."""
    return out.movedim(-1, 1) if layer.handler.kind == "embedding" else out


def _slice(value: Any, b: int, s: int) -> Any:
    if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == b:
        return value[:s]
    return value


@contextlib.contextmanager
def dropout_off(model: nn.Module) -> Iterator[None]:
    """Dropout modules in eval mode (identity) and the RNG untouched, for extra forwards."""
    drops = [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)
             and m.training]
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and any(
        p.is_cuda for p in model.parameters()) else []
    with torch.random.fork_rng(devices=devices):
        for m in drops:
            m.training = False
        try:
            yield
        finally:
            for m in drops:
                m.training = True


class Extractor:
    """Turns a logged forward into the tensors of a Taylor round or a probe snapshot."""

    def __init__(self, model: nn.Module, structure: Structure, tracked: dict[str, torch.Tensor],
                 samples: int, watcher: Watcher, max_bytes: int, mode: str = "auto") -> None:
        self.model = model
        self.structure = structure
        self.tracked = tracked
        self.s = samples
        self.watcher = watcher
        self.max_bytes = max_bytes
        self.mode = mode
        self.mask_layers = [la for la in structure.layers if la.activation.has_mask]

    # -- Taylor rounds -------------------------------------------------------------------
    def layers(self, log: CallLog) -> dict[str, LayerData]:
        s = self.s
        st = self.structure
        calls = log.calls
        pre = [pre_activation(la, calls[la.call_index].output[:s].detach()) for la in st.layers]
        weights = [la.handler.weight(la.module).detach() for la in st.layers]
        if st.kind == "chain":
            jacs = dict(zip((la.name for la in st.layers),
                            jacobians_recursive(weights, [la.activation for la in st.layers], pre),
                            strict=True))
            jacs = {k: None if v is None else v[..., self.tracked[k]] for k, v in jacs.items()}
        else:
            jacs = self._graph_jacobians(log)
        out = {}
        for la, W, a in zip(st.layers, weights, pre, strict=True):
            low = high = slope = None
            if la.activation.has_mask:
                low, high = states(la.activation, a)
                low = low.reshape(s, -1)
                high = None if high is None else high.reshape(s, -1)
                if la.activation.kind == "prelu":
                    slope = la.act_module.weight.detach()  # type: ignore[union-attr]
            x = calls[la.call_index].input[:s].detach()
            bias = la.handler.bias(la.module)
            out[la.name] = LayerData(W, x, None if bias is None else bias.detach(),
                                     jacs[la.name], low, high, slope)
        return out

    def _graph_jacobians(self, log: CallLog) -> dict[str, torch.Tensor | None]:
        st = self.structure
        s = self.s
        b = log.output.shape[0]
        args = tuple(_slice(a, b, s) for a in log.args)
        kwargs = {k: _slice(v, b, s) for k, v in log.kwargs.items()}
        replay = self._dropout_replay(log)
        p = log.output.shape[1]

        def run() -> torch.Tensor:
            return self.model(*args, **kwargs).reshape(s, p)

        wanted = [la for la in st.layers
                  if not (st.identity_output and la is st.layers[-1])]
        units = {la.name: len(self.tracked[la.name]) * max(1, math.prod(la.geometry.positions))
                 for la in wanted}
        modes = choose_modes(p, units) if self.mode == "auto" else \
            {n: self.mode for n in units}
        out: dict[str, torch.Tensor | None] = {la.name: None for la in st.layers}
        handles = [m.register_forward_hook(h) for m, h in replay]
        self.watcher.paused = True
        try:
            with dropout_off(self.model):
                last = frozenset(la.name for la in wanted if la.handler.kind == "embedding")
                rev = {la.name: la.module for la in wanted if modes[la.name] == "reverse"}
                if rev:
                    out.update(jacobians_reverse(run, rev, self.tracked, self.max_bytes, last))
                for la in wanted:
                    if modes[la.name] == "forward":
                        out[la.name] = jacobian_forward(run, la.module, self.tracked[la.name], s,
                                                        la.geometry.output_shape, self.max_bytes,
                                                        la.name in last)
        finally:
            self.watcher.paused = False
            for h in handles:
                h.remove()
        return out

    def _dropout_replay(self, log: CallLog) -> list[tuple[nn.Module, Any]]:
        """Hooks making each dropout call of the extra forward reuse the training mask."""
        replay = []
        for m in self.structure.modules:
            if m.kind != "dropout":
                continue
            call = log.calls[m.call_index]
            keep_scale = self._dropout_scale(call.input[:self.s], call.output[:self.s])

            def hook(mod: nn.Module, a: Any, o: torch.Tensor, k: torch.Tensor = keep_scale
                     ) -> torch.Tensor:
                return a[0] * k

            replay.append((m.module, hook))
        return replay

    @staticmethod
    def _dropout_scale(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x, y = x.detach(), y.detach()
        return torch.where(x != 0, y / torch.where(x != 0, x, torch.ones_like(x)),
                           torch.zeros_like(x))

    def module_states(self, log: CallLog) -> dict[str, torch.Tensor]:
        """Max-pool winners and dropout keep-masks of the recorded samples, (s, units) bool."""
        out = {}
        for m in self.structure.modules:
            call = log.calls[m.call_index]
            x = call.input[:self.s].detach()
            if m.kind == "dropout":
                out[m.name] = ((call.output[:self.s] != 0) | (x == 0)).reshape(self.s, -1)
            else:
                out[m.name] = maxpool_winners(m, x).reshape(self.s, -1)
        return out

    # -- probe snapshots -------------------------------------------------------------------
    def probe_states(self, probe: torch.Tensor) -> torch.Tensor:
        """States of every unit of every layer with an activation on the probe set, (D, M)."""
        self.watcher.capture = True
        with torch.no_grad(), dropout_off(self.model):
            self.model(probe)
        calls = self.watcher.log.calls
        parts = []
        for la in self.mask_layers:
            a = pre_activation(la, calls[la.call_index].output)
            parts.append(states(la.activation, a)[0].reshape(len(probe), -1))
        return torch.cat(parts, dim=1)


def maxpool_winners(m: StateModule, x: torch.Tensor) -> torch.Tensor:
    """1 where an input element is the maximum its window returned (torch's argmax choice)."""
    mod = m.module
    k = x.ndim - 2
    pool = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[k]
    _, idx = pool(x, mod.kernel_size, mod.stride, mod.padding, mod.dilation,  # type: ignore[arg-type]
                  ceil_mode=mod.ceil_mode, return_indices=True)  # type: ignore[arg-type]
    flat = torch.zeros(x.shape[0], x.shape[1], math.prod(x.shape[2:]), dtype=torch.bool,
                       device=x.device)
    flat.scatter_(2, idx.flatten(2), True)
    return flat.reshape(x.shape)


