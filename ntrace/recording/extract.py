"""What a Taylor round records, taken from the logged forward of a training step.

Index convention: ``s`` recorded samples (the first ``S`` of the minibatch), ``o`` output
unit, ``n`` neuron (feature or channel), ``*q`` output positions. Pre-activations are laid out
(s, n, *q) — Embedding's (s, *q, n) is moved — so states and Jacobians index neurons first.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from ntrace import ops
from ntrace.format.rows import LayerRound
from ntrace.ops.dropout import dropout_off
from ntrace.recording.batchnorm import BatchNormGuard, gradients, parameters, relative_error
from ntrace.recording.graph_jacobian import choose_modes, jacobian_forward, jacobians_reverse
from ntrace.recording.jacobian import jacobians_recursive
from ntrace.recording.structure import CallLog, StateModule, Structure, Watcher


def _slice(value: Any, b: int, s: int) -> Any:
    if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == b:
        return value[:s]
    return value


class Extractor:
    """Turns a logged forward into the tensors of a Taylor round or a probe snapshot."""

    def __init__(self, model: nn.Module, structure: Structure, tracked: dict[str, torch.Tensor],
                 samples: int, watcher: Watcher, max_bytes: int, mode: str = "auto",
                 batchnorm: BatchNormGuard | None = None) -> None:
        self.model = model
        self.batchnorm = batchnorm or BatchNormGuard(model)
        self.structure = structure
        self.tracked = tracked
        self.s = samples
        self.watcher = watcher
        self.max_bytes = max_bytes
        self.mode = mode
        self.state_units = structure.state_units()  # the probe configuration's units

    # -- Taylor rounds -------------------------------------------------------------------
    def layers(self, log: CallLog) -> dict[str, LayerRound]:
        s = self.s
        st = self.structure
        calls = log.calls
        pre = [la.op.neurons_first(calls[la.call_index].output[:s].detach()) for la in st.layers]
        weights = [la.op.weight(la.module).detach() for la in st.layers]
        if st.kind == "chain":
            jacs = dict(zip((la.name for la in st.layers),
                            jacobians_recursive(weights, [la.activation for la in st.layers], pre,
                                                [la.op for la in st.layers]),
                            strict=True))
            jacs = {k: None if v is None else v[..., self.tracked[k]] for k, v in jacs.items()}
        else:
            jacs = self._graph_jacobians(log)
        out = {}
        for la, W, a in zip(st.layers, weights, pre, strict=True):
            low = high = slope = None
            if la.activation.has_mask:
                act = ops.activation_op(la.activation)
                low, high = act.states(la.activation, a)
                low = low.reshape(s, -1)
                high = None if high is None else high.reshape(s, -1)
                slope = act.parameter(calls[la.act_call].module  # type: ignore[index]
                                      if la.act_call is not None else la.act_module)
            x = calls[la.call_index].input[:s].detach()
            bias = la.op.bias(la.module)
            out[la.name] = LayerRound(W, x, None if bias is None else bias.detach(),
                                      jacs[la.name], low, high,
                                      None if slope is None else slope.reshape(-1))
        return out

    @contextlib.contextmanager
    def _extra_forward(self, log: CallLog, n: int, batchnorm: contextlib.AbstractContextManager
                       ) -> Iterator[Callable[[], torch.Tensor]]:
        """``run()``: the model's forward of the first ``n`` samples of the logged minibatch,
        returning (n, p), with the training call's dropout masks replayed, the RNG untouched,
        the watcher paused and BatchNorm run as ``batchnorm`` says."""
        b = log.output.shape[0]
        args = tuple(_slice(a, b, n) for a in log.args)
        kwargs = {k: _slice(v, b, n) for k, v in log.kwargs.items()}
        p = log.output.shape[1]

        def run() -> torch.Tensor:
            return self.watcher.pick(self.model(*args, **kwargs)).reshape(n, p)

        replay, calls = self._replay(log, n)
        handles = [m.register_forward_hook(h) for m, h in replay]
        self.watcher.paused = True
        try:
            with dropout_off(self.model), self.watcher.replacing(calls), batchnorm:
                yield run
        finally:
            self.watcher.paused = False
            for h in handles:
                h.remove()

    def _graph_jacobians(self, log: CallLog) -> dict[str, torch.Tensor | None]:
        st = self.structure
        s = self.s
        p = log.output.shape[1]
        wanted = [la for la in st.layers
                  if not (st.identity_output and la is st.layers[-1])]
        units = {la.name: len(self.tracked[la.name]) * max(1, math.prod(la.geometry.positions))
                 for la in wanted}
        modes = choose_modes(p, units) if self.mode == "auto" else \
            {n: self.mode for n in units}
        out: dict[str, torch.Tensor | None] = {la.name: None for la in st.layers}
        with self._extra_forward(log, s, self.batchnorm.fixed(log.calls)) as run:
            last = frozenset(la.name for la in wanted if la.op.neuron_last)
            rev = {la.name: la.module for la in wanted if modes[la.name] == "reverse"}
            if rev:
                out.update(jacobians_reverse(run, rev, self.tracked, self.max_bytes, last))
            for la in wanted:
                if modes[la.name] == "forward":
                    out[la.name] = jacobian_forward(run, la.module, self.tracked[la.name], s,
                                                    la.geometry.output_shape, self.max_bytes,
                                                    la.name in last)
        return out

    def batchnorm_errors(self, log: CallLog, loss: Callable[[torch.Tensor], torch.Tensor]
                         ) -> dict[str, float]:
        """Per tracked layer, the relative error of the gradient the Taylor data gives (batch
        statistics held fixed) against the true one (:mod:`ntrace.recording.batchnorm`);
        ``loss(f)`` is the mean loss of the recorded samples' outputs ``f`` (s, p)."""
        params = parameters({la.name: (la.op.weight(la.module), la.op.bias(la.module))
                             for la in self.structure.layers})
        b = log.output.shape[0]
        with torch.enable_grad():
            with self._extra_forward(log, b, self.batchnorm.batch()) as run:
                true = gradients(loss(run()[:self.s]), params)
            with self._extra_forward(log, self.s, self.batchnorm.fixed(log.calls)) as run:
                fixed = gradients(loss(run()), params)
        return {name: relative_error(fixed[name], true[name]) for name in params}

    def _replay(self, log: CallLog, n: int
                ) -> tuple[list[tuple[nn.Module, Any]], dict[str, Any]]:
        """What makes each random call (dropout) of an extra forward of the first ``n``
        samples repeat the training call: forward hooks of modules, and replacements of
        functional calls by name (``Watcher.replacing``)."""
        replay, calls = [], {}
        for m in self.structure.modules:
            call = log.calls[m.call_index]
            hook = m.op.replay(call.module, call.input[:n], call.output[:n])
            if hook is None:
                continue
            if m.functional:
                calls[call.name] = lambda x, h=hook, mod=call.module: h(mod, (x,), None)
            else:
                replay.append((m.module, hook))
        return replay, calls

    def module_states(self, log: CallLog) -> dict[str, torch.Tensor]:
        """Max-pool winners and dropout keep-masks of the recorded samples, (s, units) bool."""
        out = {}
        for m in self.structure.modules:
            call = log.calls[m.call_index]
            x = call.input[:self.s].detach()
            out[m.name] = m.states(call.module, x, call.output[:self.s]).reshape(self.s, -1)
        return out

    # -- probe snapshots -------------------------------------------------------------------
    def probe_states(self, probe: torch.Tensor) -> torch.Tensor:
        """States of every unit with states (layers with a piecewise-linear activation,
        activation modules) on the probe set, (D, M); dropout off, functional calls too."""
        self.watcher.capture = True
        off = {m.name: _identity for m in self.structure.modules
               if m.functional and m.kind == "dropout"}
        with torch.no_grad(), dropout_off(self.model), self.watcher.replacing(off), \
                self.batchnorm.running():
            self.model(probe)
        calls = self.watcher.log.calls
        parts = []
        for u in self.state_units:
            if isinstance(u, StateModule):
                c = calls[u.call_index]
                low = u.states(c.module, c.input, c.output)
            else:
                a = u.op.neurons_first(calls[u.call_index].output)
                low = ops.activation_op(u.activation).states(u.activation, a)[0]
            parts.append(low.reshape(len(probe), -1))
        return torch.cat(parts, dim=1)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x
