"""Benchmark: what a user feels when wrapping a plain training script (not a test).

Runs each example script of ``tools/examples`` twice over, interleaved: plain
(``python script.py ARGS``) and wrapped zero-code (``ntrace record --out T -- python script.py
ARGS``, default sampling). Every example times its own training loop and prints one line

    train loop: 12.345 s, median step 6.789 ms over 1000 steps

(``LOOP_LINE``). The script's loop includes what ntrace does on the training thread
(creating the trace on round 0, every round's hooks, Taylor rounds, the bounded queue); the
drain of the writer after the script returns is not in it but is in the process's wall time,
reported too. The ratios of the medians over repeats are printed, with the trace's bytes
per round. Usage:

    python tools/bench_scripts.py [--repeats 3] [--only resnet_cifar] [--quick]
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "tools" / "examples"
LOOP_LINE = re.compile(r"train loop: ([0-9.]+) s, median step ([0-9.]+) ms over (\d+) steps")

SHARED = ROOT.parent / "shared" / "data"


@dataclass(frozen=True)
class Script:
    """An example: the arguments of a run long enough that fixed costs amortise, those of a
    ``--quick`` run, and the ``ntrace record`` options it needs (beyond the default sampling)."""

    full: list[str]
    quick: list[str]
    record: list[str] = field(default_factory=list)


def _data(name: str) -> list[str]:
    return ["--data-dir", str(SHARED / name)] if (SHARED / name).is_dir() else []


SCRIPTS: dict[str, Script] = {
    "mlp_loop": Script(["--steps", "3000"], ["--steps", "600"]),
    "convnet_loop": Script(["--epochs", "6"], ["--epochs", "2"]),
    "amp_accumulation": Script(["--epochs", "6"], ["--epochs", "2"]),
    "mnist_functional": Script(["--epochs", "3", "--samples", "6000", *_data("mnist")],
                               ["--epochs", "1"]),
    "resnet_cifar": Script(["--epochs", "4", "--width", "8", *_data("cifar10")],
                           ["--steps", "20", "--width", "8"], ["--batchnorm", "fixed-stats"]),
    "sequence_classifier": Script(["--epochs", "40", "--sentences", "2048"], ["--epochs", "3"]),
    "hf_bert_classifier": Script(["--epochs", "4"], ["--epochs", "1"]),
}


@dataclass
class Runs:
    loop: list[float] = field(default_factory=list)
    step_ms: list[float] = field(default_factory=list)
    wall: list[float] = field(default_factory=list)
    steps: int = 0
    bytes_per_round: float = float("nan")


def run_once(cmd: list[str], cwd: Path) -> tuple[float, float, int, float]:
    """(loop seconds, median step ms, steps, process wall seconds) of one run."""
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise SystemExit(f"{' '.join(cmd)} failed (exit {proc.returncode}): {' | '.join(tail)}")
    found = LOOP_LINE.findall(proc.stdout)
    if not found:
        raise SystemExit(f"{cmd[-1]}: no '{LOOP_LINE.pattern}' line in its output")
    loop, step, n = found[-1]
    return float(loop), float(step), int(n), wall


def trace_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def measure(name: str, args: list[str], record: list[str], repeats: int, tmp: Path
            ) -> tuple[Runs, Runs]:
    script = str(EXAMPLES / f"{name}.py")
    ntrace = [sys.executable, "-c", "from ntrace.cli import main; main()"]
    plain, wrapped = Runs(), Runs()
    for rep in range(repeats):
        out = tmp / f"{name}-{rep}.zarr"
        for runs, cmd in ((plain, [sys.executable, script, *args]),
                          (wrapped, [*ntrace, "record", "--out", str(out), "--overwrite",
                                     *record, "--", sys.executable, script, *args])):
            loop, step, n, wall = run_once(cmd, ROOT)
            runs.loop.append(loop)
            runs.step_ms.append(step)
            runs.wall.append(wall)
            runs.steps = n
        if rep == 0:
            wrapped.bytes_per_round = trace_bytes(out) / max(1, wrapped.steps)
        shutil.rmtree(out, ignore_errors=True)
    return plain, wrapped


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", action="append", choices=sorted(SCRIPTS),
                    help="benchmark only this script (repeatable)")
    ap.add_argument("--quick", action="store_true", help="short runs (fixed costs dominate)")
    args = ap.parse_args()
    names = args.only or sorted(SCRIPTS)
    tmp = Path(tempfile.mkdtemp(prefix="ntrace-bench-scripts-"))
    print("| script | steps | loop plain s | loop wrapped s | whole loop × | median step × "
          "| process wall × | kB / round |")
    print("|---|---|---|---|---|---|---|---|")
    try:
        for name in names:
            sc = SCRIPTS[name]
            plain, wrapped = measure(name, sc.quick if args.quick else sc.full, sc.record,
                                     args.repeats, tmp)
            med = statistics.median
            print(f"| {name} | {plain.steps} | {med(plain.loop):.2f} | {med(wrapped.loop):.2f} "
                  f"| {med(wrapped.loop) / med(plain.loop):.2f} "
                  f"| {med(wrapped.step_ms) / med(plain.step_ms):.2f} "
                  f"| {med(wrapped.wall) / med(plain.wall):.2f} "
                  f"| {wrapped.bytes_per_round / 1e3:.1f} |", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
