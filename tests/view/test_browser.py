"""``ntrace view`` in a real browser (headless Chromium): live charts of a trace that a
background recorder is still writing, overlaid with a finished run.

Needs Playwright's Python package and a system Chromium (Debian's ``chromium``; never a
browser download): CI installs both (``.ci/run``). Where either is missing the test is
skipped, saying which.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from analyze.conftest import mlp, record_run

from ntrace.format.metadata import Sampling
from ntrace.format.reader import open_trace

from .helpers import start_recorder, start_view, stop, wait_for

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]


REQUIRED = bool(os.environ.get("NTRACE_REQUIRE_BROWSER"))
"""Set by CI where it installed Chromium: then a missing piece fails instead of skipping."""


def _skip(reason: str) -> None:
    if REQUIRED:
        pytest.fail(f"{reason}, but NTRACE_REQUIRE_BROWSER is set")
    pytest.skip(reason)


def _playwright():  # type: ignore[no-untyped-def]
    try:
        import playwright.sync_api as api
    except ImportError:
        _skip("Playwright is not installed (pip install -e '.[test]')")
    return api


def _chromium() -> str:
    exe = os.environ.get("NTRACE_CHROMIUM") or shutil.which("chromium") \
        or shutil.which("chromium-browser")
    if exe is None:
        _skip("no Chromium here (apt-get install chromium, or set NTRACE_CHROMIUM)")
    assert exe is not None
    return exe


def _length(page, name: str, column: str) -> int:  # type: ignore[no-untyped-def]
    """Rows of the data source ``name`` in the page's Bokeh document (0 if not there yet)."""
    return int(page.evaluate(
        """([name, column]) => {
            const docs = (window.Bokeh && Bokeh.documents) || [];
            if (!docs.length) return 0;
            const src = docs[0].get_model_by_name(name);
            if (!src || !(column in src.data)) return 0;
            return src.data[column].length;
        }""", [name, column]))


def _cell(page, column: str, row: int) -> str:  # type: ignore[no-untyped-def]
    """One cell of the runs table as the page holds it."""
    return str(page.evaluate(
        "([c, r]) => Bokeh.documents[0].get_model_by_name('runs').data[c][r]", [column, row]))


def _committed(path: Path, what: str = "rounds") -> int:
    try:
        with open_trace(path) as tr:
            return int(getattr(tr, what))
    except Exception:  # not published yet
        return 0


def _last(page, name: str, column: str) -> float:  # type: ignore[no-untyped-def]
    """The last value of a column of a data source (0 if empty)."""
    return float(page.evaluate(
        """([name, column]) => {
            const src = Bokeh.documents[0].get_model_by_name(name);
            const c = src ? src.data[column] : [];
            return c.length ? c[c.length - 1] : 0;
        }""", [name, column]))


def test_live_page_in_headless_chromium(tmp_path: Path) -> None:
    playwright = _playwright()
    exe = _chromium()
    runs = tmp_path / "runs"
    runs.mkdir()
    torch.manual_seed(4)  # a finished run to overlay
    X = torch.randn(64, 6)
    record_run(mlp((6, 5, 6)), runs / "done.zarr", "mse", X, X, 40, 8,
               Sampling(taylor_every=1, samples_per_round=4), probe=X[:16], probe_every=2)
    live, stop_file = runs / "live.zarr", tmp_path / "stop"
    rec = start_recorder(live, stop_file, commit_seconds=1.0)
    view = None
    try:
        wait_for(lambda: _committed(live) >= 40, 120, "the recorder's first commits")
        view, url = start_view(str(runs))
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=exe, args=CHROMIUM_FLAGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url)
            key = {"done.zarr": 0, "live.zarr": 1}  # found in name order
            for name in ("loss", "taylor", "layer_regret", "neuron_regret", "distance",
                         "switches", "volume"):
                col = {"loss": "round", "distance": "round", "switches": "rank",
                       "volume": "rank"}.get(name, "N")
                for k in key.values():
                    wait_for(lambda n=name, k=k, c=col: _length(page, f"{n}:{k}", c) > 0, 60,
                             f"data in chart {name} of run {k}", every=0.1)
            assert _length(page, "runs", "run") == 2  # the table lists both runs
            assert _length(page, f"layer_regret:{key['live.zarr']}", "N") > 3
            # the live run grows: wait for a commit the page has not shown, then for the page
            shown = _length(page, "loss:1", "round")
            before = _committed(live)
            committed = wait_for(lambda: (n := _committed(live)) > max(before, shown) and n,
                                 60, "a new commit", every=0.01)
            t_commit = time.monotonic()
            taylor = _committed(live, "taylor_rounds")
            wait_for(lambda: _length(page, "loss:1", "round") >= committed, 60,
                     "the loss curve to grow", every=0.02)
            latency = time.monotonic() - t_commit
            wait_for(lambda: _last(page, "taylor:1", "N") >= taylor, 120,
                     "the analysis to reach the commit", every=0.02)
            analysed = time.monotonic() - t_commit
            assert _length(page, "loss:1", "round") > shown
            assert _length(page, "loss:0", "round") == 40  # the finished run stays as it was
            wait_for(lambda: int(_cell(page, "rounds", 1)) >= committed, 60,
                     "the table to show the commit")
            assert _cell(page, "status", 1) == "running"
            assert _cell(page, "status", 0) == "complete"
            page.screenshot(path=str(tmp_path / "view.png"), full_page=True)
            browser.close()
        assert (tmp_path / "view.png").stat().st_size > 10_000
        print(f"\npage update latency after a commit: loss curve {latency:.2f} s, analysis "
              f"charts {analysed:.2f} s; screenshot {tmp_path / 'view.png'}")
    finally:
        stop_file.touch()
        if view is not None:
            stop(view)
        rec.wait(timeout=60)


def test_token_page_in_headless_chromium(tmp_path: Path) -> None:
    """Bound to another address, the page works from the URL with its token (the websocket
    carries the cookie the first request set) and not without it."""
    playwright = _playwright()
    exe = _chromium()
    torch.manual_seed(5)
    X = torch.randn(64, 6)
    path = record_run(mlp((6, 5, 6)), tmp_path / "run.zarr", "mse", X, X, 20, 8,
                      Sampling(taylor_every=1, samples_per_round=4))
    view, url = start_view(str(path), "--host", "127.0.0.2")
    try:
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=exe, args=CHROMIUM_FLAGS)
            page = browser.new_page()
            assert page.goto(url.split("?")[0]).status == 403
            page = browser.new_page()
            page.goto(url)
            wait_for(lambda: _length(page, "loss:0", "round") == 20, 60, "the loss curve")
            wait_for(lambda: _length(page, "taylor:0", "N") > 0, 60, "the analysis")
            browser.close()
    finally:
        stop(view)
