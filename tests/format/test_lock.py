"""One writer per trace (spec 'Single writer'): a second writer of a path in use is refused,
naming the first; a killed writer's lock is stale and taken over; the lock file lies outside
the trace and is removed on close. Writers here are separate processes, as in real use."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ntrace.errors import TraceExistsError
from ntrace.format.lock import OutputLock, lock_file
from ntrace.format.reader import open_trace
from ntrace.format.validate import validate_trace

from .test_roundtrip import make_writer, random_round

HELPERS = Path(__file__).resolve().parent / "test_roundtrip.py"

# A writer in another process: 'create' makes a trace (make_writer of test_roundtrip),
# 'lock' only takes the output's lock. It says 'ready' (or 'refused: <message>' and exits 4),
# then waits for a line on stdin before writing a few rounds and closing.
CHILD = r"""
import importlib.util, sys
from pathlib import Path
import numpy as np
from ntrace.errors import TraceExistsError
from ntrace.format.lock import OutputLock

mode, path, helpers = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
spec = importlib.util.spec_from_file_location("roundtrip_helpers", helpers)
rt = importlib.util.module_from_spec(spec)
spec.loader.exec_module(rt)
try:
    held = rt.make_writer(path, overwrite=True) if mode == "create" else OutputLock.acquire(path)
except TraceExistsError as exc:
    print("refused:", exc, flush=True)
    sys.exit(4)
print("ready", flush=True)
sys.stdin.readline()
if mode == "create":
    rng = np.random.default_rng(0)
    for n in range(5):
        held.write_round(*rt.random_round(n, rng))
    held.close()
else:
    held.release()
print("closed", flush=True)
"""


def start(mode: str, path: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.Popen([sys.executable, "-c", CHILD, mode, str(path), str(HELPERS)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)


def finish(child: subprocess.Popen[str]) -> str:
    out, _ = child.communicate("go\n", timeout=120)
    assert child.returncode == 0, out
    return out


def test_a_second_writer_of_a_path_in_use_is_refused_naming_the_first(tmp_path: Path) -> None:
    path = tmp_path / "same.zarr"
    make_writer(path).close()  # an old trace, which both want to overwrite
    child = start("create", path)
    try:
        assert child.stdout is not None and child.stdout.readline() == "ready\n"
        with pytest.raises(TraceExistsError) as info:
            make_writer(path, overwrite=True)
        message = str(info.value)
        assert f"process {child.pid} on host {socket.gethostname()!r}" in message
        assert "being written by another ntrace process" in message and "since" in message
        assert open_trace(path).attrs.status == "running"  # the first writer's, untouched
    finally:
        finish(child)
    report = validate_trace(path)
    assert report.attrs is not None and report.attrs.status == "complete"
    assert report.attrs.commit.rounds == 5
    assert not lock_file(path).exists()
    make_writer(path, overwrite=True).close()  # free again once the first has closed


def test_of_two_simultaneous_creations_one_wins_the_other_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "same.zarr"
    children = [start("create", path) for _ in range(2)]
    first = [c.stdout.readline() for c in children if c.stdout is not None]
    assert sorted(line.split(":")[0].strip() for line in first) == ["ready", "refused"], first
    assert "being written by another ntrace process" in "".join(first)
    for child, line in zip(children, first, strict=True):
        if line == "ready\n":
            finish(child)
        else:
            child.communicate(timeout=60)
            assert child.returncode == 4
    report = validate_trace(path)
    assert report.attrs is not None and report.attrs.status == "complete"
    assert report.attrs.commit.rounds == 5


def test_the_lock_of_a_killed_writer_is_stale(tmp_path: Path) -> None:
    """The kernel drops a dead process's lock: its file is left behind, and taken over."""
    path = tmp_path / "t.zarr"
    child = start("create", path)
    assert child.stdout is not None and child.stdout.readline() == "ready\n"
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert lock_file(path).exists()
    w = make_writer(path, overwrite=True)
    w.write_round(*random_round(0, np.random.default_rng(0)))
    w.close()
    assert validate_trace(path).attrs.commit.rounds == 1  # type: ignore[union-attr]
    assert not lock_file(path).exists()


