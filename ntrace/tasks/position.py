"""Where a task run stopped in its data, as its checkpoint holds it: the batch of the
epoch (``meta.user.epoch_position``), the epoch's sample order (``user.data.order``) and the
state of the generator that draws the next orders (``user.data.rng``). The runner writes them;
reading them back checks each, since the trace may come from someone else."""

from __future__ import annotations

import numpy as np
import torch

from ntrace.errors import InvalidTraceError
from ntrace.format.checkpoint import Checkpoint
from ntrace.format.metadata import parse_int, parse_mapping


def data_position(ck: Checkpoint, samples: int, per_epoch: int
                  ) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Where in its data a checkpointed task run stopped: the batch of the epoch, the
    epoch's sample order (a permutation of the ``samples`` indices) and the state of the
    generator that draws the next orders."""
    user = parse_mapping(ck.meta.get("user"), "checkpoint meta.user")
    first = parse_int(user.get("epoch_position"), "checkpoint meta.user.epoch_position", 0)
    if first > per_epoch:
        raise InvalidTraceError(f"checkpoint meta.user.epoch_position: expected at most the "
                                f"{per_epoch} batches of an epoch, found {first}")
    order = ck.arrays.get("user.data.order")
    if order is None or order.ndim != 1 or order.dtype.kind not in "iu" or not np.array_equal(
            np.sort(order), np.arange(samples)):
        raise InvalidTraceError(f"checkpoint array user.data.order: expected an order of the "
                                f"{samples} samples (each index once), found "
                                f"{_describe(order)}")
    rng = ck.arrays.get("user.data.rng")
    if rng is None or rng.ndim != 1 or rng.dtype != np.uint8:
        raise InvalidTraceError(f"checkpoint array user.data.rng: expected the uint8 state of a "
                                f"torch generator, found {_describe(rng)}")
    state = torch.from_numpy(np.ascontiguousarray(rng))
    try:
        torch.Generator().set_state(state)  # a scratch generator: does torch take it?
    except RuntimeError as exc:
        raise InvalidTraceError(f"checkpoint array user.data.rng: not the state of a torch "
                                f"generator ({exc})") from None
    return first, torch.from_numpy(order.astype(np.int64)), state


def _describe(a: np.ndarray | None) -> str:
    if a is None:
        return "none"
    lo_hi = f", values {a.min()} to {a.max()}" if a.size and a.dtype.kind in "biuf" else ""
    return f"{a.dtype} of shape {a.shape}{lo_hi}"
