"""Crash test of the commit protocol: SIGKILL a recording at random instants, then read it.

    python tools/crash_test.py [--trials 50] [--seed 0] [--steps 3000]

Each trial starts a process that records the default task (``digits-autoencoder``, as
``ntrace record`` does, with a 100-point probe) and writes, after every round, how many
rounds it has completed to a small file. After a random delay (for a fifth of the trials
before the first round, for the rest between the first round and the end of a full
recording, both timed by a trial that is not killed) the process is killed with SIGKILL
wherever it is: loading data, creating the trace, training, writing chunks, committing or
closing. The trace is then opened, validated and its committed rounds compared with the
rounds the process had completed.

A trial *fails* when the path holds something that does not open or does not validate, when
rounds were reported complete but no trace exists, or when the trace commits more rounds
than were run. ``lost`` is completed minus committed rounds. Exit status 1 if any trial
failed. Recording processes come from a fork server that has torch and ntrace imported, so
a trial costs the recording, not the interpreter start.
"""

from __future__ import annotations

import argparse
import importlib
import json
import multiprocessing as mp
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(Path(__file__).resolve().parent) not in sys.path:  # fork-server children import us
    sys.path.insert(0, str(Path(__file__).resolve().parent))

TASK = "digits-autoencoder"
PROBE_SIZE = 100
# rounds a recording holds in memory, not yet written: the recorder's open batch and the
# writer queue's 8 batches plus the one being written, each ending at a Taylor round (every
# 10th for this task) or after 64 rounds
BOUND_QUEUED = (8 + 2) * 10


def _warm_fork_server() -> None:
    """Run blosc once so that numcodecs creates its process lock here (in the fork server)
    rather than in each recording process, where a kill would leak it."""
    import numcodecs

    numcodecs.Blosc(cname="zstd").encode(bytes(64))


if __name__ != "__main__":
    _warm_fork_server()


def record_child(out: str, steps: int, seed: int, progress: str) -> None:
    """Record ``TASK`` to ``out`` for ``steps`` rounds, writing the number of completed rounds
    to the file ``progress`` (8 bytes, overwritten in place) after each one; ``-n - 1`` once
    the trace is closed. Runs in the process that gets killed."""
    import torch

    from ntrace.tasks import get_task
    from ntrace.tasks.runner import RunOptions, run_task

    torch.set_num_threads(1)
    fd = os.open(progress, os.O_WRONLY)

    def report(n: int) -> None:
        os.pwrite(fd, n.to_bytes(8, "little", signed=True), 0)

    def on_round(p: Any) -> None:
        report(p.round)

    run_task(get_task(TASK), RunOptions(out=out, steps=steps, seed=seed, overwrite=True,
                                        probe_size=PROBE_SIZE), on_round)
    report(-steps - 1)


def read_progress(path: Path) -> int:
    return int.from_bytes(path.read_bytes()[:8], "little", signed=True)


@dataclass
class Trial:
    index: int
    delay: float
    killed: bool
    completed: int  # rounds the process reported complete
    committed: int | None  # rounds the trace commits (None: no trace at the path)
    status: str | None
    reasons: list[str]
    stray: int  # hidden staging/deleting directories left next to the trace
    seconds: float
    first_round: float | None

    @property
    def lost(self) -> int:
        return max(0, self.completed - (self.committed or 0))

    @property
    def failure(self) -> str | None:
        if self.reasons:
            return f"invalid trace: {self.reasons[0]}"
        if self.committed is None:
            return None if self.completed == 0 else (
                f"{self.completed} rounds were completed but there is no trace")
        if self.committed > self.completed + 1:
            return f"commits {self.committed} rounds but only {self.completed} were run"
        if not self.killed and self.status != "complete":
            return f"finished run left status {self.status}"
        return None


def context() -> Any:
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch._dynamo", "zarr", "sklearn.datasets",
                                "ntrace.record",
                                "ntrace.tasks.runner", "ntrace.format.validate", "crash_test"])
    return ctx


