"""Recording Taylor traces from PyTorch training (hooks, Jacobians, async writer)."""

from __future__ import annotations

from ntrace.record.recorder import Recorder, record

__all__ = ["Recorder", "record"]
