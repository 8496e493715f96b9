"""Reading Taylor traces: metadata eagerly (small), arrays lazily (zarr or xarray).

``open_trace`` parses and checks every node's attributes and every array's metadata, never
array data. Arrays are exposed sliced to the committed prefix (spec 'Commit protocol'), so
a trace that is still being written, or whose writer died, reads consistently.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from ntrace.errors import InvalidTraceError, NtraceError
from ntrace.format import layout as L
from ntrace.format import limits
from ntrace.format.checks import check_documents
from ntrace.format.metadata import (
    LayerAttrs,
    ModuleAttrs,
    ProbeUnits,
    TraceAttrs,
    node_attrs,
    parse_format_version,
    parse_str,
)
from ntrace.format.safe import GuardedStore, cancel_on_error, unreadable
from ntrace.format.store import Location, open_location, stored_bytes

GROUP_NODES = {"taylor": "taylor", "layers": "layers"}  # group path → node kind


@dataclass
class Trace:
    """An open trace. ``attrs`` is the root document; ``layers`` maps name → LayerAttrs in
    network order; ``layouts`` maps array path → its expected layout. ``path`` is the local
    directory or ``.zip`` (for a URL, ``Path(url)``); ``location`` says where it was opened
    from and holds its store."""

    path: Path
    root: Any
    attrs: TraceAttrs
    layers: dict[str, LayerAttrs]
    probe_units: ProbeUnits | None
    layouts: dict[str, L.ArrayLayout] = field(default_factory=dict)
    modules: dict[str, ModuleAttrs] = field(default_factory=dict)
    location: Location | None = None

    # -- committed sizes ------------------------------------------------------------------
    @property
    def rounds(self) -> int:
        return self.attrs.commit.rounds

    @property
    def taylor_rounds(self) -> int:
        return self.attrs.commit.taylor_rounds

    @property
    def snapshots(self) -> int:
        return self.attrs.commit.snapshots

    def committed(self, dim: str | None) -> int | None:
        return None if dim is None else getattr(self.attrs.commit, L.COMMIT_FIELD[dim])

    # -- arrays ---------------------------------------------------------------------------
    def zarr_array(self, path: str) -> Any:
        """The raw zarr array (uncommitted rows included); prefer :meth:`read`."""
        if path not in self.layouts:
            raise InvalidTraceError(f"{self.path}: no array {path!r} in this trace")
        cache = self.__dict__.setdefault("_zarr_arrays", {})  # metadata read once per array
        if path not in cache:
            cache[path] = self.root[path]
        return cache[path]

    def read(self, path: str, rows: slice | int | np.ndarray | None = None) -> np.ndarray:
        """Read committed rows of an array (all committed rows when ``rows`` is None); a chunk
        that does not decode raises ``InvalidTraceError`` naming the array and rows."""
        return self._decoded(path, rows, lambda: self._read(path, rows))

    def select(self, path: str, key: tuple[Any, ...]) -> np.ndarray:
        """An outer selection of the committed part of ``path``: one int, slice or 1-d
        integer array per axis, indexing the shape :meth:`shape` gives (xarray's lazy
        arrays read through this)."""
        return self._decoded(path, key[0] if key else None, lambda: self._select(path, key))

    def shape(self, path: str) -> tuple[int, ...]:
        """The shape of ``path`` a reader sees: committed rows only along an append axis."""
        lay = self.layouts[path]
        return lay.shape(self.committed(lay.append_dim))

    def _decoded(self, path: str, rows: object, read: Any) -> np.ndarray:
        try:
            with cancel_on_error():
                return read()
        except (NtraceError, IndexError, MemoryError):
            raise
        except Exception as exc:  # a checksum mismatch, a truncated or undecodable chunk
            raise unreadable(path, rows, exc) from exc

    def _select(self, path: str, key: tuple[Any, ...]) -> np.ndarray:
        arr = self.zarr_array(path)
        shape = self.shape(path)
        if not shape:
            return np.asarray(arr[...])
        if len(key) != len(shape):
            raise IndexError(f"{path}: {len(key)} indices for {len(shape)} axes")
        parts: list[Any] = []
        for k, n in zip(key, shape, strict=True):
            if isinstance(k, slice):
                start, stop, step = k.indices(n)
                parts.append(slice(start, max(start, stop), step) if step > 0 else
                             np.arange(start, stop, step))
                continue
            idx = np.asarray(k)
            if idx.size and (idx.min() < -n or idx.max() >= n):
                raise IndexError(f"{path}: index out of the {n} rows a reader may use")
            parts.append(int(idx) % n if idx.ndim == 0 else idx % n)
        return np.asarray(arr.oindex[tuple(parts)])

    def length(self, path: str) -> int | None:
        """Rows a reader may use along the first axis of ``path``: the committed count of an
        append array, the whole first axis of a fixed one (None for a 0-d array)."""
        n = self.committed(self.layouts[path].append_dim)
        if n is None:
            tail = self.layouts[path].tail
            return tail[0] if tail else None
        return n

    def blocks(self, path: str, budget: int, start: int = 0, stop: int | None = None
               ) -> Iterator[tuple[int, np.ndarray]]:
        """Rows ``[start, stop)`` of ``path`` as (first row, block) pairs: blocks of about
        ``budget`` bytes whose edges fall on chunk edges, so that each chunk is decoded once,
        and at least one chunk each (chunks spanning several rows hold at most
        ``limits.MAX_SPAN_CHUNK_BYTES``; a fixed array's chunk at most ``MAX_CHUNK_BYTES``)."""
        n = self.length(path)
        if n is None:
            yield 0, self.read(path)
            return
        stop = n if stop is None else min(stop, n)
        arr = self.zarr_array(path)
        row = max(1, math.prod(arr.shape[1:]) * arr.dtype.itemsize)
        chunk = max(1, int(arr.chunks[0]) if arr.chunks else 1)
        size = max(1, budget // (row * chunk)) * chunk
        a = start
        while a < stop:
            b = min(stop, (a // chunk) * chunk + size)
            yield a, self.read(path, slice(a, b))
            a = b

    def _read(self, path: str, rows: slice | int | np.ndarray | None) -> np.ndarray:
        arr = self.zarr_array(path)
        n = self.length(path)
        if n is None:
            return np.asarray(arr[...])
        if rows is None:
            return np.asarray(arr[:n])
        if isinstance(rows, slice):
            start, stop, step = rows.indices(n)
            return np.asarray(arr[start:stop:step] if step == 1 else arr[start:stop][::step])
        idx = np.asarray(rows)
        if idx.size and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"{path}: row index out of the {n} committed rows")
        if idx.ndim == 0:
            return np.asarray(arr[int(idx) % n])
        return np.asarray(arr.oindex[np.asarray(idx) % n])

    @cached_property
    def tracked(self) -> dict[str, np.ndarray]:
        """Tracked neuron indices per layer (read on first use)."""
        return {name: self.read(f"layers/{name}/tracked") for name in self.layers}

    def has(self, path: str) -> bool:
        return path in self.layouts

    # -- xarray ---------------------------------------------------------------------------
    def datatree(self) -> Any:
        """The whole trace as a lazy ``xarray.DataTree``, cut to the committed prefix."""
        import xarray as xr

        tree = xr.open_datatree(self._source(), engine="zarr", consolidated=False, chunks=None)
        cuts = {dim: self.committed(dim) for dim in L.APPEND_DIMS}

        def cut(ds: Any) -> Any:
            sel = {d: slice(0, n) for d, n in cuts.items() if d in ds.dims}
            return ds.isel(sel) if sel else ds

        return tree.map_over_datasets(cut)

    def dataset(self, group: str = "") -> Any:
        """One group as a lazy ``xarray.Dataset`` cut to the committed prefix."""
        import xarray as xr

        ds = xr.open_zarr(self._source(), group=group or None, consolidated=False, chunks=None,
                          zarr_format=3)
        sel = {d: slice(0, self.committed(d)) for d in L.APPEND_DIMS if d in ds.dims}
        return ds.isel(sel) if sel else ds

    def _source(self) -> Any:
        return str(self.path) if self.location is None else self.location.store

    def nbytes_stored(self) -> int:
        """Bytes stored for the trace (files of a directory, members of a zip, objects of a
        URL), ``*.partial`` files excluded."""
        return stored_bytes(self.root.store)

    def close(self) -> None:
        """Release the store (the open file of a ``.zip``); reading afterwards fails."""
        if self.location is not None:
            self.location.close()

    def __enter__(self) -> Trace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load_modules(root: Any, attrs: TraceAttrs) -> tuple[dict[str, ModuleAttrs], list[str]]:
    """Parse the ``modules/<name>`` groups the root lists (format 1.1; none in 1.0)."""
    modules: dict[str, ModuleAttrs] = {}
    reasons: list[str] = []
    for name in attrs.modules:
        gpath = f"modules/{name}"
        try:
            m = ModuleAttrs.from_dict(node_attrs(root[gpath].attrs.asdict(), gpath),
                                      f"{gpath} 'ntrace'")
        except KeyError:
            reasons.append(f"{gpath}: group is missing (root lists module {name!r})")
            continue
        except InvalidTraceError as exc:
            reasons.append(str(exc))
            continue
        if m.name != name:
            reasons.append(f"{gpath}: attribute name {m.name!r} differs from the group name")
        modules[name] = m
    return modules, reasons


def expected_layouts(attrs: TraceAttrs, layers: Mapping[str, LayerAttrs],
                     tracked_counts: Mapping[str, int], probe: tuple[int, int, int] | None,
                     modules: Mapping[str, ModuleAttrs] | None = None
                     ) -> dict[str, L.ArrayLayout]:
    """Every array the spec requires for this trace, keyed by path."""
    lays = L.root_arrays() + L.taylor_arrays(attrs)
    for name, la in layers.items():
        lays += L.layer_arrays(attrs, la, tracked_counts[name])
    for m in (modules or {}).values():
        lays += L.module_arrays(attrs, m)
    if probe is not None:
        lays += L.probe_arrays(*probe)
    return {lay.path: lay for lay in lays}


class Structure(NamedTuple):
    """What :func:`load_structure` found: the parsed documents, the expected layouts and the
    violations (empty for a conforming trace)."""

    attrs: TraceAttrs
    layers: dict[str, LayerAttrs]
    probe_units: ProbeUnits | None
    layouts: dict[str, L.ArrayLayout]
    modules: dict[str, ModuleAttrs]
    reasons: list[str]


def load_structure(root: Any, where: str) -> Structure:
    """Parse every node's attributes and compare array metadata with the layout. Raises only
    when the root document itself is unusable."""
    attrs = TraceAttrs.from_dict(node_attrs(root.attrs.asdict(), f"{where}: root group"))
    names = len(attrs.layers) + len(attrs.modules)
    if names > limits.MAX_NAMES:
        raise InvalidTraceError(f"{where}: the root lists {names} layers and modules, more "
                                f"than the {limits.MAX_NAMES} ntrace reads (spec/security.md)")
    reasons: list[str] = []
    layers: dict[str, LayerAttrs] = {}
    tracked_counts: dict[str, int] = {}
    for i, name in enumerate(attrs.layers):
        gpath = f"layers/{name}"
        try:
            g = root[gpath]
            la = LayerAttrs.from_dict(node_attrs(g.attrs.asdict(), gpath), f"{gpath} 'ntrace'")
        except KeyError:
            reasons.append(f"{gpath}: group is missing (root lists layer {name!r})")
            continue
        except InvalidTraceError as exc:
            reasons.append(str(exc))
            continue
        if la.name != name or la.index != i:
            reasons.append(f"{gpath}: attributes name/index ({la.name!r}, {la.index}) do not "
                           f"match position {i} of root 'layers'")
        layers[name] = la
        try:
            tracked_counts[name] = int(root[f"{gpath}/tracked"].shape[0])
        except (KeyError, IndexError, AttributeError):
            reasons.append(f"{gpath}/tracked: array is missing")
            tracked_counts[name] = 0
    # output_size consistency: the last layer produces the network output in format 1.0
    probe_units = None
    probe_shape = None
    if "probe" in root:
        try:
            probe_units = ProbeUnits.from_dict(node_attrs(root["probe"].attrs.asdict(), "probe"))
            unknown = [u for u in probe_units.layers
                       if u not in attrs.layers and u not in attrs.modules]
            if unknown:
                reasons.append(f"probe: units name layers not in the trace: {unknown}")
            size = int(root["probe/sample_index"].shape[0])
            feats = int(root["probe/input"].shape[1])
            probe_shape = (size, feats, probe_units.total)
        except InvalidTraceError as exc:
            reasons.append(str(exc))
        except (KeyError, IndexError, AttributeError):
            reasons.append("probe: sample_index or input array is missing")
    modules, module_reasons = load_modules(root, attrs)
    reasons += module_reasons
    layouts = expected_layouts(attrs, layers, tracked_counts, probe_shape, modules)
    reasons += check_nodes(root, attrs, layers, probe_units, modules)
    reasons += _check_arrays(root, attrs, layouts)
    reasons += check_documents(root.store, attrs, layouts)
    expect_chunks(root.store, attrs, layouts)
    return Structure(attrs, layers, probe_units, layouts, modules, reasons)


def expect_chunks(store: Any, attrs: TraceAttrs, layouts: Mapping[str, L.ArrayLayout]) -> None:
    """Tell the store which rows of each array must be stored: the committed rows of an
    append array, every row of a fixed one (a missing chunk there is an error)."""
    if not isinstance(store, GuardedStore):
        return
    for path, lay in layouts.items():
        n = getattr(attrs.commit, L.COMMIT_FIELD[lay.append_dim]) if lay.append_dim else (
            lay.tail[0] if lay.tail else 1)
        store.expect_rows(path, n)


def check_nodes(root: Any, attrs: TraceAttrs, layers: Mapping[str, LayerAttrs],
                 units: ProbeUnits | None, modules: Mapping[str, ModuleAttrs] | None = None
                 ) -> list[str]:
    """What the attribute documents must say about each other (spec 'Hierarchy')."""
    r: list[str] = []
    for gpath, kind in GROUP_NODES.items():
        try:
            doc = node_attrs(root[gpath].attrs.asdict(), f"{gpath} group")
            parse_format_version(doc.get("format_version"), f"{gpath} 'ntrace'.format_version")
            parse_str(doc.get("node"), f"{gpath} 'ntrace'.node", (kind,))
        except KeyError:
            r.append(f"{gpath}: group is missing")
        except InvalidTraceError as exc:
            r.append(str(exc))
    for name in attrs.layers:
        if "/" in name or not name:
            r.append(f"root 'layers': layer name {name!r} must be non-empty and contain no '/'")
    if attrs.modules and "modules" not in root:
        r.append("modules: group is missing but the root lists modules")
    chain = [layers[n] for n in attrs.layers if n in layers]
    for la in chain:
        if (la.kind != "linear" or la.shape.positions) and attrs.structure == "chain":
            what = "linear layer with positions" if la.kind == "linear" else f"{la.kind} layer"
            r.append(f"layers/{la.name}: a {what} needs structure 'graph'")
        if la.activation.kind == "prelu" and la.activation.num_parameters not in (
                1, la.shape.output_shape[0]):
            r.append(f"layers/{la.name}: prelu num_parameters must be 1 or the neuron count")
    if len(chain) == len(attrs.layers) and chain and attrs.structure == "chain":
        for prev, la in zip(chain, chain[1:], strict=False):
            if la.in_features != prev.out_features:
                r.append(f"layers/{la.name}: in_features {la.in_features} differs from "
                         f"out_features {prev.out_features} of the previous layer {prev.name}")
        last = chain[-1]
        if last.out_features != attrs.output_size:
            r.append(f"root output_size {attrs.output_size} differs from out_features "
                     f"{last.out_features} of the last layer {last.name}")
        for la in chain:
            if la.jacobian == "identity" and (la is not last or la.activation.has_mask):
                r.append(f"layers/{la.name}: jacobian 'identity' is only allowed on the last "
                         "layer with an identity activation")
    elif chain:
        for la in chain:
            if la.jacobian == "identity" and (la is not chain[-1] or la.activation.has_mask
                                              or la.shape.units != attrs.output_size):
                r.append(f"layers/{la.name}: jacobian 'identity' is only allowed on the last "
                         "layer, with an identity activation, whose output is the network's")
    probe_size = attrs.sampling.probe_size
    if "probe" not in root:
        if probe_size > 0:
            r.append(f"probe: group is missing but sampling.probe_size is {probe_size}")
        return r
    if probe_size == 0:
        r.append("probe: group present but sampling.probe_size is 0")
    try:
        held = int(root["probe/sample_index"].shape[0])
    except (KeyError, IndexError, AttributeError):
        return r  # reported by the layout check
    if probe_size and held != probe_size:
        r.append(f"probe/sample_index: holds {held} probe points but sampling.probe_size is "
                 f"{probe_size}")
    mods = modules or {}
    if units is not None and len(chain) == len(attrs.layers) and len(mods) == len(attrs.modules):
        want = [(la.name, la.shape.units) for la in chain if la.activation.has_mask]
        want_mods = [(m.name, m.units) for m in mods.values() if m.kind == "activation"]
        have = list(zip(units.layers, units.counts, strict=True))
        if ([u for u in have if u[0] in layers] != want
                or [u for u in have if u[0] not in layers] != want_mods):
            r.append(f"probe: units {have} do not list every layer with a piecewise-linear "
                     "activation (and every activation module) in network order with its "
                     f"units; expected {want + want_mods}")
    return r


def _check_arrays(root: Any, attrs: TraceAttrs, layouts: Mapping[str, L.ArrayLayout]
                  ) -> list[str]:
    reasons = []
    for path, lay in layouts.items():
        try:
            arr = root[path]
        except KeyError:
            reasons.append(f"{path}: array is missing")
            continue
        if not hasattr(arr, "shape"):
            reasons.append(f"{path}: expected an array, found a group")
            continue
        dims = tuple(arr.metadata.dimension_names or ())
        if dims != lay.dims:
            reasons.append(f"{path}: dimension_names {list(dims)}, expected {list(lay.dims)}")
        if str(arr.dtype) != lay.dtype:
            reasons.append(f"{path}: dtype {arr.dtype}, expected {lay.dtype}")
        shape = tuple(arr.shape)
        dim = lay.append_dim
        if dim is None:
            if shape != lay.tail:
                reasons.append(f"{path}: shape {shape}, expected {lay.tail}")
            continue
        if shape[1:] != lay.tail:
            reasons.append(f"{path}: shape {shape}, expected (N, {', '.join(map(str, lay.tail))})"
                           .replace(", )", ")"))
        n = getattr(attrs.commit, L.COMMIT_FIELD[dim])
        if not shape or shape[0] < n:
            reasons.append(f"{path}: holds {shape[0] if shape else 0} rows along {dim} but "
                           f"the commit record counts {n}")
        elif attrs.status != "running" and shape[0] != n:
            reasons.append(f"{path}: {shape[0]} rows along {dim} in a {attrs.status} trace, "
                           f"expected exactly the {n} committed")
    return reasons


def open_trace(path: str | os.PathLike[str],
               storage_options: dict[str, Any] | None = None) -> Trace:
    """Open a trace for reading: a directory, a ``.zip`` from ``ntrace pack`` or an fsspec
    URL (``ntrace.format.store``; ``storage_options`` go to fsspec); refuse a
    non-conforming one with every reason found."""
    loc, root = open_location(path, "r", storage_options)
    p = loc.path
    try:
        s = load_structure(root, loc.text)
    except BaseException:
        loc.close()
        raise
    reasons = s.reasons
    if reasons:
        loc.close()
        raise InvalidTraceError(f"{loc} is not a valid trace: {reasons[0]}"
                                + (f" (and {len(reasons) - 1} more)" if len(reasons) > 1 else ""),
                                reasons)
    return Trace(path=p, root=root, attrs=s.attrs, layers=s.layers, probe_units=s.probe_units,
                 layouts=s.layouts, modules=s.modules, location=loc)
