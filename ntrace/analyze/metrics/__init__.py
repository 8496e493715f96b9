"""Exploration metrics of the probe snapshots, one plugin each (paper section 3.3).

A metric is a :class:`~ntrace.analyze.metrics.base.Metric`: how it is cut into parts, what a
part computes, how the parts combine and which variables it adds to the results Dataset. The
analysis runs every metric in ``METRICS``, in process or as Dask tasks
(:mod:`ntrace.analyze.graph`). To add one, write a module here and list an instance below.
"""

from __future__ import annotations

from ntrace.analyze.metrics.base import Metric
from ntrace.analyze.metrics.changed import ChangedUnits
from ntrace.analyze.metrics.distance import MinDistance
from ntrace.analyze.metrics.switches import SwitchFraction
from ntrace.analyze.metrics.volume import Volume

METRICS: tuple[Metric, ...] = (
    MinDistance(),
    SwitchFraction(),
    Volume(),
    ChangedUnits(),
)

__all__ = ["METRICS", "Metric"]
