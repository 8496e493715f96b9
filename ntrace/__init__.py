"""ntrace: record and analyse Neural Taylor Approximation traces of PyTorch training.

The public API is loaded lazily, so ``import ntrace.format`` never imports torch.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "record": "ntrace.recording.recorder",
    "Recorder": "ntrace.recording.recorder",
    "Sampling": "ntrace.format.metadata",
    "open_trace": "ntrace.format.reader",
    "validate_trace": "ntrace.format.validate",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ntrace' has no attribute {name!r}")
