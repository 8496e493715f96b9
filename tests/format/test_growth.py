"""Arrays grow with the rows written instead of being declared for the rounds a run expects
(spec 'Growth'), so a long run killed early leaves a trace of its own size that opens."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr

from ntrace.format.reader import open_trace
from ntrace.format.summary import summarize
from ntrace.format.writer import INITIAL_ROWS, grown

from .test_roundtrip import make_writer, random_round


def declared(path: Path, array: str) -> int:
    return int(zarr.open_array(str(path / array), mode="r").shape[0])


def test_a_run_expecting_1e13_rounds_killed_early_declares_only_what_it_wrote(
        tmp_path: Path) -> None:
    """Issue 18: `--steps 1000000000` declared a 10.2 TB Jacobian, over the reader's limit,
    so the killed trace could not be opened. Here 1e13 rounds are expected (the tiny layout's
    rows are small), 40 written and committed, and the writer is dropped without closing."""
    path = tmp_path / "t.zarr"
    w = make_writer(path, expected=10**13, commit_seconds=3600.0)
    rng = np.random.default_rng(0)
    for n in range(40):
        w.write_round(*random_round(n, rng))
    w.commit()
    del w  # killed: never closed
    assert declared(path, "loss") == INITIAL_ROWS["round"]
    assert declared(path, "layers/a/jacobian") == INITIAL_ROWS["taylor_round"]
    tr = open_trace(path)
    assert (tr.attrs.status, tr.rounds, tr.taylor_rounds) == ("running", 40, 20)
    assert summarize(path).stored > 0


def test_capacity_doubles_but_stops_at_the_expected_rows() -> None:
    assert grown(256, 257, None) == 512
    assert grown(256, 257, 300) == 300  # not past what the run expects
    assert grown(300, 301, 300) == 600  # a run longer than expected keeps doubling
    assert grown(256, 2000, None) == 2000


def test_a_long_run_grows_its_arrays_and_trims_them_at_close(tmp_path: Path) -> None:
    path = tmp_path / "t.zarr"
    w = make_writer(path, expected=None, commit_seconds=3600.0)  # type: ignore[arg-type]
    rng = np.random.default_rng(1)
    rows = INITIAL_ROWS["taylor_round"] * 2 + 7  # Taylor rows, every other round
    for n in range(2 * rows):
        w.write_round(*random_round(n, rng))
    w.commit()
    assert declared(path, "layers/a/jacobian") == 4 * INITIAL_ROWS["taylor_round"]
    w.close()
    tr = open_trace(path)
    assert tr.taylor_rounds == rows and declared(path, "layers/a/jacobian") == rows
