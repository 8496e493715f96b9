"""Where the CLI renders the library's :class:`~ntrace.progress.Progress` events with rich."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.progress import Progress as RichProgress

from ntrace.cli.text import markup
from ntrace.progress import Progress

COLUMNS = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
           TimeElapsedColumn())


def _describe(p: Progress) -> str:
    return p.label or p.stage


class Bars:
    """A progress callback drawing one transient bar per stage on ``console`` (nothing when it
    is not a terminal). ``describe`` names a bar from an event; ``fields`` gives the extra
    fields ``columns`` show. Events of the ``outer`` stage hide the other bars (a new job
    begins) and, off a terminal, print their label once. ``every``: the fewest seconds between
    two redraws of a bar before it completes."""

    def __init__(self, console: Console, columns: Sequence[ProgressColumn | str] = COLUMNS,
                 prefix: str = "", describe: Callable[[Progress], str] = _describe,
                 fields: Callable[[Progress], dict[str, Any]] | None = None,
                 outer: str | None = None, every: float = 0.0) -> None:
        self.console = console
        self.bars = RichProgress(*columns, console=console, transient=True,
                                 disable=not console.is_terminal)
        self.prefix, self.describe, self.fields = prefix, describe, fields
        self.outer, self.every = outer, every
        self.tasks: dict[str, Any] = {}
        self.shown: dict[str, float] = {}
        self.last_label: str | None = None

    def __call__(self, p: Progress) -> None:
        now = time.perf_counter()
        if (p.stage in self.tasks and p.done != p.total
                and now - self.shown.get(p.stage, -1e9) < self.every):
            return
        self.shown[p.stage] = now
        drawn = self.console.is_terminal  # off a terminal only the outer stage's labels print
        kw = {} if self.fields is None or not drawn else self.fields(p)
        text = markup(f"{self.prefix}{self.describe(p)}")  # labels hold trace strings
        if p.stage not in self.tasks:
            self.tasks[p.stage] = self.bars.add_task(text, total=p.total, **kw)
        self.bars.update(self.tasks[p.stage], description=text, completed=p.done,
                         total=p.total, visible=True, **kw)
        if p.stage == self.outer:
            for stage, task in self.tasks.items():
                if stage != p.stage:
                    self.bars.update(task, visible=False)
            if not self.console.is_terminal and p.label != self.last_label:
                self.console.print(f"[{p.done}/{p.total}] {text}", highlight=False)
            self.last_label = p.label

    def __enter__(self) -> Bars:
        self.bars.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bars.stop()
