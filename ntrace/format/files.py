"""The files of a local trace directory: regular files inside its root, read with bounds.

A trace directory may come from someone else, so a key never leads out of it and never to
something that is not a file. Every component of a key below the root is opened with
``O_NOFOLLOW`` relative to its parent directory (a symbolic link anywhere on the way is
refused, and nothing can swap one in between a check and the read); the file is opened
non-blocking and checked with ``fstat`` before a byte is read, so a FIFO, device or socket is
refused rather than waited on or read without end. Reads stop at a limit counted in bytes
actually read, never trusting ``st_size`` (0 for ``/dev/zero``). The root itself is the path
the user named and may be a link. ``TraceDirStore`` is the zarr store every reader uses on a
directory; ``check_tree`` lets a writer refuse a trace it would append to through a link.
"""

from __future__ import annotations

import os
import stat
from collections.abc import AsyncIterator, Iterable, Iterator
from pathlib import Path
from typing import Any

from zarr.abc.store import OffsetByteRequest, RangeByteRequest, SuffixByteRequest
from zarr.core.buffer import default_buffer_prototype
from zarr.storage import LocalStore

from ntrace.errors import InvalidTraceError

_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_DIR = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _CLOEXEC
_FILE = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | _NOFOLLOW | _CLOEXEC
_AT = {os.open, os.stat} <= os.supports_dir_fd and bool(_NOFOLLOW)  # race-free walk (POSIX)
READ_STEP = 1 << 16  # read past st_size by this much to find the end without trusting it


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def refused(key: str, mode: int) -> InvalidTraceError:
    """The one-line error for a key that is a link, FIFO, device or socket."""
    return InvalidTraceError(f"{key}: {_kind(mode)} inside the trace; ntrace reads only "
                             "regular files inside a trace directory (spec/security.md)")


def _parts(key: str) -> list[str]:
    parts = key.split("/")
    if not key or any(p in ("", ".", "..") for p in parts) or "\x00" in key:
        raise InvalidTraceError(f"{key!r}: not a plain key inside the trace; refusing it")
    return parts


def _open_at(dfd: int, name: str, directory: bool, key: str) -> int | None:
    """``name`` in the directory ``dfd``: a directory (``directory``) or a regular file,
    looked at with ``lstat`` before it is opened (opening a device may act on it) and opened
    without following a link. None when absent or of the other kind (zarr's missing key)."""
    try:
        mode = os.lstat(name, dir_fd=dfd).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return None
    if stat.S_ISDIR(mode) or stat.S_ISREG(mode):
        if stat.S_ISDIR(mode) != directory:
            return None
    else:
        raise refused(key, mode)
    try:
        fd = os.open(name, (_DIR if directory else _FILE) | _NOFOLLOW, dir_fd=dfd)
    except FileNotFoundError:
        return None
    except OSError as exc:  # replaced since the lstat: by a link, or a FIFO (ENXIO, ...)
        raise InvalidTraceError(f"{key}: changed while being opened ({exc.strerror}); "
                                "refusing to read it") from None
    mode = os.fstat(fd).st_mode
    if (stat.S_ISDIR(mode) if directory else stat.S_ISREG(mode)):
        return fd
    os.close(fd)
    raise refused(key, mode)


def open_file(root: str | os.PathLike[str], key: str) -> int | None:
    """A read-only descriptor of the regular file at ``key`` below ``root``; None when there
    is none (or a directory is there, as zarr expects). Refuses a link on the way, a FIFO,
    device or socket with :class:`InvalidTraceError`."""
    parts = _parts(key)
    if not _AT:
        return _open_checked(root, parts, key)
    try:
        dfd = os.open(root, _DIR)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        for i, part in enumerate(parts[:-1]):
            nfd = _open_at(dfd, part, True, "/".join(parts[: i + 1]))
            if nfd is None:
                return None
            os.close(dfd)
            dfd = nfd
        return _open_at(dfd, parts[-1], False, key)
    finally:
        os.close(dfd)


def _open_checked(root: str | os.PathLike[str], parts: list[str], key: str) -> int | None:
    """``open_file`` where ``openat`` is missing: each component checked with ``lstat``."""
    path = Path(root)
    for i, part in enumerate(parts):
        path = path / part
        try:
            mode = path.lstat().st_mode
        except (FileNotFoundError, NotADirectoryError):
            return None
        last = i == len(parts) - 1
        if stat.S_ISDIR(mode):
            if last:
                return None
            continue
        if not (last and stat.S_ISREG(mode)):
            raise refused("/".join(parts[: i + 1]), mode)
    fd = os.open(path, _FILE)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise refused(key, os.lstat(path).st_mode)
    return fd


def read_file(root: str | os.PathLike[str], key: str, limit: int,
              byte_range: Any = None) -> bytes | None:
    """The bytes of ``key`` (of ``byte_range`` in it), at most ``limit + 1`` of them: the
    caller refuses a result longer than ``limit``. None when there is no such file."""
    fd = open_file(root, key)
    if fd is None:
        return None
    try:
        size = os.fstat(fd).st_size
        start, want = 0, limit + 1
        if isinstance(byte_range, RangeByteRequest):
            start, want = byte_range.start, min(want, max(byte_range.end - byte_range.start, 0))
        elif isinstance(byte_range, OffsetByteRequest):
            start = byte_range.offset
        elif isinstance(byte_range, SuffixByteRequest):
            start = max(0, size - byte_range.suffix)
        elif byte_range is not None:
            raise TypeError(f"unexpected byte range {byte_range!r}")
        parts, got = [], 0
        while got < want:
            block = os.pread(fd, min(want - got, max(size - start - got, 0) + READ_STEP),
                             start + got)
            if not block:
                break
            parts.append(block)
            got += len(block)
        return parts[0] if len(parts) == 1 else b"".join(parts)
    finally:
        os.close(fd)


