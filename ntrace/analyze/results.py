"""The results of an analysis as one self-describing xarray Dataset, and its Zarr store.

Dimensions: ``checkpoint`` (Taylor-round counts N at which optima were solved),
``taylor_round``, ``round``, ``layer`` and ``neuron`` (the analysed layers and neurons, in
network order), ``feature`` (entries of a neuron's augmented row: weights, then bias;
NaN-padded across layers),
``snapshot``, ``probe``, ``unit`` and the ``*_rank`` dimensions of sorted exploration
curves. The ``layer`` coordinate holds layer names (``sel(layer="fc2")``); ``neuron`` and
``unit`` are indexed by (layer, index) pairs (``sel(neuron_layer="fc2")``,
``sel(unit_layer="fc1", unit_index=3)``), built from the plain ``*_layer``/``*_index``
coordinates stored on disk (Zarr stores no multi-index). The store is consolidated, so
``xr.open_zarr`` opens it without warnings. Results live in their own store: writing never
touches the trace.
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
from zarr.codecs import BloscCodec

from ntrace.errors import InvalidTraceError, NtraceError, TraceNotFoundError, UsageError
from ntrace.format.limits import MAX_RESULTS_BYTES
from ntrace.format.safe import cancel_on_error, one_line
from ntrace.format.store import resolve_location, root_document

RESULTS_VERSION = "1.1"  # 1.1: layer names as coordinates; consolidated
CHUNK_BYTES = 2 << 20
NODE = "analysis"
PAIRS = {"neuron": ("neuron_layer", "neuron_index"), "unit": ("unit_layer", "unit_index")}


def indexed(ds: xr.Dataset) -> xr.Dataset:
    """``ds`` with its ``neuron`` and ``unit`` axes indexed by (layer name, index) pairs."""
    for dim, (layer, index) in PAIRS.items():
        if layer in ds.coords and index in ds.coords and dim not in ds.xindexes:
            ds = ds.set_xindex([layer, index])
    return ds


def _plain(ds: xr.Dataset) -> xr.Dataset:
    """``ds`` without the multi-indexes of :func:`indexed` (what Zarr stores)."""
    dims = [d for d in PAIRS if d in ds.xindexes]
    return ds.reset_index(dims).drop_vars(dims, errors="ignore") if dims else ds


def _names_of_positions(ds: xr.Dataset) -> xr.Dataset:
    """Results 1.0 stored layers by position (names in attributes): give them names."""
    names = np.asarray(ds.attrs["ntrace"].get("layer_names", []), dtype=str)
    out = {}
    if "layer" in ds.coords and ds["layer"].dtype.kind in "iu":
        out["layer"] = ("layer", names[ds["layer"].values], ds["layer"].attrs)
    if "neuron_layer" in ds.coords and ds["neuron_layer"].dtype.kind in "iu":
        out["neuron_layer"] = ("neuron", names[ds["neuron_layer"].values],
                               ds["neuron_layer"].attrs)
    if "unit_layer" in ds.coords and ds["unit_layer"].dtype.kind in "iu":
        units = np.asarray(ds["unit_layer"].attrs.get("layer_names", []), dtype=str)
        out["unit_layer"] = ("unit", units[ds["unit_layer"].values], ds["unit_layer"].attrs)
    return ds.assign_coords(out) if out else ds


def over_sqrt(x: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """x / √N along the leading checkpoint axis."""
    n = np.sqrt(np.asarray(counts, dtype=np.float64))
    return np.asarray(x) / n.reshape((-1,) + (1,) * (np.ndim(x) - 1))


def var(dims: tuple[str, ...] | str, data: Any, description: str, **attrs: Any
        ) -> xr.Variable:
    """A variable with a one-line description."""
    return xr.Variable(dims, data, attrs={"description": description, **attrs})


def _inside(child: Path, parent: Path) -> bool:
    try:
        child.resolve().relative_to(parent.resolve())
        return True
    except ValueError:
        return False


def is_results_store(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` holds an analysis results store written by ntrace."""
    doc = root_document(path)  # read as a trace's: a regular file inside, bounded
    attrs = doc.get("attributes") if doc is not None else None
    return isinstance(attrs, dict) and isinstance(attrs.get("ntrace"), dict) and \
        attrs["ntrace"].get("node") == NODE


