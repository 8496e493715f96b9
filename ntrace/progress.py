"""One progress protocol: long work reports :class:`Progress` events to a callback.

Recording, packing, validating, analysing and reproducing all call ``progress(Progress(...))``
as they advance; the CLI renders the events with rich in one place (``ntrace/cli/progress.py``).
Torch-free and numpy-free, so :mod:`ntrace.format` uses it too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Progress:
    """How far one stage of work has come: ``done`` of ``total`` steps (``None``: unknown).

    ``stage`` names the work (``rounds``, ``validating``, an analysis stage, ``jobs``);
    ``label`` the item within it (a run's name), ``""`` if none; ``elapsed`` the seconds since
    the stage began, where the caller keeps time."""

    stage: str
    done: int
    total: int | None
    label: str = ""
    elapsed: float | None = None


OnProgress = Callable[[Progress], None]
"""A progress callback."""


def quiet(event: Progress) -> None:
    """The callback that ignores every event."""
    del event
