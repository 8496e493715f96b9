"""Structural checks on the raw node documents, shared by every reader.

``open_trace`` (so ``ntrace info`` and the analyzer), ``validate_trace`` and ``ntrace pack``
all run these through ``reader.load_structure``: arrays use only Zarr v3 core codecs, and a
finished trace's consolidated metadata (if any) agrees with the node documents (spec
'Validation'). Documents come from the trace's :class:`~ntrace.format.safe.GuardedStore`,
which already holds every document zarr read, so these checks read nothing twice.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ntrace.errors import NtraceError
from ntrace.format.limits import CORE_CODECS, codec_names
from ntrace.format.metadata import TraceAttrs
from ntrace.format.safe import document


def check_documents(store: Any, attrs: TraceAttrs, layouts: Mapping[str, Any]) -> list[str]:
    """Codecs of the core spec only, and consolidated metadata (if any) that is not stale."""
    r: list[str] = []
    for apath in layouts:
        try:
            meta = document(store, apath)
        except NtraceError:
            continue  # reported where zarr opened the array
        if meta is None:
            continue  # a missing array is reported by the layout check
        odd = [n for n in codec_names(meta.get("codecs")) if n not in CORE_CODECS]
        if odd:
            r.append(f"{apath}: codecs {odd} are not Zarr v3 core codecs "
                     f"({', '.join(sorted(CORE_CODECS))})")
    if attrs.status == "running":
        return r  # readers MUST ignore consolidated metadata while running
    root = document(store, "") or {}
    consolidated = root.get("consolidated_metadata")
    if not isinstance(consolidated, dict):
        return r
    entries = consolidated.get("metadata")
    if not isinstance(entries, dict):
        return r + ["zarr.json: consolidated_metadata has no 'metadata' object"]
    stale = []
    strip = {"consolidated_metadata"}
    for key, doc in entries.items():
        try:
            own = document(store, str(key))
        except NtraceError:
            own = None
        if own is None or not isinstance(doc, dict) or \
                {k: v for k, v in own.items() if k not in strip} != \
                {k: v for k, v in doc.items() if k not in strip}:
            stale.append(str(key))
    if stale:
        more = f" and {len(stale) - 3} more" if len(stale) > 3 else ""
        r.append(f"zarr.json: consolidated metadata disagrees with the node documents of "
                 f"{', '.join(stale[:3])}{more}; zarr-python and xarray read it by default: "
                 "remove it or rerun zarr.consolidate_metadata")
    return r
