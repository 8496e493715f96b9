"""Reading an untrusted store: every failure becomes one :class:`InvalidTraceError` line.

``GuardedStore`` wraps the zarr store a reader uses (for a directory, a
:class:`~ntrace.format.files.TraceDirStore`, which serves only regular files inside the
trace). It hides ``*.partial`` files (temporary files of a writer that died, spec 'Commit
protocol'), reads every object with a bounded ranged request (the bound counts bytes read),
parses each ``zarr.json`` before zarr does (refusing oversized, garbled or too deeply nested
documents, and arrays whose shapes or chunks exceed :mod:`ntrace.format.limits`), checks the
declared size of each chunk before a codec allocates it, and refuses a chunk missing inside
the rows a reader was told must be stored (``expect_rows``) instead of letting zarr return fill
values. ``SafeGroup`` is the zarr group readers navigate: a member whose metadata zarr cannot
parse raises an ``InvalidTraceError`` naming its ``zarr.json`` instead of whatever zarr raised.
``unreadable`` does the same for chunk data; ``cancel_on_error`` cancels the chunk reads a
failed read left pending, and ``one_line`` never echoes stored bytes.
"""

from __future__ import annotations

import asyncio
import json
import re
import weakref
import zipfile
import zlib
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import numpy as np
import zarr
from zarr.abc.store import RangeByteRequest
from zarr.core.buffer import default_buffer_prototype
from zarr.storage import WrapperStore

from ntrace.errors import InvalidTraceError, NtraceError
from ntrace.format import limits
from ntrace.format.sizes import human_bytes

PARTIAL = ".partial"
MANIFEST = "ntrace-manifest.json"  # written by ``ntrace pack``; not a node of the hierarchy
MESSAGE_LIMIT = 300


_BYTES = re.compile(r"""\bb(?:'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")""")


def one_line(exc: BaseException) -> str:
    """``Type: message`` on one line, at most ``MESSAGE_LIMIT`` characters; ``bytes``
    literals (a codec quoting stored bytes, e.g. checksums) are elided, so that no message
    echoes what a file holds."""
    text = " ".join(_BYTES.sub("b'…'", str(exc)).split())
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= MESSAGE_LIMIT else text[: MESSAGE_LIMIT - 3] + "..."


def document_key(path: str) -> str:
    """The key of the metadata document of the node at ``path`` ('' is the root)."""
    path = path.strip("/")
    return f"{path}/{limits.DOCUMENT}" if path else limits.DOCUMENT


def parse_document(key: str, raw: bytes) -> dict[str, Any]:
    """Parse a metadata document, refusing what a reader must not trust."""
    if len(raw) > limits.document_limit(key):
        raise InvalidTraceError(f"{key}: metadata document larger than "
                                f"{human_bytes(limits.document_limit(key))}; refusing to read it "
                                "(spec/security.md)")
    try:
        doc = json.loads(raw)
    except RecursionError:
        raise InvalidTraceError(f"{key}: metadata document nested too deeply") from None
    except ValueError as exc:  # includes UnicodeDecodeError
        raise InvalidTraceError(f"{key}: not a valid JSON document ({one_line(exc)})") from None
    if not isinstance(doc, dict):
        raise InvalidTraceError(f"{key}: expected a JSON object, found {type(doc).__name__}")
    if limits.json_depth(doc) > limits.MAX_JSON_DEPTH:
        raise InvalidTraceError(f"{key}: metadata document nested deeper than "
                                f"{limits.MAX_JSON_DEPTH} levels")
    return doc


def _escapes(key: str) -> bool:
    """True for a key that would name something outside the store's root."""
    return key.startswith("/") or ".." in key.split("/") or "\\" in key or "\x00" in key


