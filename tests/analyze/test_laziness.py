"""Laziness, tested: the analysis reads each Taylor round's data a bounded number of times in
bounded blocks, and its peak memory stays far below the size of the trace's data."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from ntrace.analyze import AnalysisOptions, analyze_trace
from ntrace.format.reader import Trace, open_trace

from .conftest import synthetic_trace


def _uncompressed(path: Path) -> int:
    tr = open_trace(path)
    total = 0
    for name, lay in tr.layouts.items():
        arr = tr.zarr_array(name)
        total += int(np.prod(arr.shape)) * np.dtype(lay.dtype).itemsize
    return total


def test_reads_are_blockwise_and_each_round_is_read_once(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    path = synthetic_trace(tmp_path / "mid.zarr", T=30, S=16, p=8, d=16, n=64)
    reads: list[tuple[str, int, int]] = []
    original = Trace.read

    def counting(self: Trace, name: str, rows: object = None) -> np.ndarray:
        out = original(self, name, rows)  # type: ignore[arg-type]
        reads.append((name, out.shape[0] if out.ndim else 1, out.nbytes))
        return out

    monkeypatch.setattr(Trace, "read", counting)
    block = 1 << 16
    analyze_trace(path, AnalysisOptions(block_bytes=block, checkpoints=5, exploration=False,
                                        scales=("neuron", "layer")))
    jac = [r for r in reads if r[0] == "layers/a/jacobian"]
    per_round = 16 * 8 * 64 * 4
    assert max(r[1] for r in jac) <= block // per_round  # never more than a block at once
    assert sum(r[1] for r in jac) == 30  # every round's Jacobian read exactly once
    weights = [r for r in reads if r[0] == "layers/a/weight"]
    assert sum(r[1] for r in weights) == 3 * 30  # domain: 2 passes; statistics: 1 pass
    big = [r for r in reads if r[2] > 4 * block]
    assert not big, big


SCRIPT = textwrap.dedent("""
    import sys
    import torch
    torch.set_num_threads(1)
    from ntrace.analyze import AnalysisOptions, analyze_trace
    opts = AnalysisOptions(scales=("neuron",), exploration=False, block_bytes=8 << 20,
                           checkpoints=4)
    analyze_trace(sys.argv[1], opts)  # warm-up: imports, thread pools, allocator arenas
    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    try:
        with open("/proc/self/clear_refs", "w") as f:  # reset the peak resident size (VmHWM)
            f.write("5")
    except OSError:
        print("no-clear-refs")
        sys.exit(0)
    if status("VmHWM") > status("VmRSS") + (8 << 20):
        print("no-clear-refs")  # the kernel ignored the reset
        sys.exit(0)
    before = status("VmRSS")
    ds = analyze_trace(sys.argv[2], opts)
    print("ok", status("VmHWM") - before, int(ds.checkpoint[-1]),
          float(ds.neuron_optimum[-1].mean()))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc")
def test_peak_memory_stays_far_below_the_trace_size(tmp_path: Path) -> None:
    """Peak resident memory while analysing a trace with ~340 MB of data stays under 150 MB
    (measured in a fresh process after a warm-up run, so imports and thread pools are paid).
    An address-space limit (RLIMIT_AS) cannot be used here: the format reader asks zarr for
    a 1 GiB byte range per chunk, and CPython reserves that much before reading a file."""
    small = synthetic_trace(tmp_path / "small.zarr", T=3, S=64, p=256, d=32, n=64,
                            compressible=True)
    big = synthetic_trace(tmp_path / "big.zarr", T=80, S=64, p=256, d=32, n=64,
                          compressible=True)
    size = _uncompressed(big)
    budget = 150 << 20
    assert size > 2 * budget, size
    script = tmp_path / "peak.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, MALLOC_ARENA_MAX="2", OMP_NUM_THREADS="1")
    root = Path(__file__).resolve().parents[2]
    res = subprocess.run([sys.executable, str(script), str(small), str(big)],
                         capture_output=True, text=True, env=env, cwd=root, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    if res.stdout.startswith("no-clear-refs"):
        pytest.skip("this kernel cannot reset the peak resident size (/proc/self/clear_refs)")
    tag, peak, last, value = res.stdout.split()
    assert tag == "ok" and int(last) == 80 and np.isfinite(float(value))
    assert int(peak) < budget, f"peak {int(peak) >> 20} MiB for {size >> 20} MiB of data"
