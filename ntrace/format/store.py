"""Opening and creating the Zarr store behind a trace, with ntrace's error messages."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import zarr
import zarr.storage

from ntrace.errors import TraceExistsError, TraceNotFoundError, UsageError
from ntrace.format.metadata import ATTR_KEY


def is_trace_dir(path: Path) -> bool:
    """True when ``path`` is a directory whose root ``zarr.json`` carries ntrace attributes."""
    meta = path / "zarr.json"
    if not meta.is_file():
        return False
    try:
        import json

        doc = json.loads(meta.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and ATTR_KEY in (doc.get("attributes") or {})


def prepare_output(path: str | os.PathLike[str], overwrite: bool) -> Path:
    """Make ``path`` ready for a new trace: refuse to clobber anything that is not a trace."""
    p = Path(path)
    if p.exists() or p.is_symlink():
        if not overwrite:
            raise TraceExistsError(
                f"{p} already exists; pass --overwrite (overwrite=True) to replace it, "
                "or choose another output path"
            )
        if p.is_dir() and (is_trace_dir(p) or not any(p.iterdir())):
            shutil.rmtree(p)
        else:
            raise UsageError(
                f"refusing to overwrite {p}: it is not an ntrace trace; remove it yourself "
                "or choose another output path"
            )
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.exists():
        raise UsageError(f"cannot write trace {p}: directory {parent} does not exist")
    if not parent.is_dir():
        raise UsageError(f"cannot write trace {p}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write trace {p}: directory {parent} is not writable")
    return p


def open_root(path: str | os.PathLike[str], mode: str = "r") -> Any:
    """Open the root group of an existing trace; ``mode`` is ``'r'`` or ``'r+'``."""
    p = Path(path)
    if not p.exists():
        raise TraceNotFoundError(f"no trace at {p}: the path does not exist")
    if not (p / "zarr.json").is_file():
        raise TraceNotFoundError(
            f"no trace at {p}: it holds no zarr.json (is it a Zarr v3 store written by ntrace?)"
        )
    store = zarr.storage.LocalStore(p, read_only=(mode == "r"))
    try:
        # spec §2: readers never depend on consolidated metadata (it may be stale)
        return zarr.open_group(store=store, mode=mode, zarr_format=3, use_consolidated=False)
    except Exception as exc:  # zarr raises several kinds for unreadable metadata
        from ntrace.errors import InvalidTraceError

        raise InvalidTraceError(f"{p}: the root group cannot be opened ({exc})") from exc