def _entries(root: Path, prefix: str) -> Iterator[tuple[str, os.DirEntry[str]]]:
    """Every entry below ``prefix`` as (key, entry), not descending into links."""
    stack = [prefix.strip("/")]
    while stack:
        rel = stack.pop()
        where = root / rel if rel else root
        if rel:
            try:
                mode = os.lstat(where).st_mode
            except (FileNotFoundError, NotADirectoryError):
                continue
            if not stat.S_ISDIR(mode):
                raise refused(rel, mode)
        found = _listing(where)
        if found is None:
            continue
        for entry in found:
            key = f"{rel}/{entry.name}" if rel else entry.name
            yield key, entry
            if entry.is_dir(follow_symlinks=False):
                stack.append(key)


def _listing(path: Path) -> list[os.DirEntry[str]] | None:
    """The entries of directory ``path`` sorted by name; None when it is gone or no
    directory (a live trace's files come and go)."""
    try:
        with os.scandir(path) as it:
            return sorted(it, key=lambda e: e.name)
    except (FileNotFoundError, NotADirectoryError):
        return None


def _mode(entry: os.DirEntry[str]) -> int | None:
    try:
        return entry.stat(follow_symlinks=False).st_mode
    except FileNotFoundError:
        return None  # removed meanwhile (a trace being written)


def files(root: str | os.PathLike[str], prefix: str = "") -> Iterator[tuple[str, int]]:
    """(key, size) of every regular file below ``prefix``; refuses a link, FIFO, device or
    socket anywhere there (``InvalidTraceError``)."""
    for key, entry in _entries(Path(root), prefix):
        mode = _mode(entry)
        if mode is None or stat.S_ISDIR(mode):
            continue
        if not stat.S_ISREG(mode):
            raise refused(key, mode)
        try:
            yield key, entry.stat(follow_symlinks=False).st_size
        except FileNotFoundError:
            continue


def check_tree(root: str | os.PathLike[str]) -> None:
    """Refuse a trace directory holding a link, FIFO, device or socket anywhere below its
    root (a writer appending to it would follow the link out of the trace)."""
    for _ in files(root):
        pass


def check_parents(root: str | os.PathLike[str], key: str) -> None:
    """Refuse writing ``key`` when an existing directory on its way is a link (or not a
    directory): the write would land outside the trace."""
    path = Path(root)
    parts = _parts(key)
    for i, part in enumerate(parts):
        path = path / part
        try:
            mode = path.lstat().st_mode
        except FileNotFoundError:
            return
        last = i == len(parts) - 1
        if not (stat.S_ISDIR(mode) or (last and stat.S_ISREG(mode))):
            raise refused("/".join(parts[: i + 1]), mode)


class TraceDirStore(LocalStore):
    """A ``LocalStore`` that serves only regular files inside its root (see the module
    docstring). Unranged reads are bounded by ``max_object`` bytes."""

    def __init__(self, root: Path | str, *, read_only: bool = False,
                 max_object: int | None = None) -> None:
        super().__init__(root, read_only=read_only)
        from ntrace.format.limits import MAX_STORED_OBJECT_BYTES

        self.max_object = MAX_STORED_OBJECT_BYTES if max_object is None else max_object

    def with_read_only(self, read_only: bool = False) -> TraceDirStore:
        return type(self)(self.root, read_only=read_only, max_object=self.max_object)

    def read(self, key: str, limit: int, byte_range: Any = None) -> bytes | None:
        return read_file(self.root, key, limit, byte_range)

    async def get(self, key: str, prototype: Any = None, byte_range: Any = None) -> Any:
        import asyncio

        data = await asyncio.to_thread(self.read, key, self.max_object, byte_range)
        if data is None:
            return None
        if len(data) > self.max_object:
            raise InvalidTraceError(f"{key}: larger than the {self.max_object >> 20} MiB ntrace "
                                    "reads for one object; refusing to read it "
                                    "(spec/security.md)")
        return (prototype or default_buffer_prototype()).buffer.from_bytes(data)

    async def get_partial_values(self, prototype: Any,
                                 key_ranges: Iterable[tuple[str, Any]]) -> list[Any]:
        return [await self.get(k, prototype, r) for k, r in key_ranges]

    async def exists(self, key: str) -> bool:
        fd = open_file(self.root, key)
        if fd is None:
            return False
        os.close(fd)
        return True

    async def getsize(self, key: str) -> int:
        fd = open_file(self.root, key)
        if fd is None:
            raise FileNotFoundError(key)
        try:
            return os.fstat(fd).st_size
        finally:
            os.close(fd)

    async def list(self) -> AsyncIterator[str]:
        for key, _ in files(self.root):
            yield key

    async def list_prefix(self, prefix: str) -> AsyncIterator[str]:
        for key, _ in files(self.root, prefix):
            yield key

    async def list_dir(self, prefix: str) -> AsyncIterator[str]:
        found = _listing(self.root / prefix)
        if found is None:
            return
        for entry in found:
            mode = _mode(entry)
            if mode is None:
                continue
            if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
                raise refused(f"{prefix.strip('/')}/{entry.name}".lstrip("/"), mode)
            yield entry.name

    async def set(self, key: str, value: Any) -> None:
        check_parents(self.root, key)
        await super().set(key, value)

    async def set_if_not_exists(self, key: str, value: Any) -> None:
        check_parents(self.root, key)
        await super().set_if_not_exists(key, value)
