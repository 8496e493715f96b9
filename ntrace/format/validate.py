"""Checking that a trace conforms to the spec (section 'Validation').

``validate_trace`` collects every violation rather than stopping at the first; the reader
runs the structural part on open, ``ntrace validate`` runs all of it. The validator reads each
node's own ``zarr.json`` and never zarr-python's consolidated metadata (spec 'Storage': readers
MUST NOT depend on it); it reports consolidated metadata that disagrees with the nodes, since
zarr-python and xarray use it by default. Data checks read the committed rows one Taylor round
(or one block) at a time, so memory stays bounded.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ntrace.errors import InvalidTraceError, NtraceError
from ntrace.format.bits import pad_bits_clear, unpack
from ntrace.format.checks import CORE_CODECS  # noqa: F401 - re-exported
from ntrace.format.metadata import (
    CLASS_TARGET_LOSSES,
    TraceAttrs,
)
from ntrace.format.reader import Trace, load_modules, load_structure
from ntrace.format.store import Location, open_location

SAMPLE_LOSS_RTOL = 1e-4
MASK_ATOL = 1e-5
BLOCK = 4096
BLOCK_BYTES = 16 << 20  # rows read at once by the data checks, per array


@dataclass
class ValidationReport:
    """Outcome of a validation: ``reasons`` is empty for a conforming, finished trace."""

    path: str
    reasons: list[str] = field(default_factory=list)
    attrs: TraceAttrs | None = None
    checked_rows: int = 0

    @property
    def ok(self) -> bool:
        return not self.reasons


def _loss(loss_id: str, out: np.ndarray, target: np.ndarray) -> np.ndarray:
    out = out.astype(np.float64)
    if loss_id == "mse":
        return ((out - target) ** 2).mean(axis=-1)
    if loss_id == "bce_with_logits":
        return (np.maximum(out, 0) - out * target + np.log1p(np.exp(-np.abs(out)))).mean(axis=-1)
    picked = np.take_along_axis(out, target[..., None].astype(np.int64), axis=-1)[..., 0]
    if loss_id == "nll":
        return -picked
    m = out.max(axis=-1, keepdims=True)
    lse = np.log(np.exp(out - m).sum(axis=-1)) + m[..., 0]
    return lse - np.take_along_axis(out, target[..., None].astype(np.int64), axis=-1)[..., 0]


def validate_trace(path: str | os.PathLike[str], deep: bool = True,
                   progress: Callable[[int, int], None] | None = None) -> ValidationReport:
    """Validate the trace at ``path`` (a directory, ``.zip`` or fsspec URL); ``deep`` also
    reads and checks every committed row."""
    report = ValidationReport(str(path))
    try:
        loc, root = open_location(path, "r")
    except InvalidTraceError as exc:
        report.reasons += exc.reasons
        return report
    try:
        return _validate(report, loc, root, deep, progress)
    finally:
        loc.close()


def _validate(report: ValidationReport, loc: Location, root: Any, deep: bool,
              progress: Callable[[int, int], None] | None) -> ValidationReport:
    try:
        attrs, layers, units, layouts, reasons = load_structure(root, loc.text)
    except InvalidTraceError as exc:
        report.reasons += exc.reasons
        return report
    report.attrs = attrs
    report.reasons += reasons
    if report.reasons:
        return report
    if attrs.status == "aborted":
        report.reasons.append(f"run aborted: {attrs.status_reason or 'no reason recorded'}; its "
                              f"{attrs.commit.rounds} committed rounds remain readable")
    trace = Trace(loc.path, root, attrs, layers, units, layouts, load_modules(root, attrs)[0],
                  loc)
    if deep:
        try:
            _check_data(trace, report, progress)
        except NtraceError as exc:  # includes a chunk that does not decode (see _Reader)
            report.reasons.append(str(exc))
        except Exception as exc:  # a last resort: report, never crash the validator
            report.reasons.append(f"unreadable data: {type(exc).__name__}: {exc}")
    return report


class _Reader:
    """``Trace.read`` (which names the array and rows of a chunk that does not decode) that
    serves single rows from a cached block of rows aligned with the array's chunks, so each
    chunk is decoded once rather than once per row; a block is at most ``BLOCK_BYTES``."""

    def __init__(self, trace: Trace) -> None:
        self.trace = trace
        self._blocks: dict[str, tuple[int, int, np.ndarray]] = {}

    def __call__(self, path: str, rows: slice | int | None = None) -> np.ndarray:
        n = self.trace.committed(self.trace.layouts[path].append_dim)
        if not isinstance(rows, int) or n is None or not 0 <= rows < n:
            return self.trace.read(path, rows)
        start, stop, block = self._blocks.get(path, (0, 0, np.empty(0)))
        if not start <= rows < stop:
            arr = self.trace.zarr_array(path)
            row_bytes = max(1, int(np.prod(arr.shape[1:])) * arr.dtype.itemsize)
            size = max(1, min(int(arr.chunks[0]), BLOCK_BYTES // row_bytes))
            start = rows - rows % size
            stop = min(start + size, n)
            try:
                block = self.trace.read(path, slice(start, stop))
            except NtraceError:
                return self.trace.read(path, rows)  # the error names the row
            self._blocks[path] = (start, stop, block)
        return block[rows - start]


def _check_data(tr: Trace, report: ValidationReport,
                progress: Callable[[int, int], None] | None) -> None:
    a = tr.attrs
    r = report.reasons
    read = _Reader(tr)
    for start in range(0, tr.rounds, BLOCK):
        block = read("loss", slice(start, start + BLOCK))
        if not np.all(np.isfinite(block)):
            bad = start + int(np.flatnonzero(~np.isfinite(block))[0])
            r.append(f"loss: round {bad} is not finite ({block[bad - start]})")
            break
    ri = read("taylor/round_index")
    if ri.size:
        if np.any(np.diff(ri) <= 0):
            r.append("taylor/round_index: not strictly increasing")
        if ri.min() < 0 or ri.max() >= tr.rounds:
            r.append(f"taylor/round_index: values outside [0, {tr.rounds})")
        off = ri % a.sampling.taylor_every != a.sampling.taylor_offset
        if np.any(off):
            r.append(f"taylor/round_index: round {int(ri[off][0])} breaks the sampling policy "
                     f"(every {a.sampling.taylor_every}, offset {a.sampling.taylor_offset})")
    for name, la in tr.layers.items():
        tracked = read(f"layers/{name}/tracked")
        if tracked.size == 0 or np.any(np.diff(tracked) <= 0) or tracked.min() < 0 \
                or tracked.max() >= la.out_features:
            r.append(f"layers/{name}/tracked: must be sorted, unique and in [0, "
                     f"{la.out_features})")
    names = list(tr.layers)
    total = tr.taylor_rounds + tr.snapshots
    for t in range(tr.taylor_rounds):
        _check_taylor_round(tr, read, t, names, r)
        report.checked_rows += 1
        if progress is not None:
            progress(report.checked_rows, total)
        if len(r) > 50:
            r.append("too many violations; stopping")
            return
    if tr.probe_units is None:
        return
    if not np.all(np.isfinite(read("probe/input"))):
        r.append("probe/input: non-finite value")
    if np.any(read("probe/sample_index") < -1):
        r.append("probe/sample_index: values below -1")
    pr = read("probe/round_index")
    if pr.size and (np.any(np.diff(pr) <= 0) or pr.min() < 0 or pr.max() >= tr.rounds):
        r.append("probe/round_index: must be strictly increasing and within the rounds")
    m = tr.probe_units.total
    for k in range(0, tr.snapshots, 16):
        cfg = read("probe/config", slice(k, k + 16))
        if not pad_bits_clear(cfg, m):
            r.append(f"probe/config: pad bits set in snapshots {k}..{k + len(cfg) - 1}")
        report.checked_rows += len(cfg)
        if progress is not None:
            progress(report.checked_rows, total)


def _check_taylor_round(tr: Trace, read: _Reader, t: int, names: list[str],
                        r: list[str]) -> None:
    a = tr.attrs
    row: dict[str, Any] = {k: read(f"taylor/{k}", t)
                           for k in ("sample_loss", "output", "target", "sample_index")}
    classes = a.loss.id in CLASS_TARGET_LOSSES
    for key in ("sample_loss", "output") + (() if classes else ("target",)):
        if not np.all(np.isfinite(row[key])):
            r.append(f"taylor/{key}: non-finite value in Taylor round {t}")
            return
    if np.any(row["sample_index"] < -1):
        r.append(f"taylor/sample_index: values below -1 in Taylor round {t}")
    if classes and (row["target"].min() < 0
                                         or row["target"].max() >= a.output_size):
        r.append(f"taylor/target: class index outside [0, {a.output_size}) in Taylor round {t}")
        return
    recomputed = _loss(a.loss.id, row["output"], row["target"])
    if not np.allclose(row["sample_loss"], recomputed, rtol=SAMPLE_LOSS_RTOL, atol=1e-6):
        diff = float(np.abs(row["sample_loss"] - recomputed).max())
        r.append(f"taylor/sample_loss: Taylor round {t} disagrees with the {a.loss.id} loss of "
                 f"output and target (max diff {diff:.3g})")
    chain = a.structure == "chain"
    prev_out: np.ndarray | None = None
    for name in names:
        la = tr.layers[name]
        g = f"layers/{name}"
        units = la.shape.units
        arrays = {k: read(f"{g}/{k}", t) for k in ("weight", "input", "bias", "jacobian", "slope")
                  if tr.has(f"{g}/{k}")}
        for key, v in arrays.items():
            if v.dtype.kind == "f" and not np.all(np.isfinite(v)):
                r.append(f"{g}/{key}: non-finite value in Taylor round {t}")
                return
        x, w = arrays["input"], arrays["weight"]
        if la.kind == "embedding" and (x.min(initial=0) < 0 or x.max(initial=0) >= w.shape[0]):
            r.append(f"{g}/input: index outside [0, {w.shape[0]}) in Taylor round {t}")
        masks = {k: read(f"{g}/{k}", t) for k in ("mask", "mask_high") if tr.has(f"{g}/{k}")}
        for key, packed in masks.items():
            if not pad_bits_clear(packed, units):
                r.append(f"{g}/{key}: pad bits set in Taylor round {t}")
        if la.kind != "linear":
            continue  # the data checks below need only numpy for linear layers
        b = arrays.get("bias", np.zeros(la.out_features, np.float32))
        pre = x.astype(np.float64) @ w.T.astype(np.float64) + b
        if chain and prev_out is not None and not np.allclose(x, prev_out, rtol=1e-4, atol=1e-5):
            r.append(f"{g}/input: Taylor round {t} is not the activation of the previous "
                     "layer's pre-activation")
        tol = MASK_ATOL * (1 + np.abs(pre).max())
        act = la.activation
        if "mask" in masks:
            states = unpack(masks["mask"], units)
            wrong = (states != (pre > act.threshold)) & (np.abs(pre - act.threshold) > tol)
            if np.any(wrong):
                r.append(f"{g}/mask: {int(wrong.sum())} states in Taylor round {t} disagree "
                         f"with W x + b > {act.threshold:g}")
        if "mask_high" in masks:
            high = unpack(masks["mask_high"], units)
            wrong = (high != (pre >= float(act.max_val))) & \
                (np.abs(pre - float(act.max_val)) > tol)  # type: ignore[arg-type]
            if np.any(wrong):
                r.append(f"{g}/mask_high: {int(wrong.sum())} states in Taylor round {t} "
                         f"disagree with W x + b >= {act.max_val:g}")
        slope = 0.0 if act.kind == "relu" else float(act.negative_slope or 0.0)
        prev_out = np.where(pre > 0, pre, slope * pre) if act.has_mask else pre
    for name in tr.modules:
        packed = read(f"modules/{name}/state", t)
        if not pad_bits_clear(packed, tr.modules[name].units):
            r.append(f"modules/{name}/state: pad bits set in Taylor round {t}")
    if chain and prev_out is not None and not np.allclose(prev_out, row["output"], rtol=1e-4,
                                                          atol=1e-4):
        r.append(f"taylor/output: Taylor round {t} is not the last layer's output")
