"""Writing Taylor traces (format 1.x): create, append rounds, commit, close.

The writer knows only numpy and zarr. ``write_round`` checks shapes and dtypes at the
boundary; ``_write_round`` does the work. Arrays start with a modest capacity along their
append dimension and grow by doubling (spec 'Growth'), so appending a round rewrites no
metadata in the common case and a trace never declares much more than it holds. Rows are
staged in memory and written a whole chunk at a time (chunks hold up to ``CHUNK_BYTES``), all
arrays' chunks concurrently through zarr's async API: per-call overhead, not bandwidth, is
what costs on small rounds. The commit protocol (spec 'Commit protocol'): rows are written
first, then the root attribute ``commit`` is rewritten (one atomic key) to count them; readers
trust only committed rows. A row leaves the stage only once its chunk writes completed, and
a commit counts the longest prefix of rounds whose rows all did; after a write error nothing
more is written and ``close`` marks the trace ``aborted`` with the reason. At least every
``commit_seconds`` all staged rows are written and committed. ``close`` trims arrays to the
committed length. A writer holds the output's lock (:mod:`ntrace.format.lock`) from before
anything at the path is touched until it is closed.

Several processes may write one trace together (spec 'Multi-process writing'): given a
:class:`Coordinator`, process ``r`` writes only its block of the ``sample`` axis of the
per-sample arrays, whose chunks never straddle two processes; process 0 creates the trace,
writes every other array, resizes arrays and writes every metadata document. Growth of the
``taylor_round`` axis, commits and closing are collective: every process calls them at the
same rounds, and a barrier orders process 0's metadata writes against the others' chunks.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import os
import shutil
import time
import warnings
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import zarr
import zarr.storage
from zarr.api.asynchronous import create_array
from zarr.codecs import BloscCodec, Crc32cCodec
from zarr.core.sync import sync

from ntrace.errors import InvalidTraceError, UsageError, WriterError
from ntrace.format import layout as L
from ntrace.format.checkpoint import Checkpoint, other_slot, read_checkpoint, write_checkpoint
from ntrace.format.lock import OutputLock, holding
from ntrace.format.metadata import (
    ATTR_KEY,
    Commit,
    LayerAttrs,
    ModuleAttrs,
    TraceAttrs,
    parse_layer_name,
)
from ntrace.format.rows import LayerRound, ProbeSetup, Snapshot, TaylorRound
from ntrace.format.store import prepare_output, publish, staging_dir
from ntrace.format.variables import stored_attrs

__all__ = ["Coordinator", "LayerRound", "ProbeSetup", "Snapshot", "TaylorRound", "TraceWriter"]

ROUND_CHUNK = 4096
CHUNK_BYTES = 2 << 20  # target uncompressed bytes per chunk along an append dimension
# store every chunk, also one of fill values only (spec §6: a missing chunk is an error)
EVERY_CHUNK = {"write_empty_chunks": True}
MAX_ROWS_PER_CHUNK = {L.TAYLOR: 32, L.SNAPSHOT: 64}
# rows an append dimension starts with (fewer when fewer are expected); it then doubles, so
# a trace declares at most twice the rows it holds (spec 'Growth')
INITIAL_ROWS = {L.ROUND: ROUND_CHUNK, L.TAYLOR: 256, L.SNAPSHOT: 64}
DIMS = (L.ROUND, L.TAYLOR, L.SNAPSHOT)


def grown(capacity: int, need: int, limit: int | None) -> int:
    """The capacity after growing ``capacity`` to hold ``need`` rows: doubled, but not past
    ``limit`` (the rows the run expects) while ``need`` is within it."""
    new = max(need, 2 * capacity)
    if limit is not None and need <= limit:
        new = min(new, limit)
    return new


def _compressors() -> tuple[Any, ...]:
    # Core-spec codecs only: blosc(zstd level 1) with bit shuffle, then a crc32c checksum so a
    # corrupt chunk is detected rather than misread. On Jacobian chunks bit shuffle runs ~1.9x
    # faster than byte shuffle for 0.9x its ratio; level 1 ~3x faster than level 3 at the same
    # ratio (measured on MNIST traces): the writer shares the CPU with training.
    return (BloscCodec(cname="zstd", clevel=1, shuffle="bitshuffle"), Crc32cCodec())


def _fill(dtype: str) -> Any:
    return {"float32": float("nan"), "int64": -1, "uint8": 0}[dtype]


class Coordinator(Protocol):
    """The processes that write one trace together. ``barrier`` returns once every process
    has called it; ``ntrace.recording.distributed`` implements it over ``torch.distributed``."""

    rank: int
    world_size: int

    def barrier(self) -> None: ...


class TraceWriter:
    """Appends rounds to a new trace. Not thread-safe: one thread writes."""

    def __init__(self, root: Any, attrs: TraceAttrs, layers: list[LayerAttrs],
                 tracked: Mapping[str, np.ndarray], probe: ProbeSetup | None,
                 commit_seconds: float, modules: list[ModuleAttrs] | None = None,
                 coordinator: Coordinator | None = None) -> None:
        self._coord = coordinator
        self._root = root
        self._attrs = attrs
        self._layers = {la.name: la for la in layers}
        self._modules = {m.name: m for m in modules or []}
        self._tracked = {k: np.asarray(v) for k, v in tracked.items()}
        self._probe = probe
        self._commit_seconds = commit_seconds
        self._arrays: dict[str, Any] = {}
        self._layouts: dict[str, L.ArrayLayout] = {}
        self._capacity: dict[str, int] = {}
        self._counts = {L.ROUND: 0, L.TAYLOR: 0, L.SNAPSHOT: 0}
        self._staged: dict[str, list[np.ndarray]] = {}
        self._written: dict[str, int] = {}  # rows whose chunk writes completed, per array
        self._marks: list[tuple[int, int, int]] = []  # counts after each uncommitted round
        self._limit: dict[str, int | None] = dict.fromkeys(DIMS)  # expected rows per dim
        self._failed: BaseException | None = None  # the first write error: nothing after it
        self._lock: OutputLock | None = None  # released by close (when this writer took it)
        self._last_commit = time.monotonic()
        self._closed = False

    # -- creation -------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | os.PathLike[str], attrs: TraceAttrs, layers: list[LayerAttrs],
               tracked: Mapping[str, np.ndarray], probe: ProbeSetup | None = None, *,
               expected_rounds: int | None = None, overwrite: bool = False,
               commit_seconds: float = 1.0,
               modules: list[ModuleAttrs] | None = None,
               coordinator: Coordinator | None = None,
               lock: OutputLock | None = None) -> TraceWriter:
        """Create the store, every group and array, and the first (empty) commit.

        The writer holds the output's lock (``lock``, which the caller took and releases, or
        one it takes itself and releases on :meth:`close`) before anything at ``path`` is
        touched. With a ``coordinator`` this is process 0's part; the other processes call
        :meth:`join` once it returned (the caller orders the two)."""
        world = 1 if coordinator is None else coordinator.world_size
        if coordinator is not None and coordinator.rank != 0:
            raise UsageError("only process 0 creates a trace; the others join it")
        if attrs.sampling.world_size != world:
            raise UsageError(f"sampling.world_size is {attrs.sampling.world_size} but "
                             f"{world} process(es) write the trace")
        if tuple(la.name for la in layers) != attrs.layers:
            raise UsageError("layer attributes do not match TraceAttrs.layers")
        if tuple(m.name for m in modules or []) != attrs.modules:
            raise UsageError("module attributes do not match TraceAttrs.modules")
        for name in (*attrs.layers, *attrs.modules):  # what readers accept (spec §3)
            try:
                parse_layer_name(name, "name")
            except InvalidTraceError:
                raise UsageError(f"module {name!r} cannot name a group of the trace (a name "
                                 "must be valid Unicode, hold no '/' and not be '.' or '..'); "
                                 "rename it in the model") from None
        for la in layers:
            t = np.asarray(tracked.get(la.name, []))
            if t.ndim != 1 or t.size == 0 or np.any(np.diff(t) <= 0) or t[0] < 0 \
                    or t[-1] >= la.out_features:
                raise UsageError(f"layer {la.name}: tracked neurons must be a non-empty sorted "
                                 f"list of distinct indices below {la.out_features}")
        with holding(path, lock) as own:
            self = cls._create(path, attrs, layers, tracked, probe, expected_rounds, overwrite,
                               commit_seconds, modules, coordinator)
            self._lock = own
        return self

    @classmethod
    def _create(cls, path: str | os.PathLike[str], attrs: TraceAttrs, layers: list[LayerAttrs],
                tracked: Mapping[str, np.ndarray], probe: ProbeSetup | None,
                expected_rounds: int | None, overwrite: bool, commit_seconds: float,
                modules: list[ModuleAttrs] | None,
                coordinator: Coordinator | None) -> TraceWriter:
        p = prepare_output(path, overwrite)
        now = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
        attrs = replace(attrs, created=attrs.created or now, status="running",
                        commit=Commit())
        staging = staging_dir(p)  # built aside, renamed into place whole (spec §6)
        try:
            store = zarr.storage.LocalStore(staging)
            root = zarr.create_group(store=store, zarr_format=3,
                                     attributes={ATTR_KEY: attrs.to_dict()})
        except OSError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            raise WriterError(f"cannot create trace {p}: {exc.strerror or exc}") from exc
        self = cls(root, attrs, layers, tracked, probe, commit_seconds, modules, coordinator)
        if expected_rounds:
            rounds = max(int(expected_rounds), 1)
            snaps = 1
            if probe is not None and attrs.sampling.probe_every > 0:
                snaps = rounds // attrs.sampling.probe_every + 1
            self._limit = {L.ROUND: rounds, L.TAYLOR: rounds // attrs.sampling.taylor_every + 1,
                           L.SNAPSHOT: snaps}
        self._initial = {d: min(INITIAL_ROWS[d], self._limit[d] or INITIAL_ROWS[d])
                         for d in DIMS}
        try:
            self._create_arrays()
            self._publish(staging, p)
        except OSError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            raise WriterError(f"cannot create trace {p}: {exc.strerror or exc}") from exc
        return self

    @classmethod
    def join(cls, path: str | os.PathLike[str], coordinator: Coordinator,
             commit_seconds: float = 1.0) -> TraceWriter:
        """Open the trace process 0 created, to write this process's block of the per-sample
        arrays (process ``coordinator.rank`` > 0)."""
        from ntrace.format.reader import open_trace

        if coordinator.rank == 0:
            raise UsageError("process 0 creates the trace; only the others join it")
        try:
            tr = open_trace(path)
            root = zarr.open_group(store=zarr.storage.LocalStore(Path(path)), mode="r+",
                                   zarr_format=3, use_consolidated=False)
        except OSError as exc:
            raise WriterError(f"cannot open trace {path}: {exc.strerror or exc}") from exc
        if tr.attrs.sampling.world_size != coordinator.world_size:
            raise WriterError(f"trace {path} was created for {tr.attrs.sampling.world_size} "
                              f"processes, not {coordinator.world_size}")
        self = cls(root, tr.attrs, list(tr.layers.values()), tr.tracked, None,
                   commit_seconds, list(tr.modules.values()), coordinator)
        for path_, lay in tr.layouts.items():
            if lay.per_sample:
                self._keep(path_, lay, root[path_].with_config(EVERY_CHUNK))
            else:
                self._layouts[path_] = lay
        return self

    def _keep(self, path: str, lay: L.ArrayLayout, arr: Any, written: int = 0) -> None:
        """Start the books of one array: its layout and, along an append dimension, its
        capacity, staged rows and rows written (``written``)."""
        self._arrays[path] = arr
        self._layouts[path] = lay
        if lay.append_dim is not None:
            self._capacity[path] = arr.shape[0]
            self._staged[path] = []
            self._written[path] = written

    def _publish(self, staging: Path, final: Path) -> None:
        """Rename the created hierarchy to ``final`` in one step, so that a reader (or a
        writer killed meanwhile) sees no trace or a whole one, never part; reopen it there."""
        publish(staging, final)
        self._root = zarr.open_group(store=zarr.storage.LocalStore(final), mode="r+",
                                     zarr_format=3, use_consolidated=False)
        self._arrays = {path: self._root[path].with_config(EVERY_CHUNK) for path in self._arrays}

    def _create_arrays(self) -> None:
        a = self._attrs
        root = self._root
        root.create_group("taylor", attributes={ATTR_KEY: {"format_version": a.format_version,
                                                             "node": "taylor"}})
        layers_g = root.create_group("layers", attributes={
            ATTR_KEY: {"format_version": a.format_version, "node": "layers"}})
        layouts = L.root_arrays() + L.taylor_arrays(a)
        for la in self._layers.values():
            layers_g.create_group(la.name, attributes={ATTR_KEY: la.to_dict()})
            layouts += L.layer_arrays(a, la, len(self._tracked[la.name]))
        if self._modules:
            mods_g = root.create_group("modules", attributes={
                ATTR_KEY: {"format_version": a.format_version, "node": "modules"}})
            for m in self._modules.values():
                mods_g.create_group(m.name, attributes={ATTR_KEY: m.to_dict()})
                layouts += L.module_arrays(a, m)
        if self._probe is not None:
            pr = self._probe
            root.create_group("probe", attributes={ATTR_KEY: pr.units.to_dict()})
            layouts += L.probe_arrays(len(pr.sample_index), pr.input.shape[1], pr.units.total)
        specs = [self._array_spec(lay) for lay in layouts]
        made = sync(_gather([create_array(root.store_path, **spec) for spec in specs]))
        for lay, arr in zip(layouts, made, strict=True):
            self._keep(lay.path, lay, zarr.Array(arr))
        for name, t in self._tracked.items():
            self._arrays[f"layers/{name}/tracked"][...] = np.asarray(t, dtype=np.int64)
        if self._probe is not None:
            self._arrays["probe/sample_index"][...] = self._probe.sample_index.astype(np.int64)
            self._arrays["probe/input"][...] = self._probe.input.astype(np.float32)

    def _array_spec(self, lay: L.ArrayLayout) -> dict[str, Any]:
        """Keyword arguments of ``create_array`` for one layout entry."""
        append = lay.append_dim
        if append is None:
            shape, chunks = lay.tail, lay.tail
        else:
            shape = (self._initial[append], *lay.tail)
            if append == L.ROUND:
                first = ROUND_CHUNK
            else:
                tail = self._local_tail(lay)  # one process's block of the sample axis
                row = int(np.prod(tail)) * np.dtype(lay.dtype).itemsize
                first = max(1, min(MAX_ROWS_PER_CHUNK[append], CHUNK_BYTES // max(row, 1)))
                first = 1 << (first.bit_length() - 1)  # a power of two
            chunks = (first, *(self._local_tail(lay) if lay.per_sample else lay.tail))
        return dict(name=lay.path, shape=shape, chunks=tuple(max(c, 1) for c in chunks),
                    dtype=lay.dtype, fill_value=_fill(lay.dtype),
                    compressors=_compressors(), dimension_names=lay.dims,
                    attributes=stored_attrs(lay), config=EVERY_CHUNK)

    def _local_tail(self, lay: L.ArrayLayout) -> tuple[int, ...]:
        """The row shape this process writes: its block of the sample axis (spec §6.2)."""
        world = self._attrs.sampling.world_size
        if not lay.per_sample or world == 1:
            return lay.tail
        return (lay.tail[0] // world, *lay.tail[1:])

    def _owns(self, path: str) -> bool:
        """Whether this process writes (its block of) ``path``: process 0 writes everything,
        the others only the per-sample arrays."""
        return self._coord is None or self._coord.rank == 0 or self._layouts[path].per_sample

    @property
    def rank(self) -> int:
        return 0 if self._coord is None else self._coord.rank

    # -- appending --------------------------------------------------------------------------
    @property
    def attrs(self) -> TraceAttrs:
        return self._attrs

    @property
    def tracked(self) -> dict[str, np.ndarray]:
        return dict(self._tracked)

    @property
    def counts(self) -> dict[str, int]:
        return dict(self._counts)

    def write_round(self, loss: float, taylor: TaylorRound | None = None,
                    snapshot: Snapshot | None = None) -> None:
        """Append round ``counts['round']``: its minibatch loss and optional Taylor data and
        probe snapshot. Checks every shape and dtype against the layout first."""
        if self._closed:
            raise UsageError("the trace writer is closed")
        if self._failed is not None:
            raise WriterError(f"the trace writer failed earlier ({_why(self._failed)}); "
                              "close it: the trace keeps the rounds written before")
        n = self._counts[L.ROUND]
        if taylor is not None:
            if taylor.round_index != n:
                raise UsageError(f"Taylor data for round {taylor.round_index} given at round {n}")
            taylor = taylor.packed()
            self._check_taylor(taylor)
        if snapshot is not None:
            if self._probe is None:
                raise UsageError("this trace was created without a probe set")
            if snapshot.round_index != n:
                raise UsageError(f"snapshot for round {snapshot.round_index} given at round {n}")
            self._check("probe/config", snapshot.config)
        self._write_round(float(loss), taylor, snapshot)

    def _check(self, path: str, value: np.ndarray | None) -> None:
        lay = self._layouts.get(path)
        if lay is None:
            if value is not None:
                raise UsageError(f"{path}: this trace has no such array")
            return
        if value is None:
            raise UsageError(f"{path}: required by the layout but not given")
        v = np.asarray(value)
        tail = self._local_tail(lay)
        if v.shape != tail:
            raise UsageError(f"{path}: expected shape {tail}, found {v.shape}")
        kind = {"float32": "f", "int64": "iu", "uint8": "u"}[lay.dtype]
        if v.dtype.kind not in kind:
            raise UsageError(f"{path}: expected dtype {lay.dtype}, found {v.dtype}")

    def _check_taylor(self, t: TaylorRound) -> None:
        if set(t.layers) != set(self._layers):
            raise UsageError(f"Taylor round {t.round_index}: expected layers "
                             f"{sorted(self._layers)}, found {sorted(t.layers)}")
        if set(t.modules) != set(self._modules):
            raise UsageError(f"Taylor round {t.round_index}: expected module states for "
                             f"{sorted(self._modules)}, found {sorted(t.modules)}")
        for path, value in t.arrays().items():
            self._check(path, value)

    def _grow(self, rows: Mapping[str, int]) -> None:
        """Make each array ``path`` in ``rows`` hold ``rows[path]`` rows, growing those that
        are too short (spec 'Growth'), all at once: a growth rewrites one document each."""
        jobs, grown_to = [], {}
        for path, need in rows.items():
            cap = self._capacity[path]
            if need <= cap:
                continue
            dim = self._layouts[path].append_dim
            if self._coord is not None and dim == L.TAYLOR:
                raise WriterError(f"{path}: row {need - 1} is past the capacity {cap} that "
                                  "process 0 reserved (the processes wrote different rounds)")
            arr = self._arrays[path]
            grown_to[path] = grown(cap, need, self._limit[dim])
            jobs.append(arr.async_array.resize((grown_to[path], *arr.shape[1:])))
        if jobs:
            sync(_gather(jobs))
            self._capacity.update(grown_to)

    def _reserve_taylor(self, rows: int) -> None:
        """Multi-process: make every ``taylor_round`` array hold ``rows`` rows before anyone
        writes them. Capacity grows at the same rounds on every process; process 0 resizes
        (writes the array documents), a barrier follows, the others then reread them."""
        paths = [p for p, lay in self._layouts.items()
                 if lay.append_dim == L.TAYLOR and p in self._capacity]
        cap = min((self._capacity[p] for p in paths), default=rows)
        if rows <= cap:
            return
        assert self._coord is not None
        if self._coord.rank == 0:
            new = grown(cap, rows, self._limit[L.TAYLOR])
            for p in paths:
                if self._capacity[p] < new:
                    arr = self._arrays[p]
                    arr.resize((new, *arr.shape[1:]))
                self._capacity[p] = new
        self._coord.barrier()
        if self._coord.rank != 0:
            for p in paths:
                self._arrays[p] = self._root[p]  # the document process 0 just wrote
                self._capacity[p] = self._arrays[p].shape[0]

    def _write_round(self, loss: float, taylor: TaylorRound | None,
                     snapshot: Snapshot | None) -> None:
        if self._coord is not None and taylor is not None:
            try:
                self._reserve_taylor(self._counts[L.TAYLOR] + 1)
            except OSError as exc:
                raise WriterError(f"growing the trace failed: {exc.strerror or exc}") from exc
        rows: dict[str, Any] = {"loss": loss}
        if taylor is not None:
            rows["taylor/round_index"] = taylor.round_index
            rows.update((k, v) for k, v in taylor.arrays().items() if v is not None)
        if snapshot is not None:
            rows["probe/round_index"] = snapshot.round_index
            rows["probe/config"] = snapshot.config
        for path, value in rows.items():
            if self._owns(path):
                self._staged[path].append(np.asarray(value, dtype=self._layouts[path].dtype))
        self._counts[L.ROUND] += 1
        self._counts[L.TAYLOR] += taylor is not None
        self._counts[L.SNAPSHOT] += snapshot is not None
        self._marks.append((self._counts[L.ROUND], self._counts[L.TAYLOR],
                            self._counts[L.SNAPSHOT]))
        try:
            if self._coord is None and self.due():  # multi-process commits are collective
                self.commit()
            else:
                self._flush(full_chunks_only=True)
        except OSError as exc:
            raise WriterError(f"writing round {self._counts[L.ROUND] - 1} failed: "
                              f"{exc.strerror or exc}") from exc

    def due(self) -> bool:
        """Whether ``commit_seconds`` have passed since the last commit."""
        return time.monotonic() - self._last_commit >= self._commit_seconds

    def _flush(self, full_chunks_only: bool) -> None:
        """Write staged rows: whole chunks only, or everything (before a commit).

        A row leaves the stage, and counts as written, only once every chunk write of its
        array's block completed. The first error is kept: after it nothing more is written,
        and commits count only rows written before it (spec 'Commit protocol')."""
        if self._failed is not None:
            raise self._failed
        world = self._attrs.sampling.world_size
        blocks = []
        for path, staged in self._staged.items():
            if not staged:
                continue
            start = self._written[path]
            stop = start + len(staged)
            if full_chunks_only:
                c = self._arrays[path].chunks[0]
                stop = stop - stop % c
                if stop <= start:
                    continue
            blocks.append((path, start, stop))
        if not blocks:
            return
        try:
            self._grow({path: stop for path, _, stop in blocks})
        except Exception as exc:
            self._failed = exc
            raise
        jobs = []
        for path, start, stop in blocks:
            block = np.stack(self._staged[path][: stop - start])
            where: Any = slice(start, stop)
            if world > 1 and self._layouts[path].per_sample:
                part = block.shape[1]  # this process's block of the sample axis, own chunks
                where = (where, slice(self.rank * part, (self.rank + 1) * part))
            jobs.append(self._arrays[path].async_array.setitem(where, block))
        results = sync(_gather(jobs, return_exceptions=True))
        for (path, start, stop), result in zip(blocks, results, strict=True):
            if isinstance(result, BaseException):
                self._failed = self._failed or result
            else:
                del self._staged[path][: stop - start]
                self._written[path] = stop
        if self._failed is not None:
            raise self._failed

    def _committable(self) -> Commit:
        """The longest prefix of rounds all of whose rows are written: per append dimension
        the fewest rows written to any of its arrays (this process's), then the last round
        at which every dimension's count is within those."""
        written = dict(self._counts)
        for path, n in self._written.items():
            dim = self._layouts[path].append_dim
            assert dim is not None
            written[dim] = min(written[dim], n)
        if written == self._counts:
            return Commit(*(self._counts[d] for d in DIMS))
        for mark in reversed(self._marks):
            if all(m <= written[d] for m, d in zip(mark, DIMS, strict=True)):
                return Commit(*mark)
        return self._attrs.commit

    def commit(self) -> None:
        """Write every staged row, then make them visible to readers (one atomic write).

        Multi-process: collective; every process writes its rows, a barrier follows, then
        process 0 writes the commit, so a commit never counts a row some process still holds."""
        self._flush(full_chunks_only=False)
        if self._coord is not None:
            self._coord.barrier()
        self._commit(self._committable())

    def _commit(self, c: Commit, **changes: Any) -> None:
        """Write the root document with commit ``c`` (and ``changes`` to other attributes)."""
        if c != self._attrs.commit or changes:
            new = replace(self._attrs, commit=c, **changes)
            if self.rank == 0:
                self._set_attrs(new)
            else:
                self._attrs = new
        self._marks = [m for m in self._marks if m[0] > c.rounds]
        self._last_commit = time.monotonic()

    def write_checkpoint(self, round_index: int, arrays: Mapping[str, np.ndarray],
                         meta: Mapping[str, Any]) -> None:
        """Commit every round before ``round_index``, then store the training state at the
        start of that round in the free checkpoint slot and point the root at it."""
        if round_index != self._counts[L.ROUND]:
            raise UsageError(f"checkpoint for round {round_index} given after "
                             f"{self._counts[L.ROUND]} rounds")
        try:
            self.commit()
            if self.rank != 0:
                return  # process 0 holds the same model and optimizer state and stores it
            current = self._attrs.checkpoint
            slot = other_slot(None if current is None else current["slot"])
            write_checkpoint(self._root, slot, Checkpoint(round_index, self._attrs.commit,
                                                          dict(arrays), dict(meta)))
            self._set_attrs(replace(self._attrs, checkpoint={"slot": slot,
                                                             "round": round_index}))
        except OSError as exc:
            raise WriterError(f"writing the checkpoint of round {round_index} failed: "
                              f"{exc.strerror or exc}") from exc

    @classmethod
    def reopen(cls, path: str | os.PathLike[str], commit_seconds: float = 1.0,
               lock: OutputLock | None = None) -> tuple[TraceWriter, Checkpoint]:
        """Open a trace for appending from its last checkpoint (``ntrace record --resume``),
        holding its lock as :meth:`create` does.

        Rounds committed after the checkpoint are dropped: the commit is set back to the
        checkpoint's (the one case where a commit goes down, spec 'Checkpoints')."""
        with holding(path, lock) as own:
            self, ck = cls._reopen(path, commit_seconds)
            self._lock = own
        return self, ck

    @classmethod
    def _reopen(cls, path: str | os.PathLike[str], commit_seconds: float
                ) -> tuple[TraceWriter, Checkpoint]:
        from ntrace.format.files import check_tree
        from ntrace.format.reader import open_trace

        tr = open_trace(path)
        check_tree(path)  # no link, FIFO or device inside: every append stays in the trace
        if tr.attrs.checkpoint is None:
            raise UsageError(f"{path} holds no checkpoint, so it cannot be resumed; runs of "
                             "built-in tasks are checkpointed at the end of their first epoch")
        root = zarr.open_group(store=zarr.storage.LocalStore(Path(path)), mode="r+",
                               zarr_format=3, use_consolidated=False)
        ck = read_checkpoint(root, tr.attrs.checkpoint["slot"])
        probe = None
        if tr.probe_units is not None:
            probe = ProbeSetup(tr.read("probe/sample_index"), tr.read("probe/input"),
                               tr.probe_units)
        self = cls(root, tr.attrs, list(tr.layers.values()), tr.tracked, probe,
                   commit_seconds, list(tr.modules.values()))
        for path_, lay in tr.layouts.items():
            written = 0 if lay.append_dim is None else getattr(ck.commit,
                                                               L.COMMIT_FIELD[lay.append_dim])
            self._keep(path_, lay, root[path_].with_config(EVERY_CHUNK), written)
        self._counts = {L.ROUND: ck.commit.rounds, L.TAYLOR: ck.commit.taylor_rounds,
                        L.SNAPSHOT: ck.commit.snapshots}
        self._set_attrs(replace(tr.attrs, status="running", status_reason=None,
                                commit=ck.commit))
        return self, ck

    def _set_attrs(self, attrs: TraceAttrs) -> None:
        self._root.attrs.put({ATTR_KEY: attrs.to_dict()})
        self._attrs = attrs

    def close(self, status: str = "complete", reason: str | None = None) -> None:
        """Commit, trim arrays to their committed length and record the final status.

        Multi-process: collective; process 0 trims and writes the status after every
        process's rows are written, and no process returns before it has done so."""
        if self._closed:
            return
        try:
            self._finish(status, reason)
        except OSError as exc:
            raise WriterError(f"closing the trace failed: {exc.strerror or exc}") from exc
        finally:
            self._closed = True
            if self._coord is not None:
                self._coord.barrier()
            if self._lock is not None:
                self._lock.release()

    def _finish(self, status: str, reason: str | None) -> None:
        """Write what is staged, trim every array to the rows the final commit counts, then
        write the commit and the status in one root document.

        After a write error nothing more is written but those documents: the commit counts
        the rows written before the error and the status is ``aborted`` with the reason.
        Trimming first deletes the chunks past the commit, which frees space on a full disk;
        if even these writes fail, the trace keeps its last commit and status ``running``."""
        if self._failed is None:
            try:
                self._flush(full_chunks_only=False)
            except Exception:  # noqa: BLE001 - kept in self._failed, reported below
                pass
        if self._failed is not None and status != "aborted":
            status, reason = "aborted", f"writing the trace failed: {_why(self._failed)}"
        if self._coord is not None:
            self._coord.barrier()
        c = self._committable()
        if self.rank == 0:
            for path, arr in self._arrays.items():
                dim = self._layouts[path].append_dim
                n = None if dim is None else getattr(c, L.COMMIT_FIELD[dim])
                if n is not None and arr.shape[0] != n:
                    arr.resize((n, *arr.shape[1:]))
        self._commit(c, status=status, status_reason=reason)
        if self.rank == 0 and self._failed is None:
            # Consolidated metadata (a zarr-python convention other readers may ignore) lets
            # plain ``xarray.open_datatree`` open a finished trace with one metadata read.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", category=UserWarning)
                zarr.consolidate_metadata(self._root.store)


async def _gather(jobs: list[Any], return_exceptions: bool = False) -> list[Any]:
    return list(await asyncio.gather(*jobs, return_exceptions=return_exceptions))


def _why(exc: BaseException) -> str:
    return str(getattr(exc, "strerror", None) or exc)
