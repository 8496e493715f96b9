"""Checking that a trace conforms to the spec (section 'Validation').

``validate_trace`` collects every violation rather than stopping at the first; the reader
runs the structural part on open, ``ntrace validate`` runs all of it. The validator reads each
node's own ``zarr.json`` and never zarr-python's consolidated metadata (spec 'Storage': readers
MUST NOT depend on it); it reports consolidated metadata that disagrees with the nodes, since
zarr-python and xarray use it by default. Data checks read the committed rows one Taylor round
(or one block) at a time, so memory stays bounded.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
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
from ntrace.format.reader import Trace, load_structure
from ntrace.format.store import Location, open_location
from ntrace.format.summary import batchnorm_note
from ntrace.progress import OnProgress, Progress

SAMPLE_LOSS_RTOL = 1e-4
MASK_ATOL = 1e-5
BLOCK_BYTES = 16 << 20  # rows read at once by the data checks, per array (or one chunk)
CACHED_ARRAYS = 16  # arrays whose current block the row checks keep


@dataclass
class ValidationReport:
    """Outcome of a validation: ``reasons`` is empty for a conforming, finished trace."""

    path: str
    reasons: list[str] = field(default_factory=list)
    attrs: TraceAttrs | None = None
    checked_rows: int = 0
    notes: list[str] = field(default_factory=list)  # facts to show, not violations

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
                   progress: OnProgress | None = None) -> ValidationReport:
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
              progress: OnProgress | None) -> ValidationReport:
    try:
        s = load_structure(root, loc.text)
    except InvalidTraceError as exc:
        report.reasons += exc.reasons
        return report
    report.attrs = attrs = s.attrs
    report.reasons += s.reasons
    if report.reasons:
        return report
    if attrs.status == "aborted":
        report.reasons.append(f"run aborted: {attrs.status_reason or 'no reason recorded'}; its "
                              f"{attrs.commit.rounds} committed rounds remain readable")
    trace = Trace(loc.path, root, attrs, s.layers, s.probe_units, s.layouts, s.modules, loc)
    if deep:
        try:
            _check_data(trace, report, progress)
            note = None if report.reasons else batchnorm_note(trace)
            report.notes += [note] if note else []
        except NtraceError as exc:  # includes a chunk that does not decode (see _Reader)
            report.reasons.append(str(exc))
        except Exception as exc:  # a last resort: report, never crash the validator
            report.reasons.append(f"unreadable data: {type(exc).__name__}: {exc}")
    return report


class _Reader:
    """``Trace.read`` (which names the array and rows of a chunk that does not decode) that
    serves single rows from a cached block of rows aligned with the array's chunks, so each
    chunk is decoded once rather than once per row. A block is one chunk, or ``BLOCK_BYTES``
    where a chunk is one row (chunks of several rows hold at most 16 MiB, spec/security.md);
    blocks of the ``CACHED_ARRAYS`` arrays used last are kept."""

    def __init__(self, trace: Trace) -> None:
        self.trace = trace
        self._blocks: OrderedDict[str, tuple[int, int, np.ndarray]] = OrderedDict()

    def __call__(self, path: str, row: int) -> np.ndarray:
        n = self.trace.length(path)
        if n is None or not 0 <= row < n:
            return self.trace.read(path, row)
        start, stop, block = self._blocks.pop(path, (0, 0, np.empty(0)))
        if not start <= row < stop:
            arr = self.trace.zarr_array(path)
            row_bytes = max(1, math.prod(arr.shape[1:]) * arr.dtype.itemsize)
            size = max(1, min(int(arr.chunks[0]), BLOCK_BYTES // row_bytes))
            start = row - row % size
            stop = min(start + size, n)
            try:
                block = self.trace.read(path, slice(start, stop))
            except NtraceError:
                return self.trace.read(path, row)  # the error names the row
        self._blocks[path] = (start, stop, block)
        while len(self._blocks) > CACHED_ARRAYS:
            self._blocks.popitem(last=False)
        return block[row - start]


def _scan(tr: Trace, path: str) -> tuple[bool, int, int, int]:
    """One pass over an index array in blocks: (strictly increasing, min, max, size)."""
    increasing, lo, hi, last, size = True, 0, -1, None, 0
    for _, block in tr.blocks(path, BLOCK_BYTES):
        if not block.size:
            continue
        b = block.astype(np.int64).ravel()
        if last is not None and b[0] <= last or np.any(np.diff(b) <= 0):
            increasing = False
        lo = int(b.min()) if not size else min(lo, int(b.min()))
        hi = max(hi, int(b.max())) if size else int(b.max())
        last, size = int(b[-1]), size + b.size
    return increasing, lo, hi, size


def _first(tr: Trace, path: str, bad: Callable[[np.ndarray], np.ndarray]) -> int | None:
    """The first row of ``path`` holding an element for which ``bad`` is true."""
    for start, block in tr.blocks(path, BLOCK_BYTES):
        hit = bad(block).reshape(len(block), -1).any(axis=1) if block.ndim else bad(block)
        if np.any(hit):
            return start + int(np.flatnonzero(hit)[0])
    return None


class _Steps:
    """Progress over passes of the Taylor rounds, reported as Taylor rounds checked."""

    def __init__(self, report: ValidationReport, passes: int, rounds: int, total: int,
                 progress: OnProgress | None) -> None:
        self.report, self.passes, self.rounds, self.total = report, passes, rounds, total
        self.progress, self.done = progress, 0

    def step(self) -> None:
        self.done += 1
        rows = self.done // self.passes
        if rows != self.report.checked_rows:
            self.report.checked_rows = rows
            if self.progress is not None:
                self.progress(Progress("validating", rows, self.total))


def _check_data(tr: Trace, report: ValidationReport,
                progress: OnProgress | None) -> None:
    a = tr.attrs
    r = report.reasons
    bad = _first(tr, "loss", lambda b: ~np.isfinite(b))
    if bad is not None:
        r.append(f"loss: round {bad} is not finite ({tr.read('loss', bad)})")
    increasing, lo, hi, size = _scan(tr, "taylor/round_index")
    if size:
        if not increasing:
            r.append("taylor/round_index: not strictly increasing")
        if lo < 0 or hi >= tr.rounds:
            r.append(f"taylor/round_index: values outside [0, {tr.rounds})")
        every, offset = a.sampling.taylor_every, a.sampling.taylor_offset
        off = _first(tr, "taylor/round_index", lambda b: b % every != offset)
        if off is not None:
            r.append(f"taylor/round_index: round {int(tr.read('taylor/round_index', off))} "
                     f"breaks the sampling policy (every {every}, offset {offset})")
    for name, la in tr.layers.items():
        increasing, lo, hi, size = _scan(tr, f"layers/{name}/tracked")
        if not size or not increasing or lo < 0 or hi >= la.out_features:
            r.append(f"layers/{name}/tracked: must be sorted, unique and in [0, "
                     f"{la.out_features})")
    _check_taylor(tr, report, progress)
    if tr.probe_units is None or len(r) > 50:
        return
    if _first(tr, "probe/input", lambda b: ~np.isfinite(b)) is not None:
        r.append("probe/input: non-finite value")
    if _first(tr, "probe/sample_index", lambda b: b < -1) is not None:
        r.append("probe/sample_index: values below -1")
    increasing, lo, hi, size = _scan(tr, "probe/round_index")
    if size and (not increasing or lo < 0 or hi >= tr.rounds):
        r.append("probe/round_index: must be strictly increasing and within the rounds")
    m = tr.probe_units.total
    for k, cfg in tr.blocks("probe/config", BLOCK_BYTES):
        if not pad_bits_clear(cfg, m):
            r.append(f"probe/config: pad bits set in snapshots {k}..{k + len(cfg) - 1}")
        report.checked_rows += len(cfg)
        if progress is not None:
            progress(Progress("validating", report.checked_rows,
                              tr.taylor_rounds + tr.snapshots))


def _check_taylor(tr: Trace, report: ValidationReport,
                  progress: OnProgress | None) -> None:
    """The checks of every Taylor round, one pass per group of arrays checked together (the
    taylor group, then each layer with the one before it, then the modules), so that only a
    few arrays' blocks are held at once and each chunk is decoded at most twice. A round
    found broken in one pass is skipped by the later ones."""
    r = report.reasons
    read = _Reader(tr)
    names = list(tr.layers)
    T = tr.taylor_rounds
    steps = _Steps(report, 1 + len(names) + 1, T, T + tr.snapshots, progress)
    skip: set[int] = set()
    passes: list[Callable[[int], bool]] = [lambda t: _check_taylor_row(tr, read, t, r)]
    passes += [lambda t, i=i: _check_layer_row(tr, read, t, names, i, r)
               for i in range(len(names))]
    passes.append(lambda t: _check_module_row(tr, read, t, r))
    for check in passes:
        for t in range(T):
            if t not in skip and not check(t):
                skip.add(t)
            steps.step()
            if len(r) > 50:
                r.append("too many violations; stopping")
                return
    report.checked_rows = T


def _check_taylor_row(tr: Trace, read: _Reader, t: int, r: list[str]) -> bool:
    """The taylor group's checks of round ``t``; False when later checks of it are moot."""
    a = tr.attrs
    row: dict[str, Any] = {k: read(f"taylor/{k}", t)
                           for k in ("sample_loss", "output", "target", "sample_index")}
    classes = a.loss.id in CLASS_TARGET_LOSSES
    for key in ("sample_loss", "output") + (() if classes else ("target",)):
        if not np.all(np.isfinite(row[key])):
            r.append(f"taylor/{key}: non-finite value in Taylor round {t}")
            return False
    if np.any(row["sample_index"] < -1):
        r.append(f"taylor/sample_index: values below -1 in Taylor round {t}")
    if classes and (row["target"].min() < 0
                                         or row["target"].max() >= a.output_size):
        r.append(f"taylor/target: class index outside [0, {a.output_size}) in Taylor round {t}")
        return False
    recomputed = _loss(a.loss.id, row["output"], row["target"])
    if not np.allclose(row["sample_loss"], recomputed, rtol=SAMPLE_LOSS_RTOL, atol=1e-6):
        diff = float(np.abs(row["sample_loss"] - recomputed).max())
        r.append(f"taylor/sample_loss: Taylor round {t} disagrees with the {a.loss.id} loss of "
                 f"output and target (max diff {diff:.3g})")
    return True


