"""Low-precision forwards (``torch.autocast``, half-precision models) in a Taylor round.

Under autocast the model's output and the values its layers see are bfloat16 or float16. The
trace's Taylor data are float32: the layer inputs, pre-activations and output the forward
computed are stored exactly, upcast; the weights are the float32 parameters the optimizer
steps; the Jacobians are computed in float32 at those weights, outside autocast. The loss the
script computed is checked, on round 0, against the mean loss of the upcast output with a
tolerance set by the loss's own dtype (:func:`loss_check_rtol`).
"""

from __future__ import annotations

from typing import Any

import torch

from ntrace.recording.structure import CallLog

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


def upcast(value: Any) -> Any:
    """``value`` with every half-precision tensor (in tuples and lists too) made float32."""
    if isinstance(value, torch.Tensor):
        return value.float() if value.dtype in LOW_PRECISION else value
    if isinstance(value, tuple | list):
        return type(value)(upcast(v) for v in value)
    return value


def upcast_log(log: CallLog) -> None:
    """Make the logged forward float32 in place (layer inputs and outputs, model output)."""
    for call in log.calls:
        call.input = upcast(call.input)
        call.output = upcast(call.output)
    log.output = upcast(log.output)


def is_low_precision(t: torch.Tensor) -> bool:
    return t.dtype in LOW_PRECISION
