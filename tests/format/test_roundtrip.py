"""Writer → reader: every array round trips, capacity grows, uncommitted rows stay hidden."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ntrace.errors import TraceExistsError, UsageError
from ntrace.format.bits import pack
from ntrace.format.metadata import (
    Activation,
    LayerAttrs,
    LossSpec,
    ProbeUnits,
    Sampling,
    TraceAttrs,
)
from ntrace.format.reader import open_trace
from ntrace.format.writer import LayerRound, ProbeSetup, Snapshot, TaylorRound, TraceWriter

S, P = 3, 4


def make_writer_at(path: Path) -> TraceWriter:
    return make_writer(path, overwrite=True)


def make_writer(path: Path, expected: int = 4, commit_seconds: float = 0.0,
                overwrite: bool = False) -> TraceWriter:
    attrs = TraceAttrs(loss=LossSpec("mse"),
                       sampling=Sampling(taylor_every=2, samples_per_round=S, probe_every=3,
                                         probe_size=5),
                       layers=("a", "b"), output_size=P)
    layers = [LayerAttrs("a", 0, "linear", 6, 5, True, Activation("relu"), "stored"),
              LayerAttrs("b", 1, "linear", 5, P, False, Activation("identity"), "identity")]
    probe = ProbeSetup(np.arange(5), np.ones((5, 6), np.float32), ProbeUnits(("a",), (5,)))
    return TraceWriter.create(path, attrs, layers, {"a": np.array([0, 2, 4]), "b": np.arange(P)},
                              probe, expected_rounds=expected, commit_seconds=commit_seconds,
                              overwrite=overwrite)


def random_round(n: int, rng: np.random.Generator) -> tuple[float, TaylorRound | None,
                                                             Snapshot | None]:
    t = None
    if n % 2 == 0:
        t = TaylorRound(n, rng.integers(0, 100, S), rng.random(S, np.float32),
                        rng.random((S, P), np.float32), rng.random((S, P), np.float32), {
                            "a": LayerRound(rng.random((5, 6), np.float32),
                                            rng.random((S, 6), np.float32),
                                            rng.random(5, np.float32),
                                            rng.random((S, P, 3), np.float32),
                                            pack(rng.random((S, 5)) > 0.5)),
                            "b": LayerRound(rng.random((P, 5), np.float32),
                                            rng.random((S, 5), np.float32))})
    snap = Snapshot(n, pack(rng.random((5, 5)) > 0.5)) if n % 3 == 0 else None
    return float(rng.random()), t, snap


def test_every_array_round_trips_and_capacity_grows(tmp_path: Path) -> None:
    path = tmp_path / "t.zarr"
    w = make_writer(path, expected=2)  # far too small: arrays must grow
    rng = np.random.default_rng(0)
    rounds = [random_round(n, rng) for n in range(37)]
    for r in rounds:
        w.write_round(*r)
    w.close()
    tr = open_trace(path)
    assert (tr.rounds, tr.taylor_rounds, tr.snapshots) == (37, 19, 13)
    np.testing.assert_array_equal(tr.read("loss"), np.float32([r[0] for r in rounds]))
    taylors = [r[1] for r in rounds if r[1] is not None]
    snaps = [r[2] for r in rounds if r[2] is not None]
    for name in ("round_index", "sample_index", "sample_loss", "output", "target"):
        np.testing.assert_array_equal(tr.read(f"taylor/{name}"),
                                      np.stack([np.asarray(getattr(t, name)) for t in taylors]))
    for layer in ("a", "b"):
        for field in ("weight", "bias", "input", "jacobian", "mask"):
            if not tr.has(f"layers/{layer}/{field}"):
                assert getattr(taylors[0].layers[layer], field) is None
                continue
            np.testing.assert_array_equal(
                tr.read(f"layers/{layer}/{field}"),
                np.stack([getattr(t.layers[layer], field) for t in taylors]))
    np.testing.assert_array_equal(tr.read("probe/config"), np.stack([s.config for s in snaps]))
    np.testing.assert_array_equal(tr.read("probe/round_index"), [s.round_index for s in snaps])
    np.testing.assert_array_equal(tr.tracked["a"], [0, 2, 4])
    # rows by index and by slice agree with the full read
    np.testing.assert_array_equal(tr.read("layers/a/weight", 7), taylors[7].layers["a"].weight)
    np.testing.assert_array_equal(tr.read("layers/a/weight", np.array([1, 18])),
                                  np.stack([taylors[1].layers["a"].weight,
                                            taylors[18].layers["a"].weight]))
    with pytest.raises(IndexError):
        tr.read("layers/a/weight", np.array([19]))


def test_uncommitted_rows_are_invisible(tmp_path: Path) -> None:
    path = tmp_path / "t.zarr"
    w = make_writer(path, commit_seconds=3600.0)
    rng = np.random.default_rng(1)
    for n in range(5):
        w.write_round(*random_round(n, rng))
    tr = open_trace(path)
    assert (tr.rounds, tr.taylor_rounds) == (0, 0)  # nothing committed yet
    assert tr.read("layers/a/weight").shape == (0, 5, 6)
    w.commit()
    tr = open_trace(path)
    assert (tr.rounds, tr.taylor_rounds, tr.snapshots) == (5, 3, 2)
    assert tr.dataset("layers/a").sizes["taylor_round"] == 3
    w.close()


def test_write_round_checks_shapes_and_order(tmp_path: Path) -> None:
    w = make_writer(tmp_path / "t.zarr")
    rng = np.random.default_rng(2)
    loss, t, s = random_round(0, rng)
    assert t is not None
    t.layers["a"].weight = np.zeros((5, 7), np.float32)
    with pytest.raises(UsageError, match=r"layers/a/weight: expected shape \(5, 6\), found"):
        w.write_round(loss, t, s)
    _, t2, _ = random_round(2, rng)
    assert t2 is not None
    with pytest.raises(UsageError, match="Taylor data for round 2 given at round 0"):
        w.write_round(loss, t2)
    w.close()


def test_existing_output_is_never_clobbered(tmp_path: Path) -> None:
    path = tmp_path / "t.zarr"
    make_writer(path).close()
    with pytest.raises(TraceExistsError, match="--overwrite"):
        make_writer(path)
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("precious")
    with pytest.raises(UsageError, match="not an ntrace trace"):
        make_writer_at(other)
    assert (other / "keep.txt").read_text() == "precious"
