"""The runs a view shows: found once under the paths it was given, then polled.

Only the given paths are looked at: a ``.zarr`` directory, a ``.zip`` or a URL names one trace;
another directory is searched (symbolic links not followed, trace directories not entered)
for ``*.zarr`` and ``*.zip`` traces, again at every poll, so a run started later appears. A
given trace that does not exist yet is shown as waiting until its writer publishes it. Every
read goes through :func:`ntrace.format.reader.open_trace` (the guarded store); nothing is
written.

A :class:`Monitor` polls every run: one thread reads the minibatch losses committed since the
last poll and the table row, another brings each run's :class:`~ntrace.view.live.LiveAnalysis`
up to date as fast as it can. What it
publishes (:class:`Run` fields) is replaced, never changed in place, so a page can read it from
another thread.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import xarray as xr

from ntrace.analyze.options import AnalysisOptions
from ntrace.analyze.results import is_results_store
from ntrace.errors import NtraceError, TraceNotFoundError
from ntrace.format.reader import Trace, open_trace
from ntrace.format.sizes import human_bytes
from ntrace.format.summary import summarize
from ntrace.view.live import LiveAnalysis

TRACE_SUFFIXES = (".zarr", ".zip")
EXPLORATION_BUDGET = 0.2
"""Share of a run's analysis time its exploration measures may take while it runs."""

COLUMNS = (("run", "run"), ("status", "status"), ("task", "task"), ("model", "model"),
           ("optimizer", "optimizer and hyperparameters"), ("rounds", "rounds"),
           ("taylor_rounds", "Taylor rounds"), ("size", "size"))
"""The runs table: (key, heading)."""


def _is_url(text: str) -> bool:
    return "://" in text


def _is_trace_dir(path: Path) -> bool:
    return (not path.is_symlink() and path.is_dir() and (path / "zarr.json").is_file()
            and not is_results_store(path))


def find_traces(given: list[str]) -> list[str]:
    """The traces named by or found under ``given`` (in that order, each once)."""
    out: list[str] = []
    for item in given:
        if _is_url(item):
            out.append(item)
            continue
        p = Path(item)
        if p.suffix in TRACE_SUFFIXES or _is_trace_dir(p) or not p.is_dir():
            out.append(item)  # one trace (perhaps not there yet)
            continue
        for dirpath, dirs, files in os.walk(p):  # never follows symbolic links
            here = Path(dirpath)
            keep = []
            for d in sorted(dirs):
                sub = here / d
                if d.endswith(".zarr") and _is_trace_dir(sub):
                    out.append(str(sub))
                elif not d.startswith(".") and not sub.is_symlink() \
                        and not (sub / "zarr.json").exists():
                    keep.append(d)
            dirs[:] = keep
            out += [str(here / f) for f in sorted(files)
                    if f.endswith(".zip") and not (here / f).is_symlink()]
    seen: set[str] = set()
    return [t for t in out if not (t in seen or seen.add(t))]  # type: ignore[func-returns-value]


@dataclass
class Run:
    """One trace on the page; the monitor replaces its fields, pages only read them."""

    key: int
    location: str
    label: str
    live: LiveAnalysis
    row: dict[str, str] = field(default_factory=dict)
    rounds: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    loss: np.ndarray = field(default_factory=lambda: np.zeros(0))
    dataset: xr.Dataset | None = None
    version: int = 0  # bumped whenever ``dataset`` changes
    committed_at: float = 0.0  # monotonic time the monitor first saw the last commit
    analysed_at: float = 0.0  # ... and finished analysing it
    seen: tuple[object, ...] = ()  # the commit, status and error the row was made from
    analysis_error: str | None = None  # why the analysis stopped (shown in the table)


def _row(run: Run, tr: Trace | None, error: str | None) -> dict[str, str]:
    row = dict.fromkeys((k for k, _ in COLUMNS), "")
    row["run"] = run.label
    if tr is None:
        row["status"] = error or "waiting for the trace"
        return row
    s = summarize(tr.location.text if tr.location is not None else tr.path)
    head = dict(s.header)
    a = tr.attrs
    row.update(status=a.status + (f": {error}" if error else ""), task=head.get("task", ""),
               model=head.get("model", ""), optimizer=head.get("optimizer", ""),
               rounds=str(tr.rounds), taylor_rounds=str(tr.taylor_rounds),
               size=human_bytes(s.stored))
    return row