class GuardedStore(WrapperStore[Any]):
    """A store wrapper that enforces :mod:`ntrace.format.limits` on everything read.

    ``documents`` keeps the last parsed version of each metadata document served, so checks
    on the raw documents see what zarr saw without reading them again.
    """

    def __init__(self, store: Any, where: str = "") -> None:
        super().__init__(store)
        self.inner = store  # the wrapped store (zarr keeps its own reference privately)
        self.where = where or str(store)
        self.documents: dict[str, dict[str, Any]] = {}
        self._arrays: dict[str, limits.ChunkSpec] = {}
        self._expected: dict[str, int] = {}

    def _with_store(self, store: Any) -> GuardedStore:
        new = type(self)(store, self.where)
        new.documents, new._arrays, new._expected = self.documents, self._arrays, self._expected
        return new

    def __str__(self) -> str:
        return str(self.inner)

    def __repr__(self) -> str:
        return f"GuardedStore({self.inner!r})"

    async def get(self, key: str, prototype: Any, byte_range: Any = None) -> Any:
        if key.endswith(PARTIAL):
            return None
        if _escapes(key):
            raise InvalidTraceError(f"{key!r}: a key that leaves the trace; refusing to read it")
        name = key.rsplit("/", 1)[-1]
        if name == limits.DOCUMENT and byte_range is None:
            return await self._get_document(key, prototype)
        if byte_range is not None:
            buf = await self._inner_get(key, prototype, byte_range)
        else:
            buf = await self._bounded_get(key, prototype, limits.MAX_STORED_OBJECT_BYTES,
                                          "stored object")
        if buf is None:
            self._check_missing(key)
            return None
        if byte_range is None:
            spec = self._spec_for(key)
            if spec is not None:
                view = memoryview(np.ascontiguousarray(buf.as_numpy_array()).data)  # no copy
                limits.check_chunk(key, view, spec)
        return buf

    async def _get_document(self, key: str, prototype: Any) -> Any:
        buf = await self._bounded_get(key, prototype, limits.document_limit(key),
                                      "metadata document")
        if buf is None:
            return None
        doc = parse_document(key, buf.to_bytes())
        if doc.get("node_type") == "array":
            spec = limits.check_array_document(key, doc)
            prefix = key[: -len(limits.DOCUMENT)].rstrip("/")
            if spec is not None:
                self._arrays[prefix] = spec
            else:
                self._arrays.pop(prefix, None)
        self.documents[key] = doc
        return buf

    async def _bounded_get(self, key: str, prototype: Any, limit: int, what: str) -> Any:
        """``key``, refused if larger than ``limit``: read with a ranged request of
        ``limit + 1`` bytes, so the bound counts bytes actually read (a local directory's
        store reads at most what the file holds, never allocating the whole range)."""
        buf = await self._inner_get(key, prototype, RangeByteRequest(0, limit + 1))
        if buf is not None and len(buf) > limit:
            raise InvalidTraceError(f"{key}: {what} larger than {human_bytes(limit)}; refusing to "
                                    "read it (spec/security.md)")
        return buf

    async def _inner_get(self, key: str, prototype: Any, byte_range: Any) -> Any:
        try:
            return await self.inner.get(key, prototype, byte_range)
        except NtraceError:
            raise
        except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError,
                ValueError) as exc:  # a damaged zip member (bad CRC, header, method, ...)
            raise InvalidTraceError(f"{key}: unreadable ({one_line(exc)})") from exc

    def expect_rows(self, path: str, rows: int) -> None:
        """Every chunk of the array at ``path`` holding one of its first ``rows`` rows must
        be stored: a missing one is an error, not fill values (spec 'Commit protocol')."""
        self._expected[path.strip("/")] = rows

    def _check_missing(self, key: str) -> None:
        path, spec = self._array_of(key)
        rows = self._expected.get(path) if path is not None else None
        if spec is None or rows is None:
            return
        index = spec.first_index(key[len(path) + 1:])
        if index is not None and index * spec.rows < rows:
            raise InvalidTraceError(f"{key}: chunk missing inside the {rows} committed rows of "
                                    f"{path} (a reader would see fill values; spec 'Commit "
                                    "protocol')")

    def _array_of(self, key: str) -> tuple[str | None, limits.ChunkSpec | None]:
        """The array a chunk key belongs to, and its chunk spec."""
        parts = key.split("/")
        for n in range(len(parts) - 1, 0, -1):
            path = "/".join(parts[:n])
            spec = self._arrays.get(path)
            if spec is not None:
                return path, spec
        return None, None

    def _spec_for(self, key: str) -> limits.ChunkSpec | None:
        return self._array_of(key)[1]

    async def document(self, path: str, fresh: bool = False) -> dict[str, Any] | None:
        """The parsed metadata document of the node at ``path`` (None if it has none): the
        version zarr last read unless ``fresh``."""
        key = document_key(path)
        if not fresh and key in self.documents:
            return self.documents[key]
        if await self.get(key, default_buffer_prototype()) is None:
            return None
        return self.documents[key]

    async def get_partial_values(self, prototype: Any, key_ranges: Any) -> list[Any]:
        ranges = [(k, r) for k, r in key_ranges]
        return [await self.get(k, prototype, r) for k, r in ranges]

    async def _get_many(self, requests: Any) -> Any:
        for key, prototype, byte_range in requests:
            yield key, await self.get(key, prototype, byte_range)

    async def exists(self, key: str) -> bool:
        return not key.endswith(PARTIAL) and not _escapes(key) and await self.inner.exists(key)

    async def list(self) -> AsyncIterator[str]:  # type: ignore[override]
        async for key in self.inner.list():
            if not key.endswith(PARTIAL) and key != MANIFEST:
                yield key

    async def list_prefix(self, prefix: str) -> AsyncIterator[str]:  # type: ignore[override]
        async for key in self.inner.list_prefix(prefix):
            if not key.endswith(PARTIAL) and key != MANIFEST:
                yield key

    async def list_dir(self, prefix: str) -> AsyncIterator[str]:  # type: ignore[override]
        top = not prefix.strip("/")
        async for key in self.inner.list_dir(prefix):
            if not key.endswith(PARTIAL) and not (top and key == MANIFEST):
                yield key


