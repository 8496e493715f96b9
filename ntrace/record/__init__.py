"""Recording Taylor traces from PyTorch training (hooks, Jacobians, async writer).

``ntrace.record`` is both this package and the :func:`record` context manager: importing the
package binds it as the attribute ``record`` of ``ntrace``, so the package itself forwards
calls to :func:`record` and ``ntrace.record(model, path, ...)`` works whichever came first.
"""

from __future__ import annotations

import sys
import types
from typing import Any

from ntrace.record.recorder import Recorder, record

__all__ = ["Recorder", "record"]


class _CallablePackage(types.ModuleType):
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return record(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
