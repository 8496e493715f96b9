"""Exit codes are one table, listed by ``ntrace --help``, by every command's help and by the
README; ``ntrace tasks`` lists the built-in tasks with the data each needs."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from ntrace import errors
from ntrace.cli import COMMANDS
from ntrace.cli.exits import EXIT_CODES, markdown
from ntrace.tasks import TASKS

from .test_errors import invoke

README = Path(__file__).resolve().parents[2] / "README.md"


def test_the_readme_shows_the_table() -> None:
    assert markdown() in README.read_text()


def test_every_error_class_has_its_code_in_the_table() -> None:
    codes = [code for code, _ in EXIT_CODES]
    assert len(codes) == len(set(codes))
    classes = [c for _, c in inspect.getmembers(errors, inspect.isclass)
               if issubclass(c, errors.NtraceError)]
    assert {c.exit_code for c in classes} <= set(codes)


@pytest.mark.parametrize("args", [[], *([name] for name in COMMANDS)], ids=lambda a: " ".join(a))
def test_every_help_lists_the_exit_codes(args: list[str]) -> None:
    result = invoke(*args, "--help")
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert "Exit codes:" in text
    tail = text[text.index("Exit codes:"):]
    listed = [int(line.split()[0]) for line in tail.splitlines()[1:]
              if line.strip() and line.split()[0].isdigit() and line.startswith("  ")
              and not line.startswith("      ")]
    assert listed == [code for code, _ in EXIT_CODES]


def test_tasks_lists_every_task_with_its_data() -> None:
    result = invoke("tasks")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    for name, task in TASKS.items():
        line = next(x for x in lines if x.startswith(name + " "))
        assert ("--data-dir" in line) == task.needs_data_dir, line
        assert "bundled" in line or task.needs_data_dir
        assert task.loss in line
    assert invoke("record", "--list-tasks").stdout == result.stdout
