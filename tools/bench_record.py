"""Benchmark: recording overhead, bytes per round and bits per activation (not a test).

Runs mnist-autoencoder (MNIST IDX files from --data-dir; default ../shared/data/mnist)
without recording, with the default sampling and with the paper's setting (Taylor data every
round on the whole minibatch), interleaved in one process so that the ratios compare like with
like. Prints one table. Usage: python tools/bench_record.py [--steps 400] [--repeats 2]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from ntrace.format.metadata import Sampling
from ntrace.format.reader import open_trace
from ntrace.format.summary import dir_bytes, summarize
from ntrace.progress import Progress
from ntrace.tasks import get_task
from ntrace.tasks.runner import RunOptions, run_task

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"


def timed_run(task_name: str, opts: RunOptions) -> tuple[list[float], float]:
    """Per-round wall times and the training loop's time (the recorder's creation of the
    trace on round 0 and its close, which drains the writer, included; data loading not)."""
    stamps: list[float] = []

    def on_round(p: Progress) -> None:
        stamps.append(time.perf_counter())

    result = run_task(get_task(task_name), opts, on_round)
    times = list(np.diff(stamps))
    return times, result.seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="mnist-autoencoder")
    ap.add_argument("--data-dir", default=str(DEFAULT_DATA))
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--paper-steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ntrace-bench-"))
    try:
        rows = measure(args.task, tmp, data_dir=args.data_dir, steps=args.steps,
                       paper_steps=args.paper_steps, repeats=args.repeats, device=args.device)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the paper setting writes gigabytes
    print_table(args, rows)


def measure(task_name: str, tmp: Path, *, data_dir: str | None, steps: int, paper_steps: int,
            repeats: int, device: str = "cpu") -> list[dict[str, Any]]:
    """Plain vs recorded runs of ``task_name``, interleaved ``repeats`` times, at the task's
    default sampling and (``paper_steps`` > 0) the paper's; traces are left in ``tmp``
    (``row["trace"]``)."""
    task = get_task(task_name)
    settings = {"default": (task.sampling, steps)}
    if paper_steps > 0:
        settings["paper (every round, whole batch)"] = (
            Sampling(taylor_every=1, samples_per_round=task.batch_size), paper_steps)
    rows = []
    timed_run(task_name, RunOptions(out=str(tmp / "warm.zarr"), record=False,
                                    data_dir=data_dir, steps=50, device=device))
    for label, (sampling, n_steps) in settings.items():
        plain_t, plain_total, rec_t, rec_total = [], [], [], []
        out = tmp / f"{task_name}-{label.split()[0]}.zarr"
        for _ in range(repeats):
            common = dict(data_dir=data_dir, steps=n_steps, device=device, seed=0)
            t, tot = timed_run(task_name, RunOptions(out=str(out), record=False, **common))
            plain_t += t
            plain_total.append(tot)
            t, tot = timed_run(task_name, RunOptions(out=str(out), overwrite=True,
                                                     sampling=sampling, **common))
            rec_t += t
            rec_total.append(tot)
        tr = open_trace(out)
        s = summarize(out)
        stored = dir_bytes(out)
        rows.append({
            "setting": label,
            "trace": out,
            "taylor_every": sampling.taylor_every,
            "samples": sampling.samples_per_round,
            "rounds": n_steps,
            "plain_ms": 1e3 * statistics.median(plain_t),
            "rec_ms": 1e3 * statistics.median(rec_t),
            "median_ratio": statistics.median(rec_t) / statistics.median(plain_t),
            "total_ratio": statistics.median(rec_total) / statistics.median(plain_total),
            "bytes_per_round": stored / tr.rounds,
            "raw_per_round": s.raw / tr.rounds,
            "bits_per_activation": s.bits_per_activation,
        })
    return rows


def print_table(args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    print(f"\nntrace record overhead — task {args.task}, device {args.device}, "
          f"{args.repeats} interleaved repeats\n")
    head = ("setting", "k", "S", "rounds", "plain ms/round", "rec ms/round", "median ratio",
            "total ratio", "disk kB/round", "raw kB/round", "bits/activation")
    print(" | ".join(head))
    print(" | ".join("---" for _ in head))
    for r in rows:
        print(" | ".join([
            r["setting"], str(r["taylor_every"]), str(r["samples"]), str(r["rounds"]),
            f"{r['plain_ms']:.2f}", f"{r['rec_ms']:.2f}", f"{r['median_ratio']:.2f}×",
            f"{r['total_ratio']:.2f}×", f"{r['bytes_per_round'] / 1e3:.1f}",
            f"{r['raw_per_round'] / 1e3:.1f}", f"{r['bits_per_activation']:.3f}"]))
    print("\nmedian ratio: median per-round time recorded ÷ plain; total ratio: whole loop "
          "including trace creation, the async writer draining and close.")


if __name__ == "__main__":
    main()
