"""ntrace: record and analyse Neural Taylor Approximation traces of PyTorch training."""

from __future__ import annotations

__version__ = "0.1.0"
