"""Recording under ``torch.distributed`` (DistributedDataParallel, ``torchrun``).

Every process records the first ``samples_per_round`` samples of its own minibatch into its own
block of the trace's ``sample`` axis; process 0 creates the trace and writes the weights, the
round losses (the mean over processes of their minibatch losses: the loss of the global
minibatch when the processes' minibatches are equally large, as DDP's averaged gradient
assumes), the probe snapshots, every metadata document and the commits (spec 'Multi-process
writing'). The processes coordinate over a gloo group of their own, used only by the writer
threads, so the coordination never interleaves with the training's collectives.

Nothing here runs, and ``torch.distributed`` is not touched, when no process group is
initialised or it has one process: the recorder then works exactly as in a single process.
"""

from __future__ import annotations

import datetime as _dt
from typing import Any

import numpy as np
import torch
from torch import nn

TIMEOUT = _dt.timedelta(minutes=10)  # how long a process waits for the others at a barrier


class ProcessGroup:
    """The recording processes: ``rank``, ``world_size``, and the collectives the writer
    needs, over a dedicated gloo group (CPU tensors, whatever backend trains)."""

    def __init__(self, group: Any, rank: int, world_size: int) -> None:
        self._group = group
        self.rank = rank
        self.world_size = world_size

    def barrier(self) -> None:
        """Return once every process has called it (an all-reduce: gloo's barrier is one)."""
        self.sum(np.zeros(1))

    def sum(self, values: np.ndarray) -> np.ndarray:
        """Element-wise sum over the processes of a float64 vector."""
        import torch.distributed as dist

        t = torch.as_tensor(np.asarray(values, dtype=np.float64)).clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self._group)
        return t.numpy()

    def all_agree(self, ok: bool) -> bool:
        """True when ``ok`` holds on every process (used to fail every process together)."""
        return bool(self.sum(np.array([0.0 if ok else 1.0]))[0] == 0)


def current_group() -> ProcessGroup | None:
    """The process group of a multi-process run, or None (not initialised, or one process).

    Collective: under an initialised group every process must call it at the same point
    (the recorder does so when it is constructed)."""
    if not torch.distributed.is_available():
        return None
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() < 2:
        return None
    group = dist.new_group(backend="gloo", timeout=TIMEOUT)
    return ProcessGroup(group, dist.get_rank(), dist.get_world_size())


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel``/``DataParallel`` (the recorder hooks and
    re-runs the inner module, so its extra forwards never enter DDP's gradient reducer)."""
    inner = getattr(model, "module", None)
    if isinstance(inner, nn.Module) and type(model).__name__ in (
            "DistributedDataParallel", "DataParallel"):
        return inner
    return model
