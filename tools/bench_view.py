"""``ntrace view``'s incremental analysis against a fresh ``ntrace analyze`` of each prefix.

    python tools/bench_view.py TRACE [--updates 8]

A copy of the (finished) TRACE is cut back to a committed prefix (its commit record rewritten,
as its writer left it part-way), grown update by update, and at each update the view's
:class:`~ntrace.view.live.LiveAnalysis` and a fresh analysis of the same prefix (same options,
checkpoints :func:`~ntrace.view.live.view_checkpoints`) are timed and compared.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ntrace.analyze import AnalysisOptions, analyze_trace  # noqa: E402
from ntrace.format.reader import open_trace  # noqa: E402
from ntrace.view.live import LiveAnalysis, view_checkpoints  # noqa: E402


def set_commit(path: Path, rounds: int) -> None:
    """Rewrite the trace's commit record (and status ``running``) as its writer left it after
    ``rounds`` rounds: the rows past it are then not part of the trace."""
    with open_trace(path) as tr:  # the rows of each dimension that belong to those rounds
        taylor = int((tr.zarr_array("taylor/round_index")[:] < rounds).sum())
        snaps = (int((tr.zarr_array("probe/round_index")[:] < rounds).sum())
                 if tr.has("probe/round_index") else 0)
    doc_path = path / "zarr.json"
    doc = json.loads(doc_path.read_text())
    attrs = doc["attributes"]["ntrace"]
    attrs["commit"] = {"rounds": rounds, "taylor_rounds": taylor, "snapshots": snaps}
    attrs["status"] = "running"
    doc_path.write_text(json.dumps(doc))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trace")
    ap.add_argument("--updates", type=int, default=8)
    ap.add_argument("--first", type=float, default=0.5,
                    help="share of the rounds committed at the first update")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "live.zarr"
        shutil.copytree(args.trace, path)
        with open_trace(path) as tr:
            total = tr.rounds
        live = LiveAnalysis(path)
        steps = np.linspace(args.first * total, total, args.updates).astype(int)
        print("| rounds | Taylor rounds | snapshots | view update: hindsight + exploration + "
              "assembly (s) | fresh analysis (s) | fresh ÷ view hindsight | max |Δ optimum| |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for r in steps:
            set_commit(path, int(r))
            live.update()
            t = live.timings
            ds = live.dataset
            assert ds is not None
            opts = replace(AnalysisOptions(domain="none", checkpoints=view_checkpoints(
                live.taylor_rounds)), scales=tuple(ds.attrs["ntrace"]["scales"]))
            t0 = time.perf_counter()
            fresh = analyze_trace(path, opts)
            t_fresh = time.perf_counter() - t0
            diff = max(float(np.nanmax(np.abs(ds[v].values - fresh[v].values)))
                       for v in ("layer_optimum", "neuron_optimum") if v in fresh)
            print(f"| {r} | {live.taylor_rounds} | {live.snapshots} | {t['hindsight']:.2f} + "
                  f"{t['exploration']:.2f} + {t['assembly']:.2f} | {t_fresh:.2f} | "
                  f"{t_fresh / max(t['hindsight'], 1e-9):.1f}× | {diff:.1e} |", flush=True)
        print(f"Taylor rounds read by the view over all updates: {live.rows_read}")


if __name__ == "__main__":
    main()
