"""``ntrace view`` is safe by default: loopback only, a token elsewhere, no file served, no
trace written, a hostile trace refused; and it finds exactly the traces it was given."""

from __future__ import annotations

import os
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from click.testing import CliRunner

from ntrace.cli import main
from ntrace.view.runs import Monitor, find_traces

from .helpers import start_view, stop


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _files(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*") if p.is_file()}


def test_help_names_the_safety_defaults() -> None:
    res = CliRunner().invoke(main, ["view", "--help"])
    assert res.exit_code == 0
    assert "127.0.0.1" in res.output and "token" in res.output and "--port" in res.output


def test_loopback_serves_the_page_and_no_file(long_mse: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    runs.mkdir()
    shutil.copytree(long_mse, runs / "mlp.zarr")
    (tmp_path / "secret.txt").write_text("not for the page")
    before = _files(runs)
    proc, url = start_view(str(runs))
    try:
        assert url.startswith("http://127.0.0.1:") and "token" not in url
        status, body = _get(url)
        assert status == 200 and b"ntrace view" in body
        assert b"cdn" not in body.lower()  # Bokeh's own JavaScript, from the wheel
        base = url.rstrip("/")
        for path in ("/mlp.zarr/zarr.json", "/runs/mlp.zarr/zarr.json", "/secret.txt",
                     "/static/../../secret.txt", "/static/..%2f..%2fsecret.txt",
                     "/%2e%2e/secret.txt", "/static/"):
            status, body = _get(base + path)
            assert status in (403, 404), path
            assert b"not for the page" not in body and b"zarr_format" not in body, path
    finally:
        stop(proc)
    assert _files(runs) == before  # read-only: nothing written, nothing touched


def test_another_host_needs_the_token(long_mse: Path) -> None:
    proc, url = start_view(str(long_mse), "--host", "127.0.0.2")
    try:
        assert "?token=" in url
        base, token = url.split("?token=")
        assert len(token) >= 32
        assert _get(base)[0] == 403
        assert _get(base + "?token=" + "x" * len(token))[0] == 403
        status, body = _get(url)
        assert status == 200 and b"ntrace view" in body
    finally:
        stop(proc)
        assert proc.stderr is not None
        err = proc.stderr.read()
    assert "warning: serving on 127.0.0.2, reachable from other machines" in err


def test_finds_the_given_traces_only(long_mse: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "a" / "deep").mkdir(parents=True)
    shutil.copytree(long_mse, root / "a" / "one.zarr")
    shutil.copytree(long_mse, root / "a" / "deep" / "two.zarr")
    (root / "a" / "deep" / "three.zip").write_bytes(b"PK")
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copytree(long_mse, outside / "hidden.zarr")
    os.symlink(outside, root / "a" / "link")  # not followed
    os.symlink(outside / "hidden.zarr", root / "linked.zarr")  # not a trace directory
    found = find_traces([str(root)])
    assert found == [str(root / "a" / "one.zarr"), str(root / "a" / "deep" / "two.zarr"),
                     str(root / "a" / "deep" / "three.zip")]
    assert find_traces([str(root / "a" / "one.zarr"), "s3://bucket/run.zarr",
                        str(root / "a" / "one.zarr")]) == [str(root / "a" / "one.zarr"),
                                                          "s3://bucket/run.zarr"]


def test_a_hostile_trace_is_refused_and_a_missing_one_awaited(long_mse: Path,
                                                             tmp_path: Path) -> None:
    bad = tmp_path / "bad.zarr"
    shutil.copytree(long_mse, bad)
    target = tmp_path / "elsewhere.json"
    target.write_text("{}")
    os.remove(bad / "loss" / "zarr.json")
    os.symlink(target, bad / "loss" / "zarr.json")  # a link out of the trace
    later = tmp_path / "later.zarr"
    mon = Monitor([str(bad), str(later)])
    mon.poll_once()
    rows = {r.label: r.row["status"] for r in mon.runs}
    assert rows["bad.zarr"].startswith("refused: ") and "link" in rows["bad.zarr"]
    assert rows["later.zarr"] == "waiting for the trace"
    assert all(r.dataset is None and len(r.loss) == 0 for r in mon.runs)
    shutil.copytree(long_mse, later)  # the writer publishes it
    mon.poll_once()
    run = mon.runs[1]
    assert run.row["status"] == "complete" and run.row["rounds"] == "90"
    assert len(run.loss) == 90 and run.dataset is not None


@pytest.mark.parametrize("args", [["--port", "70000"], ["--poll", "0"]])
def test_bad_options_are_one_line_errors(args: list[str], tmp_path: Path) -> None:
    res = CliRunner().invoke(main, ["view", str(tmp_path), *args])
    assert res.exit_code == 2 and res.output.startswith("error: ")
