"""``engine="ntrace"``: traces as xarray data, not raw storage.

``xr.open_datatree(path, engine="ntrace")`` (or ``open_dataset(path, engine="ntrace",
group="layers/fc1")``) opens a trace through :func:`~ntrace.format.reader.open_trace`, so the
guarded store and its limits (spec/security.md) apply, and shows:

- only the committed prefix of every append array (a trace still being written reads
  consistently);
- ``round`` as a coordinate along ``taylor_round`` and ``snapshot`` (not an index, so opening
  reads no data: ``ds.set_xindex("round").sel(round=30)`` or ``swap_dims``); the root's
  ``round`` axis needs none, its positions are the rounds;
- masks, module states and probe configurations unpacked to booleans over named unit axes
  (``neuron, y0, ...`` of a layer's output, ``in_feature``/``in_channel, x0, ...`` of a module's
  input, ``probe_unit`` indexed by ``(layer, unit)``), unpacked lazily on read;
- ``tracked_neuron`` (which neuron each tracked one is) and a scalar ``layer``/``module`` name;
- ``long_name``/``units``/``description`` from :mod:`ntrace.format.variables`;
- no checkpoints unless ``checkpoints=True``.

Everything is lazy: opening reads metadata documents only; values are read on access (or
through dask with ``chunks=``). Registered as the ``xarray.backends`` entry point ``ntrace``.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
from xarray.backends import BackendArray, BackendEntrypoint
from xarray.core import indexing

from ntrace.format import layout as L
from ntrace.format import limits
from ntrace.format.bits import unpack
from ntrace.format.reader import Trace, open_trace
from ntrace.format.safe import parse_document
from ntrace.format.store import is_trace_dir, is_url
from ntrace.format.variables import variable_attrs

ROUND_SOURCE = {L.TAYLOR: "taylor/round_index", L.SNAPSHOT: "probe/round_index"}
CHECKPOINTS = "checkpoints"


class TraceArray(BackendArray):
    """One array of an open trace, committed rows only; a packed-bits array (``units`` given)
    is seen unpacked: its last axis becomes the boolean unit axes ``units``."""

    def __init__(self, trace: Trace, path: str, units: tuple[int, ...] | None = None) -> None:
        self.trace, self.path, self.units = trace, path, units
        shape = trace.shape(path)
        if units is None:
            self.shape = shape
            self.dtype = np.dtype(trace.layouts[path].dtype)
        else:
            self.shape = (*shape[:-1], *units)
            self.dtype = np.dtype(bool)

    def __getitem__(self, key: indexing.ExplicitIndexer) -> Any:
        return indexing.explicit_indexing_adapter(key, self.shape,
                                                  indexing.IndexingSupport.OUTER, self._get)

    def _get(self, key: tuple[Any, ...]) -> np.ndarray:
        if self.units is None:
            return self.trace.select(self.path, key)
        k = len(self.units)
        lead, unit_key = key[:-k], key[-k:]
        packed = self.trace.select(self.path, (*lead, slice(None)))
        out = unpack(packed, int(np.prod(self.units))).reshape(*packed.shape[:-1], *self.units)
        first = out.ndim - k
        for j in reversed(range(k)):  # outer indexing, one unit axis at a time
            out = out[(slice(None),) * (first + j) + (unit_key[j],)]
        return out


def unit_axes(trace: Trace, path: str) -> tuple[tuple[str, ...], tuple[int, ...]] | None:
    """Names and sizes of the unit axes a packed array unpacks to (None if not packed)."""
    group, _, name = path.rpartition("/")
    kind, _, owner = group.partition("/")
    if kind == "layers" and name in ("mask", "mask_high"):
        out = trace.layers[owner].shape.output_shape
        return ("neuron", *_axes("y", len(out) - 1)), out
    if kind == "modules" and name == "state":
        shape = trace.modules[owner].input_shape
        if len(shape) == 1:
            return ("in_feature",), shape
        return ("in_channel", *_axes("x", len(shape) - 1)), shape
    if path == "probe/config" and trace.probe_units is not None:
        return ("probe_unit",), (trace.probe_units.total,)
    return None


def _axes(prefix: str, n: int) -> tuple[str, ...]:
    return tuple(f"{prefix}{i}" for i in range(n))  # as the layout names conv axes


def _variable(trace: Trace, path: str) -> xr.Variable:
    lay = trace.layouts[path]
    axes = unit_axes(trace, path)
    dims, units = lay.dims, None
    if axes is not None:
        dims, units = (*lay.dims[:-1], *axes[0]), axes[1]
    data = indexing.LazilyIndexedArray(TraceArray(trace, path, units))
    return xr.Variable(dims, data, attrs=variable_attrs(path))


def _probe_units(trace: Trace) -> xr.Coordinates:
    """``probe_unit`` indexed by (layer, unit): names from metadata, nothing read."""
    import pandas as pd

    pu = trace.probe_units
    assert pu is not None
    layer = np.repeat(np.array(pu.layers, dtype=object), pu.counts)
    unit = np.concatenate([np.arange(c) for c in pu.counts])
    index = pd.MultiIndex.from_arrays([layer, unit], names=["layer", "unit"])
    return xr.Coordinates.from_pandas_multiindex(index, "probe_unit")


def group_paths(trace: Trace) -> list[str]:
    """Every group of the trace that holds arrays or layers/modules, parents first."""
    found = {""}
    for path in trace.layouts:
        parts = path.split("/")[:-1]
        found.update("/".join(parts[: i + 1]) for i in range(len(parts)))
    return sorted(found, key=lambda g: (g.count("/") + bool(g), g))


def _group_attrs(trace: Trace, group: str) -> dict[str, Any]:
    return dict((trace.root[group] if group else trace.root).attrs.asdict())


def group_dataset(trace: Trace, group: str,
                  drop_variables: Iterable[str] = ()) -> xr.Dataset:
    """The lazy dataset of one group (``''`` is the root)."""
    drop = set(drop_variables)
    prefix = f"{group}/" if group else ""
    variables: dict[str, xr.Variable] = {}
    coords: dict[str, xr.Variable] = {}
    for path in trace.layouts:
        if not path.startswith(prefix) or "/" in path[len(prefix):]:
            continue
        name = path[len(prefix):]
        if name in drop:
            continue
        var = _variable(trace, path)
        if path in ROUND_SOURCE.values():
            coords["round"] = var
        elif name == "tracked":
            coords["tracked_neuron"] = var
        else:
            variables[name] = var
    dims = {d for v in variables.values() for d in v.dims}
    for dim, source in ROUND_SOURCE.items():
        if dim in dims and "round" not in coords and source in trace.layouts:
            coords["round"] = _variable(trace, source)
    kind, _, owner = group.partition("/")
    if kind in ("layers", "modules") and owner:
        coords[kind[:-1]] = xr.Variable((), owner)
    ds = xr.Dataset(variables, coords=xr.Coordinates(coords, indexes={}),
                    attrs=_group_attrs(trace, group))
    if "probe_unit" in dims and trace.probe_units is not None:
        ds = ds.assign_coords(_probe_units(trace))
    return ds


def _checkpoints(trace: Trace) -> dict[str, xr.Dataset]:
    """The checkpoint groups, read as plain Zarr through the trace's guarded store."""
    if CHECKPOINTS not in trace.root:
        return {}
    out = {CHECKPOINTS: xr.Dataset(attrs=_group_attrs(trace, CHECKPOINTS))}
    for slot in sorted(trace.root[CHECKPOINTS].group_keys()):
        out[f"{CHECKPOINTS}/{slot}"] = trace.dataset(f"{CHECKPOINTS}/{slot}")
    return out