class Monitor:
    """Finds the runs under ``given`` and keeps them up to date, every ``poll`` seconds, on
    a daemon thread (:meth:`start`) or on call (:meth:`poll_once`)."""

    def __init__(self, given: list[str], options: AnalysisOptions | None = None,
                 poll: float = 0.5) -> None:
        self.given = list(given)
        self.options = options or AnalysisOptions(domain="none")
        self.poll = poll
        self.runs: list[Run] = []
        self.table_version = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.scan()

    def scan(self) -> None:
        """Add the traces that appeared under the given paths."""
        known = {r.location for r in self.runs}
        for loc in find_traces(self.given):
            if loc not in known:
                label = Path(loc).name if not _is_url(loc) else loc
                run = Run(len(self.runs), loc, label, LiveAnalysis(loc, self.options,
                                                                 EXPLORATION_BUDGET))
                run.row = _row(run, None, None)
                self.runs = [*self.runs, run]
                self.table_version += 1

    def poll_once(self, analyse: bool = True) -> None:
        """Look for new traces, read every run's new losses and table row, and (``analyse``)
        bring its analysis up to date."""
        self.scan()
        for run in self.runs:
            self._guarded(run, self._read)
            if analyse:
                self._guarded(run, self._analyse)

    def _guarded(self, run: Run, step: Callable[[Run], None]) -> None:
        try:
            step(run)
        except Exception as exc:  # a bug: shown on the page and on stderr, view goes on
            print(f"ntrace view: {run.location}: unexpected {type(exc).__name__}: {exc}",
                  file=sys.stderr)
            self._set_row(run, _row(run, None, f"view error: {type(exc).__name__}: {exc}"))

    def _set_row(self, run: Run, row: dict[str, str]) -> None:
        if row != run.row:
            run.row, self.table_version = row, self.table_version + 1

    def _read(self, run: Run) -> None:
        """The losses committed since the last look, and the table row."""
        try:
            tr = open_trace(run.location)
        except TraceNotFoundError:
            return  # not published yet
        except NtraceError as exc:  # a hostile or broken trace: refused, said so, not read
            self._set_row(run, _row(run, None, f"refused: {exc}"))
            return
        with tr:
            n0, n1 = len(run.loss), tr.rounds
            if n1 > n0:
                now = time.monotonic()
                new = tr.read("loss", slice(n0, n1)).astype(np.float64)
                run.rounds = np.concatenate([run.rounds, np.arange(n0, n1)])
                run.loss = np.concatenate([run.loss, new])
                run.committed_at = now
            seen = (tr.attrs.commit, tr.attrs.status, run.analysis_error)
            if seen != run.seen:  # sizes are summed again only when something was committed
                run.seen = seen
                self._set_row(run, _row(run, tr, run.analysis_error))

    def _analyse(self, run: Run) -> bool:
        """Bring the run's analysis up to the trace's last commit; True if it changed."""
        if run.analysis_error is not None:
            return False
        try:
            tr = open_trace(run.location)
        except NtraceError:
            return False  # not there yet, or refused: the table says which
        with tr:
            try:
                changed = run.live.update(tr)
            except NtraceError as exc:
                run.analysis_error = f"analysis stopped: {exc}"
                return False
        if changed:
            run.dataset = run.live.dataset
            run.analysed_at = time.monotonic()
            run.version += 1
        return changed

    def table(self) -> dict[str, list[str]]:
        """The runs table as columns."""
        runs = self.runs
        return {k: [r.row.get(k, "") for r in runs] for k, _ in COLUMNS}

    def start(self) -> None:
        """Two daemon threads: one reads losses and table rows every ``poll`` seconds, the
        other analyses, run after run, as fast as it can (a slow analysis never holds the
        loss curves back)."""

        def reads() -> None:
            while not self._stop.is_set():
                t0 = time.monotonic()
                self.poll_once(analyse=False)
                self._stop.wait(max(0.0, self.poll - (time.monotonic() - t0)))

        def analyses() -> None:
            while not self._stop.is_set():
                busy = False
                for run in list(self.runs):
                    try:
                        busy |= self._analyse(run)
                    except Exception as exc:  # a bug: said, and this run left alone
                        run.analysis_error = f"view error: {type(exc).__name__}: {exc}"
                        print(f"ntrace view: {run.location}: {run.analysis_error}",
                              file=sys.stderr)
                if not busy:
                    self._stop.wait(self.poll)

        self._threads = [threading.Thread(target=fn, name=f"ntrace-view-{fn.__name__}",
                                          daemon=True) for fn in (reads, analyses)]
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=30)
