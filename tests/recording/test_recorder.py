"""The Python recording API: structure discovery, declared loss, failures, live readers."""

from __future__ import annotations

import errno
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zarr.storage
from torch import nn

from ntrace.errors import (
    LossMismatchError,
    NonFiniteLossError,
    UnsupportedModelError,
    UsageError,
    WriterError,
)
from ntrace.format.lock import lock_file
from ntrace.format.metadata import Sampling
from ntrace.format.reader import open_trace
from ntrace.format.validate import validate_trace
from ntrace.format.writer import TraceWriter
from ntrace.recording import Recorder, record


def train(rec: Recorder, model: nn.Module, rounds: int, lr: float = 0.01,
          hook: object = None) -> None:
    torch.manual_seed(0)
    x = torch.randn(rounds * 8, 6)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for n in range(rounds):
        xb = x[n * 8:(n + 1) * 8]
        out = model(xb)
        loss = F.mse_loss(out, xb[:, :3])
        rec.step(loss, out, xb[:, :3])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if callable(hook):
            hook(n)


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))


class Clamped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 5), nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.clamp(self.fc1(x), min=0))  # a ReLU ntrace does not recognise


def test_unrecognised_piecewise_op_is_refused_with_a_hint(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedModelError, match=r"\(ClampBackward1: torch.clamp.*F\.relu"):
        with record(Clamped(), tmp_path / "t.zarr") as rec:
            train(rec, rec.model, 2)
    assert not (tmp_path / "t.zarr").exists()  # nothing half-written


def test_unsupported_module_is_named_with_its_path(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(6, 5), nn.Hardshrink(), nn.Linear(5, 3))
    with pytest.raises(UnsupportedModelError, match=r"module 1 \(Hardshrink\) is not one ntrace"):
        with record(model, tmp_path / "t.zarr") as rec:
            train(rec, model, 2)


def test_declared_loss_must_match_the_loss_trained(tmp_path: Path) -> None:
    model = mlp()
    rec = record(model, tmp_path / "t.zarr", loss="mse")
    out = model(torch.randn(8, 6))
    y = torch.randn(8, 3)
    with pytest.raises(LossMismatchError, match="declare the loss"):
        rec.step(F.mse_loss(out, y, reduction="sum"), out, y)
    rec.close()


def test_output_must_come_from_the_latest_forward(tmp_path: Path) -> None:
    model = mlp()
    rec = record(model, tmp_path / "t.zarr", sampling=Sampling(taylor_every=1,
                                                                samples_per_round=2))
    x, y = torch.randn(8, 6), torch.randn(8, 3)
    out = model(x)
    rec.step(F.mse_loss(out, y), out, y)
    stale = out.detach().clone()
    model(x)
    with pytest.raises(UsageError, match="latest forward"):
        rec.step(F.mse_loss(stale, y), stale, y)
    rec.close()


def test_nan_loss_aborts_and_keeps_earlier_rounds(tmp_path: Path) -> None:
    model = mlp()
    path = tmp_path / "t.zarr"

    def poison(n: int) -> None:
        if n == 6:
            with torch.no_grad():
                model[0].weight.fill_(float("nan"))

    with pytest.raises(NonFiniteLossError, match="round 7"):
        with record(model, path, sampling=Sampling(taylor_every=2, samples_per_round=2)) as rec:
            train(rec, model, 20, hook=poison)
    tr = open_trace(path)
    assert tr.attrs.status == "aborted" and "round 7" in (tr.attrs.status_reason or "")
    assert tr.rounds == 7 and tr.taylor_rounds == 4
    report = validate_trace(path)
    assert len(report.reasons) == 1 and report.reasons[0].startswith("run aborted")


def test_tracked_neuron_sample_is_seeded_sorted_and_reproducible(tmp_path: Path) -> None:
    sets = []
    for i in range(2):
        model = nn.Sequential(nn.Linear(6, 40), nn.ReLU(), nn.Linear(40, 3))
        with record(model, tmp_path / f"t{i}.zarr",
                    sampling=Sampling(samples_per_round=2, neurons=7, neuron_seed=5)) as rec:
            train(rec, model, 3)
        sets.append(open_trace(tmp_path / f"t{i}.zarr").tracked)
    assert np.array_equal(sets[0]["0"], sets[1]["0"])
    assert len(sets[0]["0"]) == 7 and np.all(np.diff(sets[0]["0"]) > 0)
    assert np.array_equal(sets[0]["2"], np.arange(3))  # fewer neurons than K: all tracked
    expected = np.sort(np.random.default_rng(5).choice(40, size=7, replace=False))
    assert np.array_equal(sets[0]["0"], expected)  # the spec's rule, §5