def test_the_lock_file_is_outside_the_trace_and_gone_after_close(tmp_path: Path) -> None:
    path = tmp_path / "t.zarr"
    w = make_writer(path)
    assert lock_file(path) == tmp_path / ".t.zarr.lock" and lock_file(path).exists()
    with pytest.raises(TraceExistsError, match=f"process {os.getpid()}"):
        OutputLock.acquire(path)  # even from the same process
    w.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.zarr"]
    with OutputLock.acquire(path) as lock:
        assert lock.held
    assert not lock.held and not lock_file(path).exists()


def test_ntrace_record_refuses_a_trace_in_use_with_exit_4(tmp_path: Path) -> None:
    """The issue's repro in small: `ntrace record --overwrite` (and `--resume`) of a trace
    another process is writing exits 4 with one line naming that process."""
    from click.testing import CliRunner

    from ntrace.cli import main

    path = tmp_path / "same.zarr"
    tiny = ["--steps", "3", "--probe-size", "0"]
    assert CliRunner().invoke(main, ["record", "--out", str(path), *tiny]).exit_code == 0
    child = start("lock", path)
    try:
        assert child.stdout is not None and child.stdout.readline() == "ready\n"
        for args in (["--out", str(path), "--overwrite", *tiny],
                     ["--resume", str(path), "--steps", "6"]):
            result = CliRunner().invoke(main, ["record", *args])
            assert result.exit_code == 4, result.output
            line = result.output.strip()
            assert "\n" not in line and f"process {child.pid} on host" in line, line
    finally:
        finish(child)
    report = validate_trace(path)
    assert report.ok and report.attrs is not None and report.attrs.commit.rounds == 3


def test_a_planted_lock_file_is_never_followed_or_blocked_on(tmp_path: Path) -> None:
    """A link planted at the lock file's name would make the writer truncate its target; a
    FIFO would block it. Both are refused in one line, the target untouched."""
    from ntrace.errors import UsageError

    precious = tmp_path / "precious.txt"
    precious.write_text("keep")
    path = tmp_path / "t.zarr"
    lock_file(path).symlink_to(precious)
    with pytest.raises(UsageError, match="is a symbolic link; remove it"):
        make_writer(path)
    assert precious.read_text() == "keep" and not path.exists()
    lock_file(path).unlink()
    os.mkfifo(lock_file(path))
    with pytest.raises(UsageError, match="is not a regular file; remove it"):
        make_writer(path)
    assert not path.exists()


def test_a_lock_kept_by_a_child_of_a_dead_writer_says_so(tmp_path: Path) -> None:
    """A writer's child (say a data-loader worker) inherits the lock: when the writer dies
    first, the lock stays held and the message says the named process has ended."""
    import fcntl
    import json

    path = tmp_path / "t.zarr"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    fd = os.open(lock_file(path), os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # the inherited descriptor, held here
        os.write(fd, json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(),
                                 "started": "2026-01-01T00:00:00+00:00"}).encode())
        with pytest.raises(TraceExistsError, match=f"process {int(dead.stdout)} has ended"):
            make_writer(path)
    finally:
        os.close(fd)
    make_writer(path).close()  # released with its last descriptor


def test_a_refusal_racing_the_holders_name_waits_for_it(tmp_path: Path) -> None:
    """CI caught a refusal that came between the holder's flock and the write of its name
    ("process unknown"); the refusal now waits briefly for the name. The holder here locks,
    says so, and writes its name only 0.3 s later."""
    path = tmp_path / "t.zarr"
    holder = r"""
import fcntl, os, sys, time
from ntrace.format import lock
fd = os.open(lock.lock_file(sys.argv[1]), os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(0.3)
lock._write_holder(fd)
sys.stdin.readline()
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    child = subprocess.Popen([sys.executable, "-c", holder, str(path)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert child.stdout is not None and child.stdout.readline() == "locked\n"
        with pytest.raises(TraceExistsError) as info:
            OutputLock.acquire(path)
        assert f"process {child.pid} on host {socket.gethostname()!r}" in str(info.value)
    finally:
        child.communicate("go\n", timeout=60)
