"""Every option of every command is range-checked by click: a bad value is one `error:` line
naming the option, exit 2, before anything runs or is written."""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest

from ntrace.cli import COMMANDS, Command, main
from ntrace.errors import UsageError
from ntrace.tasks import get_task
from ntrace.tasks.runner import RunOptions, run_task

from .test_errors import check, invoke

RECORD = [  # (arguments, what the one line must say), each a value that ran or crashed before
    (["--lr", "1e308"], "Invalid value for '--lr': 1e+308 is not in the range 0<x<=1000000"),
    (["--lr", "-1"], "Invalid value for '--lr'"),
    (["--lr", "nan"], "Invalid value for '--lr': 'nan' is not a finite number"),
    (["--seed", "-1"], "Invalid value for '--seed': -1 is not in the range"),
    (["--seed", "18446744073709551616"], "Invalid value for '--seed'"),
    (["--device", "meta"], "Invalid value for '--device': 'meta' is not one of cpu, cuda, "
                           "cuda:N"),
    (["--device", "cuda:x"], "Invalid value for '--device'"),
    (["--epochs", "0"], "Invalid value for '--epochs': 0 is not in the range"),
    (["--steps", "0"], "Invalid value for '--steps'"),
    (["--checkpoint-every", "-1"], "Invalid value for '--checkpoint-every'"),
    (["--probe-size", "-1"], "Invalid value for '--probe-size'"),
    (["--probe-size", "100000"], "Invalid value for '--probe-size'"),
    (["--probe-every", "-1"], "Invalid value for '--probe-every'"),
    (["--taylor-every", "-2"], "Invalid value for '--taylor-every'"),
    (["--taylor-every", "0"], "Invalid value for '--taylor-every'"),
    (["--samples-per-round", "0"], "Invalid value for '--samples-per-round'"),
    (["--neurons", "0"], "Invalid value for '--neurons': '0' is neither 'all' nor a count"),
    (["--neurons", "many"], "Invalid value for '--neurons'"),
    (["--max-jacobian-memory", "0"], "Invalid value for '--max-jacobian-memory'"),
    (["--optimizer", "lbfgs"], "Invalid value for '--optimizer'"),
]
ANALYZE = [
    (["--checkpoints", "1000000000"], "Invalid value for '--checkpoints': 1000000000 is not a "
                                      "count from 1 to 1000 (each checkpoint solves every "
                                      "problem again)"),
    (["--checkpoints", "0"], "Invalid value for '--checkpoints'"),
    (["--checkpoints", "4,x"], "Invalid value for '--checkpoints'"),
    (["--checkpoints", "4,-1"], "Invalid value for '--checkpoints'"),
    (["--tol", "1e-300"], "Invalid value for '--tol': 1e-300 is not in the range 1e-10<=x<=1"),
    (["--tol", "nan"], "Invalid value for '--tol'"),
    (["--tol", "0"], "Invalid value for '--tol'"),
    (["--max-iter", "0"], "Invalid value for '--max-iter'"),
    (["--max-dim", "0"], "Invalid value for '--max-dim'"),
    (["--max-memory", "0"], "Invalid value for '--max-memory'"),
    (["--workers", "0"], "Invalid value for '--workers'"),
    (["--device", "meta"], "Invalid value for '--device'"),
]


@pytest.mark.parametrize(("args", "needle"), RECORD)
def test_record_options_are_range_checked(tmp_path: Path, args: list[str], needle: str) -> None:
    out = tmp_path / "t.zarr"
    line = check(invoke("record", "--out", str(out), *args), UsageError.exit_code)
    assert needle in line and line.endswith("see 'main record --help'")
    assert not out.exists()


@pytest.mark.parametrize(("args", "needle"), ANALYZE + [(["--neuron", "-1"], "'--neuron'")])
def test_analyze_options_are_range_checked(tmp_path: Path, args: list[str], needle: str
                                           ) -> None:
    line = check(invoke("analyze", str(tmp_path / "missing.zarr"), "--no-figures", *args),
                 UsageError.exit_code)
    assert needle in line
    assert not (tmp_path / "missing.analysis").exists()


