"""BatchNorm in training mode during the recorder's extra forwards (spec 'BatchNorm in
training mode').

In training mode a BatchNorm normalises every sample with the per-channel mean and biased
variance of the whole minibatch (``B`` samples), so each sample's output, and each gradient,
depend on the other samples: per-sample Taylor data cannot hold that coupling. Opted in
(``batchnorm="fixed_stats"``, CLI ``--batchnorm fixed-stats``) the recorder takes them with
the *batch statistics held fixed*:

- the Jacobian forward of the ``s`` recorded samples normalises each training-mode BatchNorm
  with the mean and inverse standard deviation its training call computed from the whole
  minibatch (``torch.native_batch_norm`` of the logged input), as constants: the recorded
  samples' outputs are the training forward's (up to rounding), their Jacobians those of the
  network with these statistics fixed;
- every Taylor round and tracked layer, :func:`relative_error` of the gradient this gives,
  ``‖g_fixed − g_true‖ / ‖g_true‖``, g the gradient of the mean loss of the ``s`` recorded
  samples with respect to the layer's weight and bias: ``g_true`` by autograd through a forward
  of the whole minibatch with batch statistics (the coupling included, as in training),
  ``g_fixed`` through a forward of the recorded samples with the statistics held fixed;
- the probe forward (activation configurations) normalises with the running statistics.

Without the opt-in a BatchNorm found in training mode is refused (``unsupported="error"``) or,
under the ``warn``/``skip`` policies, normalised with the extra forward's own batch. In every
case the module's ``forward`` is replaced for the extra forward only and its buffers are never
written: ntrace's forwards leave the running statistics, and training, exactly as they were.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ntrace.errors import UnsupportedModelError
from ntrace.ops.passthrough import BatchNorm, training_refusal

FIXED_STATS = "fixed_stats"  # the recorder's ``batchnorm`` option, and its name on disk
CHOICES = (FIXED_STATS,)
Forward = Callable[[torch.Tensor], torch.Tensor]


def _channels(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """A per-channel vector shaped to broadcast against ``x`` (batch, channel, *positions)."""
    return v.reshape(1, -1, *([1] * (x.ndim - 2)))


def _fixed(m: nn.Module, mean: torch.Tensor, invstd: torch.Tensor) -> Forward:
    def forward(x: torch.Tensor) -> torch.Tensor:
        y = (x - _channels(x, mean)) * _channels(x, invstd)
        if m.weight is not None:
            y = y * _channels(x, m.weight)
        if m.bias is not None:
            y = y + _channels(x, m.bias)
        return y

    return forward


def _batch(m: nn.Module) -> Forward:
    """Batch statistics of this forward, running statistics untouched."""
    return lambda x: F.batch_norm(x, None, None, m.weight, m.bias, True, 0.0, m.eps)


def _running(m: nn.Module) -> Forward:
    """Running statistics (eval-mode maths), or the batch's where none are tracked."""
    if m.running_mean is None:
        return _batch(m)
    return lambda x: F.batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias, False,
                                  0.0, m.eps)


@contextlib.contextmanager
def _forwards(replaced: Mapping[nn.Module, Forward]) -> Iterator[None]:
    """Each module's ``forward`` replaced within the block (its hooks still run)."""
    saved = {m: m.__dict__.get("forward") for m in replaced}
    try:
        for m, fn in replaced.items():
            m.forward = fn  # type: ignore[method-assign]
        yield
    finally:
        for m, old in saved.items():
            if old is None:
                m.__dict__.pop("forward", None)
            else:
                m.forward = old  # type: ignore[method-assign]


