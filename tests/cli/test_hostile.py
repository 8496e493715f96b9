"""Strings from a trace reach the terminal escaped, and broken input never gives a traceback.

The trace here has layer names with an ESC sequence, rich markup and a right-to-left override,
a task that closes markup it never opened, sets the terminal title and holds a lone surrogate,
and a status reason that would clear the screen: every command must print them as visible
characters (``\\x1b``, ``\\udcff``, ``[blink red]``), styled by nothing. A layer name that is
not valid Unicode cannot be a Zarr key: such a trace is refused in one line.
"""

from __future__ import annotations

import json
import shutil
import unicodedata
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result
from torch import nn

import ntrace
from ntrace.cli import COMMANDS, main
from ntrace.cli.text import visible
from ntrace.errors import InvalidTraceError, TraceNotFoundError, UsageError

from .test_errors import check

NAMES = ("\x1b[31mfc1", "[blink red]fc2", "fc3\u202e")
TASK = "[/bold]\x1b]0;owned\x07\udcff"
REASON = "[/bold] stopped \x1b[2J\udcff"
SHOWN = ("\\x1b[31mfc1", "[blink red]fc2", "fc3\\u202e")  # as they must appear


def run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), env={"COLUMNS": "250"})


def assert_clean(result: Result) -> str:
    """No traceback, no exception, and nothing a terminal would act on or fail to encode."""
    out = result.stdout + result.stderr
    assert "Traceback" not in out and (result.exception is None
                                       or isinstance(result.exception, SystemExit)), out
    odd = {ch for ch in out if ch != "\n" and unicodedata.category(ch) in ("Cc", "Cf", "Cs")}
    assert not odd, sorted(odd)
    return out


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("hostile") / "hostile.zarr"
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict([(NAMES[0], nn.Linear(4, 3)), ("r1", nn.ReLU()),
                                       (NAMES[1], nn.Linear(3, 3)), ("r2", nn.ReLU()),
                                       (NAMES[2], nn.Linear(3, 2))]))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = ntrace.record(model, out, loss="mse", optimizer=opt,
                        sampling=ntrace.Sampling(taylor_every=1, samples_per_round=4),
                        probe=torch.randn(16, 4), probe_every=1, run={"task": TASK})
    for _ in range(8):
        x = torch.randn(8, 4)
        y, t = model(x), torch.zeros(8, 2)
        loss = torch.nn.functional.mse_loss(y, t)
        rec.step(loss, y, t)
        opt.zero_grad()
        loss.backward()
        opt.step()
    rec.close("aborted", REASON)
    (out / "\x1b[7mstray").write_text("")  # a file that belongs to no node
    return out


def test_visible_escapes_what_a_terminal_would_act_on() -> None:
    assert visible("fc1") == "fc1" and visible("a b") == "a b"
    assert visible(NAMES[0]) == SHOWN[0] and visible(NAMES[2]) == SHOWN[2]
    assert visible("fc\udcff") == "fc\\udcff"
    assert visible("line\nbreak\ttab\x7f\x9b") == "line\\nbreak\\ttab\\x7f\\x9b"
    assert visible("\U000e0041") == "\\U000e0041"  # a tag character: invisible


def test_info_shows_every_trace_string_escaped(hostile: Path) -> None:
    result = run("info", str(hostile))
    out = assert_clean(result)
    assert result.exit_code == 0, out
    for shown in SHOWN:
        assert shown in out
    assert visible(TASK) in out and visible(REASON) in out


def test_validate_lists_reasons_escaped(hostile: Path) -> None:
    result = run("validate", str(hostile))
    out = assert_clean(result)
    assert result.exit_code == 1  # aborted
    assert f"  - run aborted: {visible(REASON)}" in out


def test_pack_and_verify_show_names_escaped(hostile: Path, tmp_path: Path) -> None:
    zipped = tmp_path / "h.zip"
    result = run("pack", str(hostile), str(zipped))
    out = assert_clean(result)
    assert result.exit_code == 0, out
    assert "stray file(s) that belong to no node: \\x1b[7mstray" in out
    result = run("verify", str(zipped))
    assert result.exit_code == 0 and "verified:" in assert_clean(result)
    result = run("info", str(zipped))
    assert result.exit_code == 0 and SHOWN[1] in assert_clean(result)


def test_analyze_and_compare_show_names_escaped(hostile: Path, tmp_path: Path) -> None:
    result = run("analyze", str(hostile), "--no-figures", "--checkpoints", "3", "-o",
                 str(tmp_path / "a"))
    out = assert_clean(result)
    assert result.exit_code == 0, out
    for shown in SHOWN:
        assert shown in out
    results = str(tmp_path / "a" / "results.zarr")
    result = run("compare", results, results, "--no-figures", "-o", str(tmp_path / "c"))
    out = assert_clean(result)
    assert result.exit_code == 0, out
    assert SHOWN[1] in out


