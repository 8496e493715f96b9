"""Where a trace lives: a local directory, a ``.zip`` file, or an fsspec URL.

``open_store(location, mode)`` returns the zarr store behind a trace wrapped in a
:class:`~ntrace.format.safe.GuardedStore` (size limits, ``*.partial`` files hidden), and
``open_root`` its root group. Locations readers accept:

- a local trace directory (``run.zarr``), readable and, with ``mode='r+'``, writable, through
  a :class:`~ntrace.format.files.TraceDirStore` (regular files inside the directory only);
- a local ``.zip`` made by ``ntrace pack`` (zarr-python's ``ZipStore`` layout), read-only;
- an fsspec URL (``file://``, ``memory://``, ``s3://`` with s3fs installed, ...), read-only;
  a URL ending in ``.zip`` is read as a packed trace through fsspec.

Writers create traces only in local directories, atomically: the hierarchy is built in a
hidden staging directory next to the output and renamed into place (``staging_dir`` and
``publish``), so a path holds either no trace or one that opens; an old trace being
overwritten is first renamed aside, then deleted. Writers do this under the output's lock
(:mod:`ntrace.format.lock`), taken first.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import uuid
import zipfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import zarr
import zarr.storage
from zarr.core.sync import sync

from ntrace.errors import (
    InvalidTraceError,
    NtraceError,
    TraceExistsError,
    TraceNotFoundError,
    UsageError,
)
from ntrace.format import files, limits
from ntrace.format.metadata import ATTR_KEY
from ntrace.format.safe import PARTIAL, GuardedStore, SafeGroup, one_line, parse_document

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://|::")


def is_url(location: object) -> bool:
    """True for an fsspec URL such as ``s3://bucket/run.zarr`` (not for a local path)."""
    return isinstance(location, str) and bool(_URL.search(location))


