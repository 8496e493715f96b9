"""Recording Taylor traces from PyTorch training (hooks, Jacobians, async writer).

The entry point is the function ``ntrace.record`` (:func:`ntrace.recording.recorder.record`),
a plain function: this package is named ``recording`` so that no subpackage shadows it.
"""

from __future__ import annotations

from ntrace.recording.recorder import Recorder, record

__all__ = ["Recorder", "record"]
