"""Crash test of the commit protocol: SIGKILL a recording at random instants, then read it.

    python tools/crash_test.py [--trials 50] [--seed 0] [--steps 3000]
    python tools/crash_test.py --disk-full [--sizes 256k,2m,4m,...] [--steps 1200]
    python tools/crash_test.py --concurrent [--trials 6] [--steps 600]

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

``--disk-full`` records into file systems too small for the run: a tmpfs of each size (as
root; elsewhere a store that refuses writes past that many bytes). Every trace left must
open, commit only rows the writer wrote (its committed rows equal those of a reference run on
a roomy disk, bit for bit) and say ``aborted`` with the reason, or, when not even that could
be written, still commit only written rows. The count that must be 0 is
``committed_unwritten``.

``--concurrent`` replays the concurrent-overwrite report of issue 18: run A records with
``--overwrite``; run B, started at a random instant of A's run (or together with it), records
the same path with ``--overwrite`` and another optimizer. One must win and the other be
refused with exit 4 naming the winner (or run after it, when A had finished); the path must
hold one valid, complete trace, of the run that exited 0 last.
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
        report(p.done)

    run_task(get_task(TASK), RunOptions(out=out, steps=steps, seed=seed, overwrite=True,
                                        probe_size=PROBE_SIZE), on_round)
    report(-steps - 1)


def _limit_store_bytes(budget: int) -> None:
    """Make zarr's local stores behave as on a disk of ``budget`` bytes: a write that does not
    fit fails (ENOSPC) while smaller ones still may, a replaced or deleted key frees its
    bytes; a full disk where no tmpfs can be mounted."""
    import errno

    import zarr.storage

    original = {name: getattr(zarr.storage.LocalStore, name) for name in ("set", "delete")}
    used = [0]

    def size(store: Any, key: str) -> int:
        try:
            return os.path.getsize(Path(store.root) / key)
        except OSError:
            return 0

    async def set_(self: Any, key: str, value: Any) -> None:
        if used[0] + len(value) > budget:  # the new copy is written beside the old one
            raise OSError(errno.ENOSPC, "No space left on device (simulated)")
        old = size(self, key)
        await original["set"](self, key, value)
        used[0] += len(value) - old

    async def delete(self: Any, key: str) -> None:
        old = size(self, key)
        await original["delete"](self, key)
        used[0] -= old

    zarr.storage.LocalStore.set = set_  # type: ignore[method-assign]
    zarr.storage.LocalStore.delete = delete  # type: ignore[method-assign]


def outcome_child(out: str, steps: int, seed: int, optimizer: str, result: str,
                  budget: int | None = None) -> None:
    """Record ``TASK`` to ``out`` as ``ntrace record --overwrite`` does and write its exit
    status and one-line message (what the CLI would print) to the file ``result``."""
    import torch

    from ntrace.errors import NtraceError
    from ntrace.tasks import get_task
    from ntrace.tasks.runner import RunOptions, run_task

    torch.set_num_threads(1)
    if budget is not None:
        _limit_store_bytes(budget)
    code, message = 0, ""
    try:
        run_task(get_task(TASK), RunOptions(out=out, steps=steps, seed=seed, overwrite=True,
                                            optimizer=optimizer, probe_size=PROBE_SIZE))
    except NtraceError as exc:
        code, message = exc.exit_code, str(exc)
    except OSError as exc:
        code, message = 11, str(exc)
    Path(result).write_text(json.dumps({"exit": code, "message": message, "pid": os.getpid()}))


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
                                "ntrace.recording",
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


def _start(ctx: Any, out: Path, steps: int, seed: int, optimizer: str, result: Path,
           budget: int | None = None) -> Any:
    target = importlib.import_module("crash_test").outcome_child
    proc = ctx.Process(target=target, args=(str(out), steps, seed, optimizer, str(result),
                                            budget))
    proc.start()
    return proc


def _finished(proc: Any, result: Path) -> dict[str, Any]:
    proc.join()
    if not result.exists():
        return {"exit": proc.exitcode, "message": "died without a result", "pid": proc.pid}
    return dict(json.loads(result.read_text()))


def committed_unwritten(trace: Path, reference: Path) -> list[str]:
    """Arrays whose committed rows differ from the reference run's (rows the writer never
    wrote read as fill values), or that do not open."""
    from ntrace.errors import NtraceError
    from ntrace.format.reader import open_trace

    try:
        with open_trace(trace) as tr, open_trace(reference) as ref:
            bad = []
            for p in tr.layouts:
                a, b = tr.read(p), ref.read(p)
                if len(a) > len(b) or not np_equal(a, b[: len(a)]):
                    bad.append(p)
            return bad
    except NtraceError as exc:
        return [f"unreadable: {exc}"]


def np_equal(a: Any, b: Any) -> bool:
    import numpy as np

    return a.shape == b.shape and bool(np.array_equal(a, b, equal_nan=a.dtype.kind == "f"))


def _mount_tmpfs(path: Path, size: int) -> bool:
    import subprocess

    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True)
    return done.returncode == 0


def _umount(path: Path) -> None:
    import subprocess

    subprocess.run(["umount", str(path)], capture_output=True)


def run_disk_full(sizes: list[int], steps: int = 1200, seed: int = 0, work: Path | None = None,
                  log: Any = None, simulate: bool = False) -> dict[str, Any]:
    """Record into a file system of each size (see the module docstring; ``simulate``: a
    byte-limited store even where a tmpfs could be mounted); a summary."""
    from ntrace.errors import NtraceError
    from ntrace.format.lock import lock_file
    from ntrace.format.validate import validate_trace

    ctx = context()
    tmp = Path(tempfile.mkdtemp(prefix="ntrace-full-", dir=work))
    rows: list[dict[str, Any]] = []
    simulated = simulate
    try:
        reference = tmp / "reference.zarr"
        ref = _finished(_start(ctx, reference, steps, seed, "sgd", tmp / "ref.json"),
                        tmp / "ref.json")
        if ref["exit"] != 0:
            raise RuntimeError(f"the reference recording failed: {ref['message']}")
        for i, size in enumerate(sizes):
            disk = tmp / f"disk{i}"
            disk.mkdir()
            mounted = not simulated and _mount_tmpfs(disk, size)
            simulated = simulated or not mounted
            try:
                out = disk / "full.zarr"
                result = _finished(_start(ctx, out, steps, seed, "sgd", tmp / f"r{i}.json",
                                          None if mounted else size), tmp / f"r{i}.json")
                row: dict[str, Any] = {"size": size, "exit": result["exit"],
                                       "message": result["message"], "trace": out.exists()}
                if out.exists():
                    try:
                        report = validate_trace(out)
                        attrs = report.attrs
                        row["status"] = attrs.status if attrs else None
                        row["reason"] = attrs.status_reason if attrs else None
                        row["committed"] = attrs.commit.rounds if attrs else None
                        row["other_problems"] = [r for r in report.reasons
                                                 if not r.startswith("run aborted")]
                    except NtraceError as exc:
                        row["status"], row["other_problems"] = None, [str(exc)]
                    row["unwritten"] = committed_unwritten(out, reference)
                row["lock_left"] = lock_file(out).exists()
                rows.append(row)
            finally:
                if mounted:
                    _umount(disk)
            if log is not None:
                print(f"size {size / 2**20:6.2f} MiB: exit {row['exit']:2d}, "
                      f"{'no trace' if not row['trace'] else row.get('status')}, committed "
                      f"{row.get('committed')}, unwritten rows in "
                      f"{len(row.get('unwritten', []))} arrays"
                      f"{'  ' + row['message'] if row['message'] else ''}", file=log, flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    bad = [r for r in rows if r.get("unwritten")]
    return {
        "sizes": len(rows),
        "simulated": simulated,
        "steps": steps,
        "filled": sum(r["exit"] != 0 for r in rows),
        "committed_unwritten": len(bad),
        "invalid": sum(bool(r.get("other_problems")) for r in rows),
        "aborted_with_reason": sum(r.get("status") == "aborted" and bool(r.get("reason"))
                                   for r in rows),
        "left_running": sum(r.get("status") == "running" for r in rows),
        "no_trace": sum(not r["trace"] for r in rows),
        "exit_codes": sorted({r["exit"] for r in rows}),
        "locks_left": sum(r["lock_left"] for r in rows),
        "results": rows,
    }


def run_concurrent(trials: int = 6, steps: int = 600, seed: int = 0, work: Path | None = None,
                   log: Any = None) -> dict[str, Any]:
    """Two recordings of one path with --overwrite (see the module docstring); a summary."""
    from ntrace.errors import NtraceError
    from ntrace.format.lock import lock_file
    from ntrace.format.validate import validate_trace

    ctx = context()
    rng = random.Random(seed)
    tmp = Path(tempfile.mkdtemp(prefix="ntrace-concurrent-", dir=work))
    rows: list[dict[str, Any]] = []
    try:
        for name in ("warm", "timed"):  # the first warms the fork server up, the second times A
            start = time.perf_counter()
            _finished(_start(ctx, tmp / f"{name}.zarr", steps, seed, "sgd",
                             tmp / f"{name}.json"), tmp / f"{name}.json")
        span = time.perf_counter() - start
        for i in range(trials):
            out = tmp / f"t{i}" / "same.zarr"
            out.parent.mkdir()
            # the first trial starts both together; the others start B at a random instant
            delay = 0.0 if i == 0 else rng.uniform(0.0, span)
            a = _start(ctx, out, steps, seed, "sgd", tmp / f"a{i}.json")
            time.sleep(delay)
            b = _start(ctx, out, max(1, steps // 2), seed, "adam", tmp / f"b{i}.json")
            ra, rb = _finished(a, tmp / f"a{i}.json"), _finished(b, tmp / f"b{i}.json")
            row: dict[str, Any] = {"delay": round(delay, 2), "a_exit": ra["exit"],
                                   "b_exit": rb["exit"], "a_message": ra["message"],
                                   "b_message": rb["message"]}
            try:
                report = validate_trace(out)
                attrs = report.attrs
                row["valid"] = report.ok
                row["problems"] = report.reasons
                row["winner"] = (attrs.run.get("optimizer_choice") if attrs else None)
            except NtraceError as exc:
                row["valid"], row["problems"], row["winner"] = False, [str(exc)], None
            row["failure"] = _concurrent_failure(row, ra, rb)
            row["lock_left"] = lock_file(out).exists()
            rows.append(row)
            if log is not None:
                refused = ra if ra["exit"] == 4 else rb
                print(f"trial {i}: B after {delay:5.2f} s: A exit {ra['exit']}, B exit "
                      f"{rb['exit']}, trace of {row['winner']} "
                      f"{'valid' if row['valid'] else 'INVALID'}"
                      f"{'; refused: ' + refused['message'] if refused['exit'] == 4 else ''}"
                      f"{'  FAILED: ' + row['failure'] if row['failure'] else ''}",
                      file=log, flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "trials": len(rows),
        "failures": sum(bool(r["failure"]) for r in rows),
        "failure_reasons": [f"trial {i}: {r['failure']}" for i, r in enumerate(rows)
                            if r["failure"]],
        "one_refused": sum(4 in (r["a_exit"], r["b_exit"]) for r in rows),
        "both_succeeded_one_after_the_other": sum(r["a_exit"] == r["b_exit"] == 0
                                                  for r in rows),
        "valid_traces": sum(bool(r["valid"]) for r in rows),
        "locks_left": sum(r["lock_left"] for r in rows),
        "results": rows,
    }


def _concurrent_failure(row: dict[str, Any], ra: dict[str, Any], rb: dict[str, Any]) -> str:
    """What is wrong with one concurrent trial, or ''."""
    if not row["valid"]:
        return f"the trace is not valid: {row['problems'][:1]}"
    codes = (ra["exit"], rb["exit"])
    if any(c not in (0, 4) for c in codes) or codes == (4, 4):
        return f"exit codes {codes}: expected one 0 and one 4, or two 0"
    refused = ra if ra["exit"] == 4 else rb if rb["exit"] == 4 else None
    winner = "sgd" if codes == (0, 4) else "adam"
    if refused is not None and f"process {(rb if refused is ra else ra)['pid']}" not in \
            refused["message"]:
        return f"the refusal does not name the process writing: {refused['message']}"
    if row["winner"] != winner:
        return f"the trace is {row['winner']}'s, but {winner} exited 0 last"
    return ""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=None,
                    help="killed recordings (default 50), or --concurrent trials (default 6)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=None,
                    help="rounds per recording (default 3000: several commit intervals; "
                         "--disk-full 1200; --concurrent 600, B records half)")
    ap.add_argument("--json", action="store_true", help="print the summary as JSON")
    ap.add_argument("--disk-full", action="store_true",
                    help="record into file systems too small for the run instead")
    ap.add_argument("--sizes", default="256k,1m,2m,3m,4m,6m,8m,10m,12m,16m,20m",
                    help="--disk-full: the file system sizes (k/m suffixes)")
    ap.add_argument("--concurrent", action="store_true",
                    help="record two runs to one path with --overwrite instead")
    args = ap.parse_args(argv)
    if args.disk_full:
        return _main_disk_full(args)
    if args.concurrent:
        return _main_concurrent(args)
    s = run_trials(args.trials or 50, args.seed, args.steps or 3000, log=sys.stderr)
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



def _size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    text = text.strip().lower()
    return int(float(text[:-1]) * units[text[-1]]) if text[-1] in units else int(text)


def _main_disk_full(args: argparse.Namespace) -> int:
    s = run_disk_full([_size(t) for t in args.sizes.split(",")], args.steps or 1200, args.seed,
                      log=sys.stderr)
    if args.json:
        print(json.dumps({k: v for k, v in s.items() if k != "results"}, indent=2))
    else:
        how = "simulated (a store refusing writes past the size)" if s["simulated"] else "tmpfs"
        print(f"disk full: {s['sizes']} sizes ({how}), {s['steps']} rounds each; "
              f"{s['filled']} ran out of space, exit codes {s['exit_codes']}")
        print(f"traces whose committed rows hold unwritten data: {s['committed_unwritten']}")
        print(f"traces with problems besides the abort: {s['invalid']}")
        print(f"aborted with the reason: {s['aborted_with_reason']}, left running at their "
              f"last commit: {s['left_running']}, no trace (creation failed): "
              f"{s['no_trace']}; lock files left: {s['locks_left']}")
    return 1 if s["committed_unwritten"] or s["invalid"] else 0


def _main_concurrent(args: argparse.Namespace) -> int:
    s = run_concurrent(args.trials or 6, args.steps or 600, args.seed, log=sys.stderr)
    if args.json:
        print(json.dumps({k: v for k, v in s.items() if k != "results"}, indent=2))
    else:
        print(f"concurrent overwrites: {s['trials']} trials; one refused with exit 4: "
              f"{s['one_refused']}, both succeeded one after the other: "
              f"{s['both_succeeded_one_after_the_other']}; valid traces: "
              f"{s['valid_traces']}; lock files left: {s['locks_left']}")
        print(f"failures: {s['failures']}")
        for reason in s["failure_reasons"]:
            print(f"  - {reason}")
    return 1 if s["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
