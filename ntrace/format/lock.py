"""One writer per trace: an advisory lock on the output path (spec 'Single writer').

A process that creates, overwrites or resumes the trace at ``run.zarr`` first takes an
exclusive ``flock`` on the file ``.run.zarr.lock`` next to it, and holds it until the trace is
closed; a second writer of the same path is refused (:class:`TraceExistsError`, exit 4) with
the holder's process id, host and start time, which the holder writes into the file as JSON.
The kernel drops the lock when its holder dies, however it dies, so a lock file left by a
killed process is stale by construction and the next writer simply takes it. The holder
deletes the file when it lets go (still holding the lock; a writer that locked the deleted
file sees that the path now names another file and starts again).

The lock file lies outside the trace and is not part of the format. The lock is advisory: it
orders ntrace writers (on one machine, or on file systems whose ``flock`` spans machines), not
other programs. Where ``fcntl`` does not exist (Windows) or the file system cannot lock, it is a
no-op.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import json
import os
import socket
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ntrace.errors import TraceExistsError, UsageError, WriterError
from ntrace.format.store import output_path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

MAX_HOLDER_BYTES = 4096
HOLDER_WAIT_S = 2.0  # how long a refusal waits for a new holder to write its name
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def lock_file(path: str | os.PathLike[str]) -> Path:
    """The lock file of the trace at ``path``: ``.<name>.lock`` in the same directory."""
    p = Path(os.path.abspath(path))
    return p.parent / f".{p.name}.lock"


class OutputLock:
    """An exclusive lock on one output path, held from :meth:`acquire` to :meth:`release`."""

    def __init__(self, path: Path, fd: int | None) -> None:
        self.path = path  # the lock file
        self._fd = fd
        self._pid = os.getpid()  # a forked child's copy never releases its parent's lock

    @classmethod
    def acquire(cls, path: str | os.PathLike[str]) -> OutputLock:
        """Lock the output path ``path`` or raise :class:`TraceExistsError` naming the
        process that holds it. ``path`` must be writable (see ``store.output_path``)."""
        target = output_path(path)
        lf = lock_file(target)
        if fcntl is None:  # pragma: no cover - Windows
            return cls(lf, None)
        while True:
            try:  # never through a link, never blocking on a FIFO planted there
                fd = os.open(lf, os.O_RDWR | os.O_CREAT | _NOFOLLOW | os.O_NONBLOCK, 0o644)
            except OSError as exc:  # where no lock file can be made, no trace can either
                if exc.errno == errno.ELOOP:
                    raise UsageError(f"cannot write trace {target}: its lock file {lf} is a "
                                     "symbolic link; remove it") from exc
                raise WriterError(f"cannot create trace {target}: cannot create its lock "
                                  f"file {lf.name} ({exc.strerror or exc})") from exc
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                raise UsageError(f"cannot write trace {target}: its lock file {lf} is not a "
                                 "regular file; remove it")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise TraceExistsError(
                    f"{target} is being written by another ntrace process ({holder}); wait "
                    "for it to finish or stop it, or choose another output path") from None
            except OSError:  # a file system without locks: write unserialised, as before
                break
            try:
                same = os.stat(lf).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the previous holder deleted the file we locked: start again
        _write_holder(fd)
        return cls(lf, fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Delete the lock file and let go (idempotent)."""
        if self._fd is None or os.getpid() != self._pid:
            return
        fd, self._fd = self._fd, None
        try:
            os.unlink(self.path)  # while still holding it, so no one else's file is removed
        except OSError:
            pass
        os.close(fd)

    def __enter__(self) -> OutputLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:  # noqa: BLE001 - never raise from a finaliser
            pass


@contextlib.contextmanager
def holding(path: str | os.PathLike[str], lock: OutputLock | None
            ) -> Iterator[OutputLock | None]:
    """Hold ``lock`` (the caller's), or a lock of ``path`` taken here and yielded, which is
    released if the body fails and otherwise handed on (to the writer the body made)."""
    own = OutputLock.acquire(path) if lock is None else None
    try:
        yield own
    except BaseException:
        if own is not None:
            own.release()
        raise


def _write_holder(fd: int) -> None:
    """Record who holds the lock (best effort: the lock works without it, e.g. on a full
    disk)."""
    info = {"pid": os.getpid(), "host": socket.gethostname(),
            "started": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")}
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
    except OSError:
        pass


def _read_holder(fd: int, wait: float = HOLDER_WAIT_S) -> str:
    """Who holds the lock, in words, from what the holder wrote in the file. A holder writes
    its name just after it takes the lock, so a refusal racing that write waits up to
    ``wait`` seconds for the name to appear."""
    deadline = time.monotonic() + wait
    while True:
        info = _holder_info(fd)
        pid, host, started = info.get("pid"), info.get("host"), info.get("started")
        if isinstance(pid, int) and isinstance(host, str):
            break
        if time.monotonic() >= deadline:
            return "process unknown: it has not written its name into the lock file yet"
        time.sleep(0.01)
    words = f"process {pid} on host {host!r}"
    if isinstance(started, str) and len(started) <= 40 and started.isprintable():
        words += f", since {started}"
    if host == socket.gethostname() and not _alive(pid):
        words += (f"; process {pid} has ended, so a process it started (which inherited the "
                  "lock) still runs")
    return words


def _holder_info(fd: int) -> dict[str, Any]:
    try:
        info: Any = json.loads(os.pread(fd, MAX_HOLDER_BYTES, 0) or b"{}")
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True