def root_document(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The parsed root ``zarr.json`` of the local directory ``path``, read as every reader
    reads it (a regular file inside the directory, bounded); None when there is none or it
    cannot be read."""
    try:
        raw = files.read_file(path, limits.DOCUMENT, limits.MAX_ROOT_DOCUMENT_BYTES)
        return None if raw is None else parse_document(limits.DOCUMENT, raw)
    except (OSError, NtraceError):
        return None


def is_trace_dir(path: Path) -> bool:
    """True when ``path`` is a directory whose root ``zarr.json`` carries ntrace attributes."""
    doc = root_document(path)
    return doc is not None and isinstance(doc.get("attributes"), dict) and \
        ATTR_KEY in doc["attributes"]


# -- writing ---------------------------------------------------------------------------------
def prepare_output(path: str | os.PathLike[str], overwrite: bool) -> Path:
    """Make ``path`` ready for a new trace: refuse to clobber anything that is not a trace.

    An old trace is renamed aside (one atomic step) before it is deleted, so a process
    killed meanwhile leaves either the old trace or none at ``path``, never part of one.
    """
    p = output_path(path)
    if p.exists() or p.is_symlink():
        if not overwrite:
            raise TraceExistsError(
                f"{p} already exists; pass --overwrite (overwrite=True) to replace it, "
                "or choose another output path"
            )
        if p.is_dir() and not p.is_symlink() and (is_trace_dir(p) or not any(p.iterdir())):
            trash = _sibling(p, "deleting")
            os.rename(p, trash)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            raise UsageError(
                f"refusing to overwrite {p}: it is not an ntrace trace; remove it yourself "
                "or choose another output path"
            )
    return p


def output_path(path: str | os.PathLike[str]) -> Path:
    """``path`` as a place a trace can be written to: a local path in an existing, writable
    directory (what exists at ``path`` itself is :func:`prepare_output`'s business)."""
    if is_url(path):
        raise UsageError(f"cannot write a trace to {path}: traces are recorded to a local "
                         "directory; copy or pack it afterwards")
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.exists():
        raise UsageError(f"cannot write trace {p}: directory {parent} does not exist")
    if not parent.is_dir():
        raise UsageError(f"cannot write trace {p}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write trace {p}: directory {parent} is not writable")
    return p


def _sibling(p: Path, what: str) -> Path:
    return p.parent / f".{p.name}.{uuid.uuid4().hex[:12]}.{what}"


def staging_dir(final: str | os.PathLike[str]) -> Path:
    """A fresh hidden directory next to ``final`` in which to build a new trace."""
    return _sibling(Path(final), "creating")


def publish(staging: Path, final: str | os.PathLike[str]) -> Path:
    """Move a fully created trace from ``staging`` to ``final`` in one atomic rename."""
    p = Path(final)
    try:
        os.rename(staging, p)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if p.exists():
            raise TraceExistsError(f"{p} appeared while the trace was being created; "
                                   "choose another output path") from exc
        raise
    return p


# -- reading ---------------------------------------------------------------------------------
@dataclass
class Location:
    """An opened trace location. ``text`` is what the user gave (for messages); ``kind`` is
    ``dir``, ``zip`` or ``url``; ``path`` is the local path (for a URL, ``Path(text)``, which
    names nothing on this machine)."""

    text: str
    kind: str
    path: Path
    store: GuardedStore
    closers: tuple[Any, ...] = ()  # what else to close: the archive of a zip URL

    @property
    def local(self) -> bool:
        return self.kind != "url"

    def __str__(self) -> str:
        return self.text

    def close(self) -> None:
        for close in (self.store.close, *self.closers):
            try:
                close()
            except Exception:  # noqa: BLE001 - closing a read-only store never matters
                pass


def resolve_location(location: str | os.PathLike[str], mode: str = "r",
                     storage_options: dict[str, Any] | None = None) -> Location:
    """Find the trace at ``location`` and open its store (see the module docstring)."""
    if mode not in ("r", "r+"):
        raise UsageError(f"mode must be 'r' or 'r+', found {mode!r}")
    text = os.fspath(location)
    if is_url(text):
        parsed = urlparse(text)
        if parsed.scheme == "file" and "::" not in text:
            local = unquote(parsed.path)
            if parsed.netloc not in ("", "localhost"):
                raise UsageError(f"{text}: a file:// URL must name a local path")
            return _local(Path(local), text, mode)
        if mode != "r":
            raise UsageError(f"cannot open {text} for writing: only local trace directories "
                             "are written")
        return _remote(text, storage_options)
    return _local(Path(text), text, mode)


def open_store(location: str | os.PathLike[str], mode: str = "r",
               storage_options: dict[str, Any] | None = None) -> GuardedStore:
    """The guarded zarr store of the trace at ``location`` (a directory, ``.zip`` or URL)."""
    return resolve_location(location, mode, storage_options).store


def _local(p: Path, text: str, mode: str) -> Location:
    if not p.exists():
        raise TraceNotFoundError(f"no trace at {text}: the path does not exist")
    if p.is_file():
        if not zipfile.is_zipfile(p):
            raise TraceNotFoundError(f"no trace at {text}: it is a file but not a zip archive "
                                     "(expected a trace directory or a .zip from ntrace pack)")
        if mode != "r":
            raise UsageError(f"cannot open {text} for writing: a packed (.zip) trace is "
                             "read-only")
        try:
            with zipfile.ZipFile(p) as zf:
                limits.check_zip_members(zf.infolist(), text)
                names = set(zf.namelist())
        except NtraceError:
            raise
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, struct.error,
                NotImplementedError) as exc:
            raise InvalidTraceError(f"{text}: not a readable zip archive "
                                    f"({one_line(exc)})") from exc
        if limits.DOCUMENT not in names:
            raise TraceNotFoundError(f"no trace in {text}: the zip holds no zarr.json at its "
                                     "root (make packed traces with `ntrace pack`)")
        zipped = sync(zarr.storage.ZipStore.open(p, mode="r"))
        return Location(text, "zip", p, GuardedStore(zipped, text))
    fd = files.open_file(p, limits.DOCUMENT)  # refuses a link, FIFO or device
    if fd is None:
        raise TraceNotFoundError(
            f"no trace at {text}: it holds no zarr.json (is it a Zarr v3 store written by "
            "ntrace?)"
        )
    os.close(fd)
    store = files.TraceDirStore(p, read_only=(mode == "r"))
    return Location(text, "dir", p, GuardedStore(store, text))


def _zip_store(url: str, storage_options: dict[str, Any] | None) -> tuple[Any, Any]:
    """A read-only store over the zip archive at ``url``: fsspec's ``zip::`` filesystem
    behind zarr's public ``FsspecStore``, after the member checks of ``ntrace pack`` archives."""
    import fsspec
    from fsspec.implementations.asyn_wrapper import AsyncFileSystemWrapper

    fs = fsspec.filesystem("zip", fo=url, target_options=storage_options or {})
    try:
        limits.check_zip_members(fs.zip.infolist(), url)
        names = set(fs.zip.namelist())
        if limits.DOCUMENT not in names:
            raise TraceNotFoundError(f"no trace in {url}: the zip holds no zarr.json at its "
                                     "root (make packed traces with `ntrace pack`)")
    except BaseException:
        fs.close()
        raise
    store = _ArchiveStore(AsyncFileSystemWrapper(fs, asynchronous=True), read_only=True,
                          path="")
    return store, fs.close


class _ArchiveStore(zarr.storage.FsspecStore):
    """An ``FsspecStore`` at the root of an archive filesystem (``path=''``), whose
    ``list_dir`` zarr would ask for ``/<prefix>`` (a path the zip filesystem lists as its
    own name)."""

    async def list_dir(self, prefix: str) -> AsyncIterator[str]:
        prefix = prefix.strip("/")
        try:
            found = await self.fs._ls(prefix, detail=False)
        except FileNotFoundError:
            return
        for name in found:
            name = name.strip("/")
            yield name[len(prefix) + 1:] if prefix and name.startswith(prefix + "/") else name



def _remote(url: str, storage_options: dict[str, Any] | None) -> Location:
    closers: list[Any] = []
    try:
        return _open_remote(url, storage_options, closers)
    except BaseException:
        for close in closers:
            close()
        raise


def _open_remote(url: str, storage_options: dict[str, Any] | None,
                 closers: list[Any]) -> Location:
    try:
        import fsspec  # noqa: F401 - present, or the one-line error below
    except ImportError as exc:
        raise UsageError(f"reading {url} needs fsspec: pip install fsspec") from exc
    try:
        if url.rstrip("/").endswith(".zip"):
            store, closer = _zip_store(url, storage_options)
            closers.append(closer)
            kind = "url"
        else:
            store = zarr.storage.FsspecStore.from_url(url, storage_options=storage_options,
                                                      read_only=True)
            kind = "url"
        guarded = GuardedStore(store, url)
        if sync(guarded.exists(limits.DOCUMENT)) is False:
            raise TraceNotFoundError(f"no trace at {url}: it holds no zarr.json")
    except NtraceError:
        raise
    except ImportError as exc:
        raise UsageError(f"cannot read {url}: {one_line(exc)} (install the fsspec "
                         "implementation for this protocol, e.g. pip install s3fs)") from exc
    except FileNotFoundError as exc:
        raise TraceNotFoundError(f"no trace at {url}: {one_line(exc)}") from exc
    except (zipfile.BadZipFile, EOFError, struct.error, NotImplementedError) as exc:
        raise InvalidTraceError(f"{url}: not a readable zip archive ({one_line(exc)})") from exc
    except ValueError as exc:
        raise UsageError(f"cannot read {url}: {one_line(exc)}") from exc
    except OSError as exc:
        raise TraceNotFoundError(f"cannot read {url}: {one_line(exc)}") from exc
    return Location(url, kind, Path(url), guarded, tuple(closers))


def open_location(location: str | os.PathLike[str], mode: str = "r",
                  storage_options: dict[str, Any] | None = None) -> tuple[Location, SafeGroup]:
    """Open the root group of the trace at ``location``; see :func:`resolve_location`."""
    loc = resolve_location(location, mode, storage_options)
    try:
        # spec §2: readers never depend on consolidated metadata (it may be stale)
        group = zarr.open_group(store=loc.store, mode="r" if mode == "r" else "r+",
                                zarr_format=3, use_consolidated=False)
    except NtraceError:
        loc.close()
        raise
    except Exception as exc:  # zarr raises several kinds for unreadable metadata
        loc.close()
        raise InvalidTraceError(f"{loc}: the root group cannot be opened "
                                f"({one_line(exc)})") from exc
    return loc, SafeGroup.wrap(group)


def open_root(path: str | os.PathLike[str], mode: str = "r") -> Any:
    """Open the root group of an existing trace; ``mode`` is ``'r'`` or ``'r+'``."""
    return open_location(path, mode)[1]


def stored_bytes(store: Any, prefix: str = "") -> int:
    """Bytes stored under ``prefix`` ('' for the whole trace), ``*.partial`` files excluded:
    file sizes for a directory, compressed member sizes for a zip, object sizes for a URL."""
    prefix = prefix.strip("/")
    return sum(size for key, size in stored_sizes(store, prefix).items()
               if not prefix or key == prefix or key.startswith(prefix + "/"))


def _zip_members(store: Any) -> list[zipfile.ZipInfo] | None:
    """The members of the zip archive behind ``store`` (None when it is none): the file of a
    local ``ZipStore``, or the archive of fsspec's ``zip`` filesystem."""
    if isinstance(store, zarr.storage.ZipStore):
        with zipfile.ZipFile(store.path) as zf:
            return zf.infolist()
    fs = getattr(store, "fs", None)
    fs = getattr(fs, "sync_fs", fs)  # an AsyncFileSystemWrapper's wrapped filesystem
    archive = getattr(fs, "zip", None)
    return archive.infolist() if isinstance(archive, zipfile.ZipFile) else None


def stored_sizes(store: Any, prefix: str = "") -> dict[str, int]:
    """Stored bytes of every key under ``prefix`` in one listing, ``*.partial`` files
    excluded (see :func:`stored_bytes`); a directory holding a link, FIFO or device is
    refused."""
    inner = store.inner if isinstance(store, GuardedStore) else store
    prefix = prefix.strip("/")
    if isinstance(inner, files.TraceDirStore):
        return {k: n for k, n in files.files(inner.root, prefix) if not k.endswith(PARTIAL)}
    members = _zip_members(inner)
    if members is not None:
        return {i.filename: i.compress_size for i in members
                if i.filename.startswith(prefix) and not i.filename.endswith(PARTIAL)}

    async def sizes() -> dict[str, int]:
        found = {}
        async for key in store.list_prefix(prefix):
            if not key.endswith(PARTIAL):
                found[key] = await inner.getsize(key)
        return found

    return dict(sync(sizes()))
