"""A write error never lets a commit count an unwritten row (spec 'Commit protocol').

The store is made to fail (ENOSPC, as on a full disk) for chosen keys; the writer must then
commit only rows whose chunk writes completed, mark the trace ``aborted`` with the reason, and
leave its last good commit when even that cannot be written.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr.storage

from ntrace.errors import WriterError
from ntrace.format.reader import open_trace
from ntrace.format.validate import validate_trace

from .test_roundtrip import make_writer, random_round


def fail_when(monkeypatch: pytest.MonkeyPatch, broken: Callable[[str], bool]) -> list[str]:
    """Make every store write of a key for which ``broken(key)`` holds fail with ENOSPC;
    returns the keys that failed."""
    original = zarr.storage.LocalStore.set
    failed: list[str] = []

    async def set_(self: Any, key: str, value: Any) -> None:
        if broken(key):
            failed.append(key)
            raise OSError(errno.ENOSPC, "No space left on device")
        await original(self, key, value)

    monkeypatch.setattr(zarr.storage.LocalStore, "set", set_)
    return failed


def after(prefix: str, n: int) -> Callable[[str], bool]:
    """Keys under ``prefix`` fail from the (n+1)-th write on."""
    seen = [0]

    def broken(key: str) -> bool:
        if not key.startswith(prefix):
            return False
        seen[0] += 1
        return seen[0] > n

    return broken


def aborted(path: Path) -> str:
    """The trace is aborted and its commit holds no unwritten (fill-value) row and agrees
    with the array lengths (the random rows written here fail the numeric consistency
    checks, which are beside the point); returns the abort reason validation reports."""
    report = validate_trace(path)
    assert report.attrs is not None and report.attrs.status == "aborted"
    assert report.reasons[0].startswith("run aborted"), report.reasons
    wrong = [r for r in report.reasons if "non-finite" in r or "commit" in r
             or "round_index" in r]
    assert wrong == [report.reasons[0]], wrong
    return report.reasons[0]


def test_a_failed_chunk_write_is_never_committed(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A commit after every round; the third Jacobian chunk (Taylor row 2, round 4) fails.
    Round 4's loss row was written, its Taylor rows partly: the commit stays at 4 rounds."""
    path = tmp_path / "t.zarr"
    w = make_writer(path, commit_seconds=0.0)
    rng = np.random.default_rng(0)
    rounds = [random_round(n, rng) for n in range(8)]
    failed = fail_when(monkeypatch, after("layers/a/jacobian/c/", 2))
    for r in rounds[:4]:
        w.write_round(*r)
    with pytest.raises(WriterError, match="writing round 4 failed: No space left"):
        w.write_round(*rounds[4])
    assert failed
    with pytest.raises(WriterError, match="failed earlier"):
        w.write_round(*rounds[5])
    w.close()  # as the recorder does after a writer error: status 'complete' becomes aborted
    assert "writing the trace failed: No space left on device" in aborted(path)
    tr = open_trace(path)
    assert (tr.rounds, tr.taylor_rounds, tr.snapshots) == (4, 2, 2)
    np.testing.assert_array_equal(tr.read("loss"), np.float32([r[0] for r in rounds[:4]]))
    np.testing.assert_array_equal(tr.read("layers/a/jacobian"),
                                  np.stack([rounds[n][1].layers["a"].jacobian for n in (0, 2)]))


def test_the_commit_stops_before_the_first_round_with_an_unwritten_row(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Twenty rounds staged between commits; at the second commit the probe's chunk writes
    fail. Rounds 10 and 11 (no snapshot) are whole; round 12's snapshot is not written."""
    path = tmp_path / "t.zarr"
    w = make_writer(path, commit_seconds=3600.0)
    rng = np.random.default_rng(1)
    rounds = [random_round(n, rng) for n in range(20)]
    for r in rounds[:10]:
        w.write_round(*r)
    w.commit()
    fail_when(monkeypatch, lambda key: key.startswith("probe/config/c/"))
    for r in rounds[10:]:
        w.write_round(*r)
    with pytest.raises(OSError, match="No space left"):
        w.commit()
    w.close("aborted", "writer failed: No space left on device")
    assert "writer failed: No space left on device" in aborted(path)
    tr = open_trace(path)
    assert (tr.rounds, tr.taylor_rounds, tr.snapshots) == (12, 6, 4)
    np.testing.assert_array_equal(tr.read("loss"), np.float32([r[0] for r in rounds[:12]]))
    np.testing.assert_array_equal(tr.read("probe/config"),
                                  np.stack([r[2].config for r in rounds[:12] if r[2]]))


def test_when_nothing_can_be_written_the_last_commit_stands(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk refuses the status document too: the trace keeps its last commit and
    status 'running', and still opens and agrees with its commit."""
    path = tmp_path / "t.zarr"
    w = make_writer(path, commit_seconds=3600.0)
    rng = np.random.default_rng(2)
    for n in range(6):
        w.write_round(*random_round(n, rng))
    w.commit()
    fail_when(monkeypatch, lambda key: True)
    for n in range(6, 9):
        w.write_round(*random_round(n, rng))
    with pytest.raises(WriterError, match="closing the trace failed: No space left"):
        w.close()
    monkeypatch.undo()
    tr = open_trace(path)
    assert tr.attrs.status == "running"
    assert (tr.rounds, tr.taylor_rounds, tr.snapshots) == (6, 3, 2)
    assert not [r for r in validate_trace(path).reasons if "non-finite" in r or "commit" in r]