def test_error_lines_are_escaped(tmp_path: Path) -> None:
    missing = tmp_path / "\x1b[2J[bold]gone\udcff.zarr"
    line = check(run("info", str(missing)), TraceNotFoundError.exit_code)
    assert visible(str(missing)) in line
    assert_clean(run("info", str(missing)))


# -- every command, broken input ------------------------------------------------------------
def _garbled(tmp: Path) -> Path:
    bad = tmp / "garbled.zarr"
    bad.mkdir()
    (bad / "zarr.json").write_text("{ not json")
    return bad


BROKEN = {  # command → (arguments with {bad} for a garbled trace, exit code)
    "record": (["record", "--resume", "{bad}"], InvalidTraceError.exit_code),
    "info": (["info", "{bad}"], InvalidTraceError.exit_code),
    "validate": (["validate", "{bad}"], 1),
    "pack": (["pack", "{bad}", "{tmp}/out.zip"], InvalidTraceError.exit_code),
    "verify": (["verify", "{bad}/zarr.json"], 1),
    "analyze": (["analyze", "{bad}", "--no-figures", "-o", "{tmp}/a"],
                InvalidTraceError.exit_code),
    "compare": (["compare", "{bad}", "{bad}", "--no-figures", "-o", "{tmp}/c"],
                InvalidTraceError.exit_code),
    "reproduce": (["reproduce", "--optimizers", "adam", "--out", "{tmp}/r"],
                  UsageError.exit_code),
    "tasks": (["tasks", "{bad}"], UsageError.exit_code),
    # a view shows a broken trace as refused and serves on: what stops it is a bad option
    "view": (["view", "{bad}", "--scales", "bogus"], UsageError.exit_code),
}


def test_every_command_has_a_broken_input_case() -> None:
    assert set(BROKEN) == set(COMMANDS)


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_input_is_one_line_for_every_command(tmp_path: Path, name: str) -> None:
    bad = _garbled(tmp_path)
    args, code = BROKEN[name]
    result = run(*(a.format(bad=bad, tmp=tmp_path) for a in args))
    assert_clean(result)
    assert result.exit_code == code, result.output
    last = result.stderr.rstrip().splitlines()[-1]
    assert last.startswith("error: ") or (code == 1 and last.startswith("  - ")), result.stderr


def test_a_bug_is_one_line_with_its_own_code(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import ntrace.format.summary

    def broken(path: object) -> None:
        raise KeyError("internal")

    monkeypatch.setattr(ntrace.format.summary, "summarize", broken)
    line = check(run("info", str(tmp_path)), 15)
    assert line == ("error: unexpected KeyError: 'internal' (set NTRACE_DEBUG=1 for a traceback "
                    "and please report it)")


@pytest.mark.parametrize("command", ["info", "validate", "pack", "analyze"])
def test_a_layer_name_that_is_not_unicode_is_refused(hostile: Path, tmp_path: Path,
                                                     command: str) -> None:
    copy = tmp_path / "copy.zarr"
    shutil.copytree(hostile, copy)
    doc = json.loads((copy / "zarr.json").read_text())
    doc["attributes"]["ntrace"]["layers"][2] = "fc\udcff3"  # no UTF-8 key can hold it
    doc.pop("consolidated_metadata", None)
    (copy / "zarr.json").write_text(json.dumps(doc))
    extra = {"pack": [str(tmp_path / "c.zip")], "analyze": ["--no-figures"]}.get(command, [])
    result = run(command, str(copy), *extra)
    out = assert_clean(result)
    assert result.exit_code == (1 if command == "validate" else InvalidTraceError.exit_code), out
    assert "layer name 'fc\\udcff3' must be non-empty, valid Unicode (no lone surrogates)" in out


def test_a_status_reason_of_the_wrong_type_is_one_line(hostile: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy.zarr"
    shutil.copytree(hostile, copy)
    doc = json.loads((copy / "zarr.json").read_text())
    doc["attributes"]["ntrace"]["status_reason"] = {"[bold]": "\x1b"}
    doc.pop("consolidated_metadata", None)
    (copy / "zarr.json").write_text(json.dumps(doc))
    for command in ("info", "validate"):
        result = run(command, str(copy))
        out = assert_clean(result)
        assert result.exit_code in (1, InvalidTraceError.exit_code)
        assert "status_reason: expected a string, found dict" in out