class BatchNormGuard:
    """The BatchNorm modules of a model and how the recorder's extra forwards run them.

    ``fixed_stats``: the trace declares the approximation (training-mode modules are
    normalised with fixed batch statistics); otherwise one found in training mode is refused
    (``unsupported == "error"``) or normalised with the extra forward's own batch."""

    def __init__(self, model: nn.Module, fixed_stats: bool = False,
                 unsupported: str = "error") -> None:
        self.fixed_stats = fixed_stats
        self.unsupported = unsupported
        self.names = {m: n for n, m in model.named_modules()
                      if any(isinstance(m, t) for t in BatchNorm.modules)}

    def training(self) -> list[nn.Module]:
        return [m for m in self.names if m.training]

    def training_names(self) -> tuple[str, ...]:
        return tuple(self.names[m] for m in self.training())

    def statistics(self, calls: Sequence[Any]) -> dict[nn.Module, tuple[torch.Tensor, ...]]:
        """(mean, invstd) per training-mode BatchNorm, from its call's full-batch input in the
        logged forward (``calls``: objects with ``module`` and ``input``)."""
        out: dict[nn.Module, tuple[torch.Tensor, ...]] = {}
        for c in calls:
            m = c.module
            if m not in self.names or not m.training:
                continue
            if m in out:
                raise UnsupportedModelError(
                    f"BatchNorm {self.names[m]} is called twice in one forward in training "
                    "mode; ntrace holds one set of batch statistics per module: use one "
                    "BatchNorm module per call")
            x = c.input.detach()
            stats = torch.native_batch_norm(x, None, None, None, None, True, 0.0, m.eps)
            out[m] = (stats[1], stats[2])
        return out

    def _unapproved(self, train: list[nn.Module]) -> dict[nn.Module, Forward]:
        if self.unsupported == "error":
            raise UnsupportedModelError(training_refusal(self.names[train[0]], train[0]))
        return {m: _batch(m) for m in train}

    def fixed(self, calls: Sequence[Any]) -> contextlib.AbstractContextManager[None]:
        """Training-mode BatchNorms normalise with the statistics of the logged training
        forward (``calls``), held constant: the recorder's Jacobian forward."""
        train = self.training()
        if not train:
            return _forwards({})
        if not self.fixed_stats:
            return _forwards(self._unapproved(train))
        stats = self.statistics(calls)
        return _forwards({m: _fixed(m, *stats[m]) if m in stats else _batch(m) for m in train})

    def batch(self) -> contextlib.AbstractContextManager[None]:
        """Training-mode BatchNorms normalise with their batch's statistics, as in training,
        without updating the running statistics: the reference gradient's forward."""
        return _forwards({m: _batch(m) for m in self.training()})

    def running(self) -> contextlib.AbstractContextManager[None]:
        """Training-mode BatchNorms normalise with their running statistics: the probe."""
        return _forwards({m: _running(m) for m in self.training()})


def parameters(layers: Mapping[str, Sequence[torch.Tensor | None]]
               ) -> dict[str, list[torch.Tensor]]:
    """The trainable tensors of each layer (weight, bias), the ones gradients are taken of."""
    return {n: [p for p in ps if p is not None and p.requires_grad] for n, ps in layers.items()}


def gradients(value: torch.Tensor, params: Mapping[str, Sequence[torch.Tensor]]
              ) -> dict[str, torch.Tensor]:
    """∇ of the scalar ``value`` with respect to each layer's tensors, flattened into one
    vector per layer (zeros where ``value`` does not depend on a tensor)."""
    flat = [p for ps in params.values() for p in ps]
    grads = iter(torch.autograd.grad(value, flat, allow_unused=True) if flat else ())
    out = {}
    for name, ps in params.items():
        parts = []
        for p in ps:
            g = next(grads)
            parts.append((torch.zeros_like(p) if g is None else g).reshape(-1))
        out[name] = torch.cat(parts) if parts else torch.zeros(0)
    return out


def relative_error(approx: torch.Tensor, true: torch.Tensor) -> float:
    """``‖approx − true‖ / ‖true‖`` (2-norms, in float64); 0 where both are zero and +inf
    where only ``true`` is."""
    diff = float(torch.linalg.vector_norm((approx - true).double()))
    norm = float(torch.linalg.vector_norm(true.double()))
    if norm > 0:
        return diff / norm
    return 0.0 if diff == 0 else math.inf
