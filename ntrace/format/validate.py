"""Checking that a trace conforms to the spec (section 'Validation').

``validate_trace`` collects every violation rather than stopping at the first; the reader
runs the structural part on open, ``ntrace validate`` runs all of it. The validator reads each
node's own ``zarr.json`` and never zarr-python's consolidated metadata (spec 'Storage': readers
MUST NOT depend on it); it reports consolidated metadata that disagrees with the nodes, since
zarr-python and xarray use it by default. Data checks read the committed rows one Taylor round
(or one block) at a time, so memory stays bounded.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ntrace.errors import InvalidTraceError, NtraceError
from ntrace.format.bits import pad_bits_clear, unpack
from ntrace.format.metadata import (
    TraceAttrs,
)
from ntrace.format.reader import Trace, load_structure
from ntrace.format.store import open_root

SAMPLE_LOSS_RTOL = 1e-4
MASK_ATOL = 1e-5
BLOCK = 4096
CORE_CODECS = frozenset({"bytes", "transpose", "gzip", "blosc", "crc32c", "sharding_indexed"})


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
    m = out.max(axis=-1, keepdims=True)
    lse = np.log(np.exp(out - m).sum(axis=-1)) + m[..., 0]
    return lse - np.take_along_axis(out, target[..., None].astype(np.int64), axis=-1)[..., 0]


def validate_trace(path: str | os.PathLike[str], deep: bool = True,
                   progress: Callable[[int, int], None] | None = None) -> ValidationReport:
    """Validate the trace at ``path``; ``deep`` also reads and checks every committed row."""
    report = ValidationReport(str(path))
    p = Path(path)
    try:
        root = open_root(p, "r")
        attrs, layers, units, layouts, reasons = load_structure(root, str(path))
    except InvalidTraceError as exc:
        report.reasons += exc.reasons
        return report
    report.attrs = attrs
    report.reasons += reasons
    report.reasons += _check_raw_metadata(p, attrs, layouts)
    if report.reasons:
        return report
    if attrs.status == "aborted":
        report.reasons.append(f"run aborted: {attrs.status_reason or 'no reason recorded'}; its "
                              f"{attrs.commit.rounds} committed rounds remain readable")
    trace = Trace(p, root, attrs, layers, units, layouts)
    if deep:
        try:
            _check_data(trace, report, progress)
        except NtraceError as exc:  # includes a chunk that does not decode (see _Reader)
            report.reasons.append(str(exc))
        except Exception as exc:  # a last resort: report, never crash the validator
            report.reasons.append(f"unreadable data: {type(exc).__name__}: {exc}")
    return report


def _check_raw_metadata(path: Path, attrs: TraceAttrs,
                        layouts: Mapping[str, Any]) -> list[str]:
    """Codecs of the core spec only, and consolidated metadata (if any) that is not stale."""
    r: list[str] = []
    for apath in layouts:
        try:
            meta = json.loads((path / apath / "zarr.json").read_text())
        except (OSError, ValueError):
            continue  # a missing array is reported by the layout check
        names = [c.get("name") for c in meta.get("codecs", []) if isinstance(c, dict)]
        odd = [n for n in names if n not in CORE_CODECS]
        if odd:
            r.append(f"{apath}: codecs {odd} are not Zarr v3 core codecs "
                     f"({', '.join(sorted(CORE_CODECS))})")
    try:
        consolidated = json.loads((path / "zarr.json").read_text()).get("consolidated_metadata")
    except (OSError, ValueError):
        return r
    if attrs.status == "running" or not isinstance(consolidated, dict):
        return r  # readers MUST ignore it while running
    stale = []
    for key, doc in (consolidated.get("metadata") or {}).items():
        try:
            own = json.loads((path / key / "zarr.json").read_text())
        except (OSError, ValueError):
            stale.append(key)
            continue
        strip = {"consolidated_metadata"}
        if {k: v for k, v in own.items() if k not in strip} != \
                {k: v for k, v in doc.items() if k not in strip}:
            stale.append(key)
    if stale:
        more = f" and {len(stale) - 3} more" if len(stale) > 3 else ""
        r.append(f"zarr.json: consolidated metadata disagrees with the node documents of "
                 f"{', '.join(stale[:3])}{more}; zarr-python and xarray read it by default: "
                 "remove it or rerun zarr.consolidate_metadata")
    return r


class _Reader:
    """``Trace.read`` that names the array and rows of a chunk that does not decode."""

    def __init__(self, trace: Trace) -> None:
        self.trace = trace

    def __call__(self, path: str, rows: slice | int | None = None) -> np.ndarray:
        try:
            return self.trace.read(path, rows)
        except NtraceError:
            raise
        except Exception as exc:  # a checksum mismatch, a truncated or undecodable chunk
            where = "" if rows is None else (
                f" rows from {rows.start or 0}" if isinstance(rows, slice) else f" row {rows}")
            raise InvalidTraceError(
                f"{path}:{where} unreadable: {type(exc).__name__}: {exc} (a chunk file is "
                "corrupt or truncated)") from exc


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
    for key in ("sample_loss", "output") + (("target",) if a.loss.id == "mse" else ()):
        if not np.all(np.isfinite(row[key])):
            r.append(f"taylor/{key}: non-finite value in Taylor round {t}")
            return
    if np.any(row["sample_index"] < -1):
        r.append(f"taylor/sample_index: values below -1 in Taylor round {t}")
    if a.loss.id == "cross_entropy" and (row["target"].min() < 0
                                         or row["target"].max() >= a.output_size):
        r.append(f"taylor/target: class index outside [0, {a.output_size}) in Taylor round {t}")
        return
    recomputed = _loss(a.loss.id, row["output"], row["target"])
    if not np.allclose(row["sample_loss"], recomputed, rtol=SAMPLE_LOSS_RTOL, atol=1e-6):
        diff = float(np.abs(row["sample_loss"] - recomputed).max())
        r.append(f"taylor/sample_loss: Taylor round {t} disagrees with the {a.loss.id} loss of "
                 f"output and target (max diff {diff:.3g})")
    prev_out: np.ndarray | None = None
    for name in names:
        la = tr.layers[name]
        g = f"layers/{name}"
        w = read(f"{g}/weight", t)
        x = read(f"{g}/input", t)
        arrays = {"weight": w, "input": x}
        b = read(f"{g}/bias", t) if la.bias else np.zeros(la.out_features, np.float32)
        arrays["bias"] = b
        if la.jacobian == "stored":
            arrays["jacobian"] = read(f"{g}/jacobian", t)
        for key, v in arrays.items():
            if not np.all(np.isfinite(v)):
                r.append(f"{g}/{key}: non-finite value in Taylor round {t}")
                return
        pre = x.astype(np.float64) @ w.T.astype(np.float64) + b
        if prev_out is not None and not np.allclose(x, prev_out, rtol=1e-4, atol=1e-5):
            r.append(f"{g}/input: Taylor round {t} is not the activation of the previous "
                     "layer's pre-activation")
        if la.activation.has_mask:
            packed = read(f"{g}/mask", t)
            if not pad_bits_clear(packed, la.out_features):
                r.append(f"{g}/mask: pad bits set in Taylor round {t}")
            states = unpack(packed, la.out_features)
            wrong = (states != (pre > 0)) & (np.abs(pre) > MASK_ATOL * (1 + np.abs(pre).max()))
            if np.any(wrong):
                r.append(f"{g}/mask: {int(wrong.sum())} states in Taylor round {t} disagree "
                         "with W x + b > 0")
            slope = 0.0 if la.activation.kind == "relu" else float(
                la.activation.negative_slope or 0.0)
            prev_out = np.where(pre > 0, pre, slope * pre)
        else:
            prev_out = pre
    if prev_out is not None and not np.allclose(prev_out, row["output"], rtol=1e-4, atol=1e-4):
        r.append(f"taylor/output: Taylor round {t} is not the last layer's output")