def check_output(path: str | os.PathLike[str], trace_path: str | os.PathLike[str]) -> None:
    """Refuse an output location inside the trace (or containing it): analysis never writes
    into a trace."""
    p, t = Path(path), Path(trace_path)
    if _inside(p, t) or _inside(t, p):
        raise UsageError(f"refusing to write results to {p}: it overlaps the trace {t}; "
                         "choose an output outside the trace directory")


def write_results(ds: xr.Dataset, path: str | os.PathLike[str],
                  trace_path: str | os.PathLike[str] | None = None) -> Path:
    """Write ``ds`` to a new Zarr store at ``path``; replaces only an earlier results store,
    never a trace or any other directory, and never writes inside the trace."""
    p = Path(path)
    if trace_path is not None:
        check_output(p, trace_path)
    if p.exists():
        if not is_results_store(p):
            raise UsageError(f"refusing to overwrite {p}: it is not an ntrace results store; "
                             "remove it yourself or choose another output path")
        shutil.rmtree(p)
    if not p.parent.exists():
        raise UsageError(f"cannot write results {p}: directory {p.parent} does not exist")
    ds = _plain(ds)
    with warnings.catch_warnings():
        # consolidated metadata (for plain xr.open_zarr) and fixed-length strings (layer
        # names) are zarr-python's, not yet the Zarr v3 spec's; ntrace reads both
        warnings.filterwarnings("ignore", "Consolidated metadata", category=UserWarning)
        warnings.filterwarnings("ignore", "The data type .* does not have a Zarr V3",
                                category=FutureWarning)
        ds.to_zarr(p, mode="w-", zarr_format=3, consolidated=True, encoding=_encoding(ds))
    return p


def _encoding(ds: xr.Dataset) -> dict[str, dict[str, Any]]:
    """Core-spec codecs and chunks of about ``CHUNK_BYTES`` along the first axis, so that the
    guarded store that reads traces reads results within its limits (spec/security.md)."""
    out: dict[str, dict[str, Any]] = {}
    for name, v in ds.variables.items():
        enc: dict[str, Any] = {"compressors": [BloscCodec(cname="zstd", clevel=3)]}
        if v.ndim:
            row = max(1, int(np.prod(v.shape[1:])) * v.dtype.itemsize)
            enc["chunks"] = (max(1, min(v.shape[0], CHUNK_BYTES // row)), *v.shape[1:])
        out[str(name)] = enc
    return out


def open_results(path: str | os.PathLike[str]) -> xr.Dataset:
    """Open a results store written by :func:`write_results` (loaded into memory: results
    are small)."""
    p = Path(path)
    if not p.exists():
        raise TraceNotFoundError(f"no results at {p}: the path does not exist")
    if not is_results_store(p):
        raise InvalidTraceError(f"{p} is not an ntrace results store (no 'ntrace' attribute "
                                f"with node '{NODE}'); run 'ntrace analyze' to make one")
    loc = resolve_location(p)  # the trace readers' guarded store: files inside, limits
    try:
        with cancel_on_error():
            ds = xr.open_zarr(loc.store, consolidated=False, zarr_format=3, chunks=None)
            if ds.nbytes > MAX_RESULTS_BYTES:
                raise InvalidTraceError(f"{p}: its arrays declare {ds.nbytes} bytes, more than "
                                        f"the {MAX_RESULTS_BYTES >> 30} GiB ntrace loads of a "
                                        "results store (spec/security.md)")
            ds = ds.load()
    except NtraceError:
        raise
    except Exception as exc:  # zarr and xarray raise many kinds for a damaged store
        raise InvalidTraceError(f"{p}: unreadable results store ({one_line(exc)}); re-run "
                                "'ntrace analyze'") from exc
    finally:
        loc.close()
    version = str(ds.attrs["ntrace"].get("results_version", "0"))
    if version.split(".")[0] != RESULTS_VERSION.split(".")[0]:
        raise InvalidTraceError(f"{p}: results version {version} is not readable by this "
                                f"ntrace (reads {RESULTS_VERSION.split('.')[0]}.x); re-run "
                                "'ntrace analyze'")
    return indexed(_names_of_positions(ds))


def layer_names(ds: xr.Dataset) -> list[str]:
    return list(ds.attrs["ntrace"]["layer_names"])
