"""Low-precision forwards (``torch.autocast``): what a Taylor round keeps of them.

Under autocast the model's output and the values its layers see are bfloat16 or float16,
rounded to 2-3 significant digits: layer inputs, pre-activations and output would not be
consistent with the float32 weights to the precision the format's checks expect. A Taylor
round of a low-precision forward is therefore taken from one extra forward of its minibatch
in float32 (outside autocast, no gradients, random modules replaying the training call): the
Taylor data are those of the float32 model at ``W_n``, the weights the optimizer steps. The
round's loss stays the training forward's. The loss the script computed is checked, on round
0, against the mean loss of the upcast output with a tolerance set by the loss's own dtype
(:func:`loss_check_rtol`).
"""

from __future__ import annotations

import torch
from torch import nn

from ntrace.ops.dropout import dropout_off
from ntrace.recording.extract import Extractor
from ntrace.recording.structure import CallLog, Watcher

LOW_PRECISION = (torch.float16, torch.bfloat16)
LOSS_CHECK_RTOL = 1e-4  # float32 and wider
HALF_ULPS = 4  # a loss reduced in half precision: a few units in the last place


def loss_check_rtol(dtype: torch.dtype) -> float:
    """The relative tolerance of the round-0 loss check for a loss of ``dtype``: 1e-4 from
    float32 up; 4 × the machine epsilon of a half dtype (float16 3.9e-3, bfloat16 3.1e-2).
    Autocast computes the standard losses in float32, so they get 1e-4 whatever the output's
    dtype."""
    if dtype in LOW_PRECISION:
        return max(LOSS_CHECK_RTOL, HALF_ULPS * torch.finfo(dtype).eps)
    return LOSS_CHECK_RTOL


def is_low_precision(t: torch.Tensor) -> bool:
    return t.dtype in LOW_PRECISION


def float32_forward(model: nn.Module, watcher: Watcher, extractor: Extractor,
                    log: CallLog) -> CallLog:
    """The log of a float32 forward of ``log``'s whole minibatch: each random call (dropout)
    repeats the training call's, training-mode BatchNorms normalise with this forward's own
    batch statistics (as training did; running statistics untouched), so that the Jacobian
    forward and the BatchNorm error measure read float32 statistics of the same batch."""
    b = log.output.shape[0]
    # the replays run before the watcher's hooks, so that it logs what flows on
    replay, calls = extractor._replay(log, b)
    handles = [m.register_forward_hook(h, prepend=True) for m, h in replay]
    capture, watcher.capture = watcher.capture, True
    try:
        with torch.no_grad(), torch.autocast(log.output.device.type, enabled=False), \
                dropout_off(model), watcher.replacing(calls), extractor.batchnorm.batch():
            model(*log.args, **log.kwargs)
    finally:
        watcher.capture = capture
        for h in handles:
            h.remove()
    return watcher.log