def trace_groups(trace: Trace, drop_variables: Iterable[str] = (),
                 checkpoints: bool = False) -> dict[str, xr.Dataset]:
    """Every group of ``trace`` as a lazy dataset, keyed ``/``, ``/taylor``, ..."""
    drop = tuple(drop_variables)
    out = {"/" + g: group_dataset(trace, g, drop) for g in group_paths(trace)}
    if checkpoints:
        out.update({"/" + g: ds for g, ds in _checkpoints(trace).items()})
    return out


def _drop(drop_variables: str | Iterable[str] | None) -> tuple[str, ...]:
    if drop_variables is None:
        return ()
    return (drop_variables,) if isinstance(drop_variables, str) else tuple(drop_variables)


def _zip_is_trace(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as zf:
            info = zf.getinfo(limits.DOCUMENT)
            if info.file_size > limits.MAX_ROOT_DOCUMENT_BYTES:
                return False
            doc = parse_document(limits.DOCUMENT, zf.read(info))
    except Exception:  # noqa: BLE001 - guessing: anything unreadable is not ours
        return False
    attrs = doc.get("attributes")
    return isinstance(attrs, dict) and "ntrace" in attrs


class NtraceBackendEntrypoint(BackendEntrypoint):
    """Open Taylor traces (directories, ``.zip`` from ``ntrace pack``, fsspec URLs)."""

    description = "Open ntrace Taylor traces (committed rows, unpacked states, coordinates)"
    url = "https://github.com/ntrace/ntrace/blob/main/spec/taylor-trace.md"
    open_dataset_parameters = ("filename_or_obj", "drop_variables", "group", "checkpoints",
                               "storage_options")
    supports_groups = True

    def guess_can_open(self, filename_or_obj: Any) -> bool:
        if not isinstance(filename_or_obj, str | os.PathLike):
            return False
        text = os.fspath(filename_or_obj)
        if is_url(text):
            return False
        p = Path(text)
        if p.is_dir():
            return is_trace_dir(p)
        return p.is_file() and zipfile.is_zipfile(p) and _zip_is_trace(p)

    def open_dataset(self, filename_or_obj: Any, *,
                     drop_variables: str | Iterable[str] | None = None,
                     group: str | None = None, checkpoints: bool = False,
                     storage_options: dict[str, Any] | None = None) -> xr.Dataset:
        trace = _open(filename_or_obj, storage_options)
        try:
            g = (group or "").strip("/")
            groups = set(group_paths(trace))
            if g in groups:
                ds = group_dataset(trace, g, _drop(drop_variables))
            elif checkpoints and f"/{g}" in (found := {"/" + k: v for k, v in
                                                        _checkpoints(trace).items()}):
                ds = found[f"/{g}"]
            else:
                from ntrace.errors import UsageError

                raise UsageError(f"{filename_or_obj}: no group {group!r} in this trace; "
                                 f"groups: {', '.join(sorted('/' + x for x in groups))}")
        except BaseException:
            trace.close()
            raise
        ds.set_close(trace.close)
        return ds

    def open_groups_as_dict(self, filename_or_obj: Any, *,
                            drop_variables: str | Iterable[str] | None = None,
                            checkpoints: bool = False,
                            storage_options: dict[str, Any] | None = None
                            ) -> dict[str, xr.Dataset]:
        trace = _open(filename_or_obj, storage_options)
        try:
            groups = trace_groups(trace, _drop(drop_variables), checkpoints)
        except BaseException:
            trace.close()
            raise
        groups["/"].set_close(trace.close)
        return groups

    def open_datatree(self, filename_or_obj: Any, *,
                      drop_variables: str | Iterable[str] | None = None,
                      checkpoints: bool = False,
                      storage_options: dict[str, Any] | None = None) -> xr.DataTree:
        groups = self.open_groups_as_dict(filename_or_obj, drop_variables=drop_variables,
                                          checkpoints=checkpoints,
                                          storage_options=storage_options)
        return xr.DataTree.from_dict(groups)


def _open(filename_or_obj: Any, storage_options: dict[str, Any] | None) -> Trace:
    if isinstance(filename_or_obj, Trace):
        return filename_or_obj
    return open_trace(filename_or_obj, storage_options)