def run_trial(ctx: Any, index: int, out: Path, steps: int, seed: int,
              delay: float | None) -> Trial:
    """Record to ``out``; kill after ``delay`` seconds (never when ``delay`` is None)."""
    from ntrace.errors import NtraceError
    from ntrace.format.validate import validate_trace

    progress = out.parent / f"{out.name}.progress"
    progress.write_bytes(bytes(8))
    start = time.perf_counter()
    target = importlib.import_module("crash_test").record_child  # by name, even from __main__
    proc = ctx.Process(target=target, args=(str(out), steps, seed + index, str(progress)))
    proc.start()
    first = None  # seconds until the first round was reported complete
    while proc.is_alive():
        now = time.perf_counter() - start
        if delay is not None and now >= delay:
            break
        if first is None and read_progress(progress) != 0:
            first = now
        proc.join(0.005 if delay is None else min(0.005, delay - now))
    killed = proc.is_alive()
    if killed:
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
    elif proc.exitcode != 0:
        raise RuntimeError(f"the recording process failed (exit {proc.exitcode})")
    seconds = time.perf_counter() - start
    n = read_progress(progress)
    completed = n if n >= 0 else -n - 1
    committed = status = None
    reasons: list[str] = []
    if out.exists():
        try:
            report = validate_trace(out)
            reasons = report.reasons
            if report.attrs is not None:
                committed, status = report.attrs.commit.rounds, report.attrs.status
        except NtraceError as exc:
            reasons = [str(exc)]
    stray = sum(1 for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")
                and p.is_dir())
    return Trial(index, delay or 0.0, killed, completed, committed, status, reasons, stray,
                 seconds, first)


def run_trials(trials: int, seed: int = 0, steps: int = 3000, work: Path | None = None,
               log: Any = None) -> dict[str, Any]:
    """Two full recordings (warm-up, timing), then ``trials`` killed ones; a summary."""
    ctx = context()
    rng = random.Random(seed)
    tmp = Path(tempfile.mkdtemp(prefix="ntrace-crash-", dir=work))
    results: list[Trial] = []
    try:
        # two full recordings: the first warms the fork server up, the second times a run
        for name in ("warm", "full"):
            results.append(run_trial(ctx, 0, tmp / f"{name}.zarr", steps, seed, None))
        span = results[-1].seconds
        startup = results[-1].first_round or 0.0
        for i in range(1, trials + 1):
            d = tmp / f"t{i}"
            d.mkdir()
            # a fifth of the kills land before the first round (loading data, creating the
            # trace), the rest while training, writing, committing and closing
            delay = (rng.uniform(0.0, startup) if rng.random() < 0.2
                     else rng.uniform(startup, span))
            trial = run_trial(ctx, i, d / "trace.zarr", steps, seed, delay)
            results.append(trial)
            shutil.rmtree(d, ignore_errors=True)
            if log is not None:
                f = trial.failure
                print(f"trial {i:3d}: killed after {trial.delay:5.2f} s, completed "
                      f"{trial.completed:4d}, committed {trial.committed!s:>4s}, lost "
                      f"{trial.lost:4d}{'  FAILED: ' + f if f else ''}", file=log, flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    killed = [t for t in results if t.killed]
    failures = [t for t in results if t.failure]
    return {
        "trials": len(killed),
        "finished_before_kill": len(results) - 2 - len(killed),
        "no_trace_yet": sum(t.committed is None for t in killed),
        "failures": len(failures),
        "failure_reasons": [f"trial {t.index}: {t.failure}" for t in failures],
        "max_rounds_lost": max((t.lost for t in killed), default=0),
        "mean_rounds_lost": (sum(t.lost for t in killed) / len(killed)) if killed else 0.0,
        "full_run_seconds": span,
        "startup_seconds": startup,
        "rounds_per_second": steps / max(span, 1e-9),
        "steps": steps,
        "stray_dirs": sum(t.stray for t in results),
        "results": [asdict(t) | {"lost": t.lost, "failure": t.failure} for t in results],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=50, help="killed recordings (default 50)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=3000,
                    help="rounds per recording (default 3000: several commit intervals)")
    ap.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = ap.parse_args(argv)
    s = run_trials(args.trials, args.seed, args.steps, log=sys.stderr)
    if args.json:
        print(json.dumps({k: v for k, v in s.items() if k != "results"}, indent=2))
    else:
        print(f"trials: {s['trials']} killed ({s['no_trace_yet']} before the trace existed), "
              f"{s['finished_before_kill']} finished first")
        print(f"failures (unreadable or invalid traces): {s['failures']}")
        for reason in s["failure_reasons"]:
            print(f"  - {reason}")
        rate = s["rounds_per_second"]
        print(f"rounds lost: max {s['max_rounds_lost']}, mean {s['mean_rounds_lost']:.1f} "
              f"(= {s['max_rounds_lost'] / rate:.2f} s and {s['mean_rounds_lost'] / rate:.2f} "
              f"s of training at {rate:.0f} rounds/s; a full run of {s['steps']} rounds takes "
              f"{s['full_run_seconds']:.2f} s, {s['startup_seconds']:.2f} s of it before the "
              "first round)")
        print(f"bound: the rounds the writer received in the last commit interval (1 s) plus "
              f"those queued in memory, at most {BOUND_QUEUED} for this task "
              "(spec/taylor-trace.md section 6)")
        print(f"hidden staging/deleting directories left by kills: {s['stray_dirs']}")
    return 1 if s["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