def document(store: Any, path: str) -> dict[str, Any] | None:
    """Synchronous :meth:`GuardedStore.document` (plain stores are read and parsed too)."""
    from zarr.core.sync import sync

    if isinstance(store, GuardedStore):
        return sync(store.document(path))
    key = document_key(path)
    buf = sync(store.get(key, default_buffer_prototype()))
    return None if buf is None else parse_document(key, buf.to_bytes())


class SafeGroup:
    """A zarr group (``group``; every other attribute is the group's) whose members fail
    with a one-line ``InvalidTraceError`` naming their ``zarr.json`` when their metadata cannot
    be read; a missing member is a ``KeyError``. Member groups are SafeGroups too."""

    def __init__(self, group: zarr.Group) -> None:
        self.group = group

    @classmethod
    def wrap(cls, group: zarr.Group | SafeGroup) -> SafeGroup:
        return group if isinstance(group, SafeGroup) else cls(group)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.group, name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.group)

    def __repr__(self) -> str:
        return f"SafeGroup({self.group!r})"

    def _where(self, path: str) -> str:
        base = self.group.path
        return document_key(f"{base}/{path}" if base else path)

    def __getitem__(self, path: str) -> Any:
        try:
            obj = self.group[path]
        except (KeyError, NtraceError):
            raise
        except MemoryError:
            raise
        except Exception as exc:
            raise InvalidTraceError(f"{self._where(path)}: unreadable metadata "
                                    f"({one_line(exc)})") from exc
        return SafeGroup(obj) if isinstance(obj, zarr.Group) else obj

    def __contains__(self, member: object) -> bool:
        try:
            self[str(member)]
        except KeyError:
            return False
        return True


_OPERATION: ContextVar[weakref.WeakSet[Any] | None] = ContextVar("ntrace_zarr_tasks",
                                                                 default=None)


def _task_factory(previous: Any) -> Any:
    """A task factory for zarr's event loop that records every task created on behalf of
    a :func:`cancel_on_error` block (tasks inherit the context of the code creating them)."""

    def factory(loop: Any, coro: Any, **kwargs: Any) -> Any:
        task = (previous(loop, coro, **kwargs) if previous is not None
                else asyncio.Task(coro, loop=loop, **kwargs))
        tasks = _OPERATION.get()
        if tasks is not None:
            tasks.add(task)
        return task

    factory.ntrace = True  # type: ignore[attr-defined]
    return factory


async def _cancel(tasks: weakref.WeakSet[Any]) -> None:
    while pending := [t for t in list(tasks) if not t.done()]:
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


async def _running_loop() -> asyncio.AbstractEventLoop:
    return asyncio.get_running_loop()


@contextmanager
def cancel_on_error() -> Iterator[None]:
    """Run zarr's synchronous calls inside this block so that when one fails (a chunk that
    does not decode, a refused key), the tasks it left pending on zarr's event loop (one per
    chunk of a large read) are cancelled and awaited before the error propagates: no work
    continues after it and no "Task was destroyed but it is pending" lines follow it."""
    from zarr.core.sync import sync

    loop = sync(_running_loop())  # zarr's event loop, the one its synchronous calls use
    factory = loop.get_task_factory()
    if not getattr(factory, "ntrace", False):
        loop.set_task_factory(_task_factory(factory))
    tasks: weakref.WeakSet[Any] = weakref.WeakSet()
    token = _OPERATION.set(tasks)
    try:
        yield
    except BaseException:
        _OPERATION.reset(token)
        token = None
        sync(_cancel(tasks))
        raise
    finally:
        if token is not None:
            _OPERATION.reset(token)


def unreadable(path: str, rows: object, exc: BaseException) -> InvalidTraceError:
    """The error for chunk data of ``path`` that does not decode (corrupt or truncated)."""
    if rows is None:
        where = ""
    elif isinstance(rows, slice):
        where = f" rows from {rows.start or 0}"
    elif isinstance(rows, int | np.integer):
        where = f" row {int(rows)}"
    else:
        where = " selected rows"
    return InvalidTraceError(f"{path}:{where} unreadable: {one_line(exc)} (a chunk file is "
                             "corrupt or truncated)")