@pytest.mark.parametrize(("args", "needle"), ANALYZE)
def test_compare_options_are_range_checked(tmp_path: Path, args: list[str], needle: str
                                           ) -> None:
    line = check(invoke("compare", "a.zarr", "b.zarr", "--out", str(tmp_path / "cmp"), *args),
                 UsageError.exit_code)
    assert needle in line
    assert not (tmp_path / "cmp").exists()


@pytest.mark.parametrize(("args", "needle"), [
    (["--seeds", "0"], "Invalid value for '--seeds'"),
    (["--seeds", "1000"], "Invalid value for '--seeds'"),
    (["--device", "meta"], "Invalid value for '--device'"),
    (["--optimizers", "sgd,lbfgs"], "Invalid value for '--optimizers': 'lbfgs' is not a "
                                    "comma-separated subset of sgd, rmsprop, adam"),
])
def test_reproduce_options_are_range_checked(tmp_path: Path, args: list[str], needle: str
                                             ) -> None:
    line = check(invoke("reproduce", "--out", str(tmp_path / "r"), *args), UsageError.exit_code)
    assert needle in line
    assert not (tmp_path / "r").exists()


def test_no_numeric_option_is_unbounded() -> None:
    """A plain ``type=int``/``float`` accepts anything: every number needs a range."""
    ctx = click.Context(main)
    unbounded = [f"{name} {p.opts[0]}" for name in COMMANDS
                 for p in main.get_command(ctx, name).params  # type: ignore[union-attr]
                 if p.type in (click.INT, click.FLOAT)]
    assert unbounded == []


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_command_states_its_ranges_in_its_help(name: str) -> None:
    result = invoke(name, "--help")
    assert result.exit_code == 0, result.output
    assert "Show this message and exit." in result.stdout
    if name in ("record", "analyze", "reproduce"):
        assert "--device [cpu|cuda|cuda:N]" in result.stdout
    text = " ".join(result.stdout.split())  # as wrapped for any width
    if name == "record":
        assert "--seed INTEGER RANGE" in text and "0<=x<=9223372036854775807" in text
        assert "--lr FLOAT RANGE learning rate, at most 1e+06 (larger overflows float32" in text
        assert "--neurons all|K" in text
    if name == "analyze":
        assert "at most 1000, as each one solves every problem again" in text


def test_every_command_reports_bad_options_in_one_line() -> None:
    ctx = click.Context(main)
    assert all(isinstance(main.get_command(ctx, name), Command) for name in COMMANDS)


def test_unknown_commands_and_options_are_one_line() -> None:
    line = check(invoke("frobnicate"), UsageError.exit_code)
    assert line == "error: No such command 'frobnicate'; see 'main --help'"
    line = check(invoke("info", "--bogus", "x"), UsageError.exit_code)
    assert "--bogus" in line and line.endswith("; see 'main info --help'")


@pytest.mark.parametrize(("field", "value", "needle"), [
    ("epochs", 0, "nothing to train"),  # trained the task's 50 epochs before
    ("checkpoint_every", -1, "checkpoint_every must be at least 1, found -1"),
    ("probe_size", -1, "probe_size must be at least 0, found -1"),
    ("probe_every", -1, "probe_every must be at least 1, found -1"),
    ("seed", -1, "seed must be from 0 to 2^63-1, found -1"),
    ("device", "meta", "device 'meta' is not one ntrace trains on"),
])
def test_the_library_refuses_the_same_values(tmp_path: Path, field: str, value: object,
                                            needle: str) -> None:
    out = tmp_path / "t.zarr"
    with pytest.raises(UsageError, match=re.escape(needle)):
        run_task(get_task("digits-autoencoder"), RunOptions(out=str(out), **{field: value}))
    assert not out.exists()
