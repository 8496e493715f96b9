"""What ``ntrace info`` shows, computed from metadata and stored sizes (no array data but the
per-round gradient errors of a BatchNorm approximation, one number per layer and round).

Works on every location ``open_trace`` accepts (directory, ``.zip``, fsspec URL); sizes are
those of the stored objects, ``*.partial`` files excluded.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ntrace.format.reader import Trace, open_trace
from ntrace.format.store import stored_sizes


def dir_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes of the files under a local directory, ``*.partial`` files excluded; a file that
    vanishes during the walk (a trace being written) is not counted."""
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            if not f.endswith(".partial"):
                try:
                    total += os.path.getsize(os.path.join(dirpath, f))
                except FileNotFoundError:
                    pass
    return total


@dataclass
class Summary:
    """Rows of text as they come from the trace (not escaped for a terminal), and byte
    counts (not formatted): showing them is the caller's."""

    header: list[tuple[str, str]] = field(default_factory=list)
    layers: list[tuple[str, ...]] = field(default_factory=list)
    # path, dims, shape, dtype, stored bytes, raw bytes
    arrays: list[tuple[str, str, str, str, int, int]] = field(default_factory=list)
    stored: int = 0
    raw: int = 0
    activation_bits_stored: int = 0
    activations: int = 0

    @property
    def ratio(self) -> float:
        return self.raw / max(self.stored, 1)

    @property
    def bits_per_activation(self) -> float:
        return 8 * self.activation_bits_stored / max(self.activations, 1)


def summarize(path: str | os.PathLike[str]) -> Summary:
    """Everything ``ntrace info`` prints about the trace at ``path``."""
    tr = open_trace(path)
    try:
        return _summarize(tr)
    finally:
        tr.close()


def _obj(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _summarize(tr: Trace) -> Summary:
    a = tr.attrs
    run = dict(a.run)  # free-form: any field may be missing or of another type
    opt = _obj(run.get("optimizer"))
    hyper = ", ".join(f"{k}={v}" for k, v in _obj(opt.get("hyperparameters")).items()
                      if k in ("lr", "momentum", "alpha", "betas", "weight_decay", "eps"))
    model = _obj(run.get("model"))
    s = Summary()
    status = a.status + (f" ({a.status_reason})" if a.status_reason else "")
    header = [
        ("trace", str(tr.location or tr.path)),
        ("format", f"{a.format_version} (status {status})"),
        ("task", str(run.get("task") or "—")),
        ("model", f"{len(a.layers)} tracked layers, {model.get('parameters', '?')} parameters, "
                  f"{a.output_size} outputs"),
        ("optimizer", f"{opt.get('name') or '—'} ({hyper})" if hyper else
         str(opt.get("name") or "—")),
        ("loss", f"{a.loss.id} ({a.loss.reduction})"),
        ("rounds", f"{a.commit.rounds} rounds, {a.commit.taylor_rounds} with Taylor data "
                   f"(every {a.sampling.taylor_every}, {a.sampling.samples_per_round} samples), "
                   f"{a.commit.snapshots} probe snapshots of {a.sampling.probe_size} points"),
        ("seed", str(run.get("seed", "—"))),
        ("created", f"{a.created} by ntrace {a.producer.get('ntrace', '?')}, torch "
                    f"{a.producer.get('torch', '?')} on {a.producer.get('device', '?')}"),
    ]
    note = batchnorm_note(tr)
    s.header = header + ([("approximation", note)] if note else [])
    for name, la in tr.layers.items():
        s.layers.append((name, la.kind, f"{la.out_features}×{la.in_features}"
                         + ("+b" if la.bias else ""), la.activation.kind + (
                             f" ({la.activation.function})" if la.activation.function else ""),
                         str(tr.layouts[f"layers/{name}/tracked"].tail[0]), la.jacobian))
    listing = stored_sizes(tr.root.store)  # one listing of the trace
    sizes: dict[str, int] = {}  # stored bytes per array
    for key, size in listing.items():
        parts = key.split("/")
        for n in range(len(parts) - 1, 0, -1):
            if "/".join(parts[:n]) in tr.layouts:
                sizes["/".join(parts[:n])] = sizes.get("/".join(parts[:n]), 0) + size
                break
    for p, lay in tr.layouts.items():
        n = tr.committed(lay.append_dim)
        shape = lay.shape(n)
        raw = int(np.prod(shape)) * np.dtype(lay.dtype).itemsize
        stored = sizes.get(p, 0)
        s.arrays.append((p, ",".join(lay.dims), "×".join(map(str, shape)) or "scalar", lay.dtype,
                         stored, raw))
        s.raw += raw
        if lay.kind == "bits":
            s.activation_bits_stored += stored
            units = (tr.layers[p.split("/")[1]].out_features if p.startswith("layers/")
                     else (tr.probe_units.total if tr.probe_units else 0))
            s.activations += int(np.prod(shape[:-1])) * units
    s.stored = sum(listing.values())
    return s


def batchnorm_note(tr: Trace) -> str | None:
    """One line on the trace's BatchNorm approximation (spec 'BatchNorm in training mode') and
    the gradient error it measured, from the committed rows; None for exact Taylor data."""
    bn = tr.attrs.batchnorm
    if bn is None:
        return None
    what = (f"BatchNorm in training mode ({len(bn.modules)} modules) with the batch statistics "
            "held fixed")
    worst: tuple[float, float, str] | None = None  # (max, median, layer) of the worst layer
    for name in tr.layers:
        e = tr.read(f"layers/{name}/gradient_error")
        if e.size and (worst is None or float(np.max(e)) > worst[0]):
            worst = (float(np.max(e)), float(np.median(e)), name)
    if worst is None:
        return f"{what}; no Taylor round committed yet"
    return (f"{what}: the Taylor gradient differs from autograd's by up to {worst[0]:.3g} "
            f"(relative; median {worst[1]:.3g}, layer {worst[2]}) over {tr.taylor_rounds} "
            "Taylor rounds (layers/*/gradient_error)")
