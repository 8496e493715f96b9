"""One progress protocol: every long operation reports ntrace.progress.Progress events, and
the CLI renders them in one place."""

from __future__ import annotations

import io
from pathlib import Path

from rich.console import Console

from ntrace.analyze import AnalysisOptions, analyze_trace
from ntrace.cli.progress import Bars
from ntrace.format.pack import pack_trace, verify_pack
from ntrace.format.validate import validate_trace
from ntrace.progress import Progress

TINY = Path(__file__).resolve().parents[1] / "spec" / "examples" / "valid" / "tiny-mlp.zarr"


def test_format_and_analysis_report_progress_events(tmp_path: Path) -> None:
    seen: list[Progress] = []
    validate_trace(TINY, progress=seen.append)
    pack_trace(TINY, tmp_path / "t.zip", progress=seen.append)
    verify_pack(tmp_path / "t.zip", progress=seen.append)
    analyze_trace(TINY, AnalysisOptions(checkpoints=2, progress=seen.append))
    assert all(isinstance(p, Progress) for p in seen)
    stages = {p.stage for p in seen}
    assert {"validating", "packing", "verifying"} <= stages and len(stages) > 3
    last = {p.stage: p for p in seen}
    assert all(p.done == p.total for p in last.values())


def test_bars_print_each_outer_label_once_off_a_terminal() -> None:
    out = io.StringIO()
    with Bars(Console(file=out, force_terminal=False), outer="jobs") as bars:
        for p in (Progress("jobs", 0, 2, "train a"), Progress("rounds", 5, 10, "train a"),
                  Progress("jobs", 0, 2, "train a"), Progress("jobs", 1, 2, "train b")):
            bars(p)
    assert out.getvalue().splitlines() == ["[0/2] train a", "[1/2] train b"]
