"""A background thread that turns recorded tensors into trace rows.

Training never waits on disk: ``submit`` puts a list of consecutive rounds on a bounded queue
(the recorder batches loss-only rounds) and blocks only when the queue is full:
back-pressure keeps memory bounded. Device→host copies are issued non-blocking by the caller
into pinned memory; the thread waits on the batch's CUDA event before reading them, so the
training stream is never synchronised on unrecorded rounds.

Under ``torch.distributed`` every process runs one such thread over the same sequence of
batches. Before writing a batch the threads sum, in one all-reduce, the batch's losses (so
process 0 writes their mean over processes), which rounds carry Taylor data (they must agree)
and whether a commit is due on any process; a due commit is then made by all together.
"""

from __future__ import annotations

import math
import queue
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ntrace.errors import NonFiniteLossError, WriterError
from ntrace.format.bits import pack
from ntrace.format.writer import Snapshot, TaylorRound, TraceWriter
from ntrace.recording.distributed import ProcessGroup


@dataclass
class PendingRound:
    round_index: int
    loss: torch.Tensor  # 0-d, host (possibly still being copied)
    taylor: TaylorRound | None = None  # host tensors
    snapshot: torch.Tensor | None = None  # bool (probe, units)
    event: Any = None  # on the last round of a batch: CUDA event after all its copies


@dataclass
class PendingCheckpoint:
    """Training state at the start of ``round_index``, already on the host."""

    round_index: int
    arrays: dict[str, np.ndarray]
    meta: dict[str, Any]


def _numpy(field: str, t: torch.Tensor) -> np.ndarray:
    del field
    return t.numpy()


class AsyncWriter:
    """Owns a :class:`TraceWriter` and the thread that feeds it."""

    _STOP = object()

    def __init__(self, writer: TraceWriter, max_pending: int = 8,
                 group: ProcessGroup | None = None) -> None:
        self.writer = writer
        self._group = group
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self._abort: tuple[int, float] | None = None
        self._thread = threading.Thread(target=self._run, name="ntrace-writer", daemon=True)
        self._thread.start()

    # -- main thread ------------------------------------------------------------------------
    def submit(self, items: list[PendingRound] | PendingCheckpoint) -> None:
        """Queue consecutive rounds (one queue slot for the whole list)."""
        self.raise_if_failed()
        while True:
            try:
                self._queue.put(items, timeout=0.5)
                return
            except queue.Full:
                self.raise_if_failed()

    def raise_if_failed(self) -> None:
        if self._abort is not None:
            n, value = self._abort
            raise NonFiniteLossError(f"loss is {value} at round {n}; the trace keeps the {n} "
                                     "rounds before it (status 'aborted')")
        if self._error is not None:
            err = self._error
            if isinstance(err, WriterError):
                raise err
            raise WriterError(f"the trace writer failed: {err}") from err

    def close(self, status: str = "complete", reason: str | None = None) -> None:
        """Drain the queue, then close the trace with ``status`` (unless already aborted)."""
        if self._thread.is_alive():
            self._queue.put(self._STOP)
            self._thread.join()
        if self._abort is not None:
            return  # the thread already closed the trace as aborted
        if self._error is not None:
            status, reason = "aborted", f"writer failed: {self._error}"
        try:
            self.writer.close(status, reason)
        except WriterError:
            if self._error is None:
                raise

    # -- writer thread ----------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is self._STOP:
                return
            if self._error is not None or self._abort is not None:
                continue  # drain without writing after a failure
            try:
                if isinstance(item, PendingCheckpoint):
                    self.writer.write_checkpoint(item.round_index, item.arrays, item.meta)
                    continue
                if item and item[-1].event is not None:
                    item[-1].event.synchronize()  # recorded after the batch's copies
                losses, commit = self._agree(item)
                for one, loss in zip(item, losses, strict=True):
                    self._write(one, loss)
                    if self._abort is not None:
                        break
                if commit and self._abort is None:
                    self.writer.commit()
            except BaseException as exc:  # noqa: BLE001 - reported to the main thread
                self._error = exc

    def _agree(self, batch: list[PendingRound]) -> tuple[list[float], bool]:
        """The batch's round losses and whether to commit after it: this process's own in a
        single process; under torch.distributed the mean over processes, and a commit when
        one is due on any process (one all-reduce for the whole batch)."""
        losses = [float(one.loss) for one in batch]
        if self._group is None:
            return losses, False  # the writer commits on its own
        k, world = len(batch), self._group.world_size
        taylor = [float(one.taylor is not None) for one in batch]
        total = self._group.sum(np.array([*losses, *taylor, float(self.writer.due())]))
        for one, n in zip(batch, total[k:2 * k], strict=True):
            if 0 < n < world:
                raise WriterError(
                    f"round {one.round_index}: only {int(n)} of {world} processes recorded "
                    "Taylor data (a process's minibatch held fewer than samples_per_round "
                    "samples); give every process equally large minibatches, e.g. "
                    "DistributedSampler with drop_last=True")
        return [float(v) / world for v in total[:k]], bool(total[-1] > 0)

    def _write(self, item: PendingRound, loss: float) -> None:
        if not math.isfinite(loss):
            self._abort = (item.round_index, loss)
            self.writer.close("aborted", f"loss is {loss} at round {item.round_index}")
            return
        taylor = None if item.taylor is None else item.taylor.map(_numpy)
        snap = None
        if item.snapshot is not None:
            snap = Snapshot(item.round_index, pack(item.snapshot.numpy()))
        self.writer.write_round(loss, taylor, snap)