def _activation(tr: Trace, read: _Reader, t: int, name: str) -> np.ndarray:
    """The activation of the linear layer ``name`` in Taylor round ``t``, from its stored
    input, weight and bias."""
    la = tr.layers[name]
    g = f"layers/{name}"
    b = read(f"{g}/bias", t) if tr.has(f"{g}/bias") else np.zeros(la.out_features, np.float32)
    pre = read(f"{g}/input", t).astype(np.float64) @ read(f"{g}/weight", t).T.astype(
        np.float64) + b
    act = la.activation
    slope = 0.0 if act.kind == "relu" else float(act.negative_slope or 0.0)
    return np.where(pre > 0, pre, slope * pre) if act.has_mask else pre


def _check_layer_row(tr: Trace, read: _Reader, t: int, names: list[str], i: int,
                     r: list[str]) -> bool:
    """Layer ``names[i]``'s checks of round ``t`` (for a chain, against layer ``i - 1``, and
    the last layer against ``taylor/output``); False when later checks of it are moot."""
    name = names[i]
    la = tr.layers[name]
    g = f"layers/{name}"
    units = la.shape.units
    arrays = {k: read(f"{g}/{k}", t) for k in ("weight", "input", "bias", "jacobian", "slope")
              if tr.has(f"{g}/{k}")}
    for key, v in arrays.items():
        if v.dtype.kind == "f" and not np.all(np.isfinite(v)):
            r.append(f"{g}/{key}: non-finite value in Taylor round {t}")
            return False
    x, w = arrays["input"], arrays["weight"]
    if la.kind == "embedding" and (x.min(initial=0) < 0 or x.max(initial=0) >= w.shape[0]):
        r.append(f"{g}/input: index outside [0, {w.shape[0]}) in Taylor round {t}")
    if tr.has(f"{g}/gradient_error"):  # +inf allowed: the true gradient is zero (spec 3.4)
        err = read(f"{g}/gradient_error", t)
        if np.isnan(err) or err < 0:
            r.append(f"{g}/gradient_error: {float(err)} in Taylor round {t} is not a relative "
                     "error (a number >= 0)")
    masks = {k: read(f"{g}/{k}", t) for k in ("mask", "mask_high") if tr.has(f"{g}/{k}")}
    for key, packed in masks.items():
        if not pad_bits_clear(packed, units):
            r.append(f"{g}/{key}: pad bits set in Taylor round {t}")
    if la.kind != "linear":
        return True  # the data checks below need only numpy for linear layers
    chain = tr.attrs.structure == "chain"
    b = arrays.get("bias", np.zeros(la.out_features, np.float32))
    pre = x.astype(np.float64) @ w.T.astype(np.float64) + b
    if pre.ndim > 2:  # (1.3) positions: output units neurons first
        pre = np.moveaxis(pre, -1, 1).reshape(len(pre), -1)
    if chain and i > 0 and tr.layers[names[i - 1]].kind == "linear" and not np.allclose(
            x, _activation(tr, read, t, names[i - 1]), rtol=1e-4, atol=1e-5):
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
    if chain and i == len(names) - 1 and not np.allclose(
            _activation(tr, read, t, name), read("taylor/output", t), rtol=1e-4, atol=1e-4):
        r.append(f"taylor/output: Taylor round {t} is not the last layer's output")
    return True


def _check_module_row(tr: Trace, read: _Reader, t: int, r: list[str]) -> bool:
    for name in tr.modules:
        packed = read(f"modules/{name}/state", t)
        if not pad_bits_clear(packed, tr.modules[name].units):
            r.append(f"modules/{name}/state: pad bits set in Taylor round {t}")
    return True