def test_live_reader_sees_a_consistent_committed_prefix(tmp_path: Path) -> None:
    path = tmp_path / "live.zarr"
    model = mlp()
    seen: list[tuple[int, int]] = []

    def peek(n: int) -> None:
        if n >= 3 and n % 5 == 0:
            # let the writer thread commit something: polled, not timed (a loaded CI machine
            # may take far longer than usual)
            deadline = time.monotonic() + 60
            while open_trace(path).rounds == 0 and time.monotonic() < deadline:
                time.sleep(0.02)
            tr = open_trace(path)
            assert tr.attrs.status == "running"
            for p in tr.layouts:
                tr.read(p)  # every committed row reads without error
            assert validate_trace(path).ok
            seen.append((tr.rounds, tr.taylor_rounds))

    with record(model, path, sampling=Sampling(taylor_every=2, samples_per_round=2),
                commit_seconds=0.0) as rec:
        train(rec, model, 40, hook=peek)
    assert seen and all(r > 0 for r, _ in seen)
    assert seen == sorted(seen)  # commits are monotone
    assert open_trace(path).attrs.status == "complete"


def test_writer_failure_surfaces_on_the_next_step(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: TraceWriter, *args: object, **kwargs: object) -> None:
        raise WriterError("writing round 0 failed: No space left on device")

    monkeypatch.setattr(TraceWriter, "write_round", broken)
    model = mlp()
    with pytest.raises(WriterError, match="No space left"):
        with record(model, tmp_path / "t.zarr",
                    sampling=Sampling(taylor_every=1, samples_per_round=2)) as rec:
            train(rec, model, 30, hook=lambda n: time.sleep(0.01))


def test_a_full_disk_aborts_the_trace_and_commits_only_written_rows(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 18: a writer error committed rows whose chunks were never written (NaN
    Jacobians in a 'valid' prefix). Here the store refuses Jacobian chunks from the fourth on;
    the run fails with WriterError, and the trace is aborted with the reason, its commit
    counting only rows that are on disk."""
    original = zarr.storage.LocalStore.set
    seen = []

    async def full(self: object, key: str, value: object) -> None:
        if "/jacobian/c/" in key:
            seen.append(key)
            if len(seen) > 3:
                raise OSError(errno.ENOSPC, "No space left on device")
        await original(self, key, value)

    monkeypatch.setattr(zarr.storage.LocalStore, "set", full)
    model = mlp()
    path = tmp_path / "t.zarr"
    with pytest.raises(WriterError, match="No space left"):
        with record(model, path, sampling=Sampling(taylor_every=1, samples_per_round=2),
                    commit_seconds=0.0) as rec:
            train(rec, model, 40)
    monkeypatch.undo()
    report = validate_trace(path)
    assert len(report.reasons) == 1, report.reasons
    assert report.reasons[0].startswith("run aborted") and "No space left" in report.reasons[0]
    tr = open_trace(path)
    assert tr.attrs.status == "aborted" and 0 < tr.taylor_rounds <= 3
    assert not (lock_file(path)).exists()


def test_back_pressure_blocks_training_instead_of_growing_memory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    original = TraceWriter.write_round
    inflight = []

    def slow(self: TraceWriter, *args: object, **kwargs: object) -> None:
        time.sleep(0.01)
        inflight.append(threading.get_ident())
        original(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(TraceWriter, "write_round", slow)
    model = mlp()
    path = tmp_path / "t.zarr"
    with record(model, path, sampling=Sampling(taylor_every=1, samples_per_round=2),
                max_pending=1) as rec:
        train(rec, model, 25)
        assert rec._writer is not None and rec._writer._queue.qsize() <= 1
    assert open_trace(path).rounds == 25
    assert threading.get_ident() not in inflight  # writes happen off the training thread


def test_a_module_name_no_reader_accepts_is_refused_before_anything_is_written(
        tmp_path: Path) -> None:
    """torch allows '/' in a module name (add_module); a trace group so named would be a
    nested group that every reader refuses, so the writer refuses it up front, naming it."""
    model = nn.Sequential()
    model.add_module("enc/fc1", nn.Linear(6, 5))
    model.add_module("act", nn.ReLU())
    model.add_module("out", nn.Linear(5, 3))
    out = tmp_path / "slash.zarr"
    with pytest.raises(UsageError, match="'enc/fc1' cannot name a group of the trace"):
        with record(model, out, sampling=Sampling(taylor_every=1, samples_per_round=2)) as rec:
            train(rec, model, 3)
    assert not out.exists()
