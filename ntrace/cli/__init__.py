"""The ``ntrace`` command line: parse, call the library, render. Nothing else.

Every :class:`~ntrace.errors.NtraceError` becomes one line on stderr and the exit code of
its class (the table in :mod:`ntrace.cli.exits`, listed by every ``--help`` and the README); no
traceback is shown, for user mistakes or otherwise.
Commands are imported when they are used (:data:`COMMANDS`), so an import error in one of
them fails loudly when that command runs instead of removing it from ``ntrace --help``.
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from ntrace import __version__
from ntrace.cli.exits import INTERNAL_ERROR, INTERRUPTED, OS_ERROR, OUT_OF_MEMORY, help_rows
from ntrace.cli.text import visible

F = TypeVar("F", bound=Callable[..., Any])

#: command name → ``module:attribute`` of its click command, in the order ``--help`` lists them
COMMANDS = {
    "record": "ntrace.cli.record:record",
    "info": "ntrace.cli.inspect:info",
    "validate": "ntrace.cli.inspect:validate",
    "pack": "ntrace.cli.share:pack",
    "verify": "ntrace.cli.share:verify",
    "analyze": "ntrace.cli.analyze:analyze",
    "compare": "ntrace.cli.analyze:compare",
    "reproduce": "ntrace.cli.reproduce:reproduce",
    "view": "ntrace.cli.view:view",
    "tasks": "ntrace.cli.record:tasks",
}


def fail(message: str, code: int) -> None:
    click.echo(f"error: {visible(message)}", err=True)
    sys.exit(code)


def fail_with_reasons(verdict: str, what: str, reasons: list[str]) -> None:
    """``verdict: what: N problem(s)`` and one indented line per reason on stderr; exit 1."""
    click.echo(f"{verdict}: {visible(what)}: {len(reasons)} problem(s)", err=True)
    for reason in reasons:
        click.echo(f"  - {visible(reason)}", err=True)
    sys.exit(1)


def handle_errors(fn: F) -> F:
    """Library errors → one line and the exit code of their class; a few built-in ones → one
    line and a documented code; anything unexpected → one line and exit 15 (set
    NTRACE_DEBUG=1 to see the traceback)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from ntrace.errors import NtraceError, ScriptError

        try:
            return fn(*args, **kwargs)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except ScriptError as exc:  # what the script said, as Python would, then our line
            if exc.detail:
                click.echo(exc.detail.encode("utf-8", "backslashreplace").decode("utf-8"),
                           err=True, nl=not exc.detail.endswith("\n"))
            fail(str(exc), exc.exit_code)
        except NtraceError as exc:
            fail(str(exc), exc.exit_code)
        except KeyboardInterrupt:
            fail("interrupted", INTERRUPTED)
        except MemoryError:
            fail("out of memory; reduce --samples-per-round or the model size", OUT_OF_MEMORY)
        except OSError as exc:
            fail(f"{exc.filename or ''}{': ' if exc.filename else ''}{exc.strerror or exc}",
                 OS_ERROR)
        except Exception as exc:  # a bug: one line for the user, the traceback on request
            if os.environ.get("NTRACE_DEBUG"):
                raise
            msg = str(exc).splitlines()[0] if str(exc) else ""
            fail(f"unexpected {type(exc).__name__}: {msg} (set NTRACE_DEBUG=1 for a traceback "
                 "and please report it)", INTERNAL_ERROR)

    return wrapper  # type: ignore[return-value]


class _UsageError(click.UsageError):
    """A click usage error shown like every other error: one ``error:`` line, exit 2."""

    def show(self, file: Any = None) -> None:
        where = f"; see '{self.ctx.command_path} --help'" if self.ctx is not None else ""
        click.echo(f"error: {visible(self.format_message().rstrip('.'))}{where}", err=True)


class _OneLineUsage:
    """Mixin: the usage errors of parsing become :class:`_UsageError`; the help ends with
    the exit codes."""

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        super().format_epilog(ctx, formatter)  # type: ignore[misc]
        formatter.write_paragraph()
        with formatter.section("Exit codes"):
            formatter.write_dl(help_rows())

    def make_context(self, info_name: str | None, args: list[str],
                     parent: click.Context | None = None, **extra: Any) -> click.Context:
        try:
            return super().make_context(info_name, args, parent, **extra)  # type: ignore[misc]
        except click.UsageError as exc:
            raise _UsageError(exc.format_message(), exc.ctx) from None


class Command(_OneLineUsage, click.Command):
    """A command whose bad options and arguments are one-line errors (``cls=Command``)."""


class _Commands(_OneLineUsage, click.Group):
    """The commands of :data:`COMMANDS`, each imported when it is looked up."""

    def resolve_command(self, ctx: click.Context, args: list[str]) -> Any:
        try:
            return super().resolve_command(ctx, args)
        except click.UsageError as exc:
            raise _UsageError(exc.format_message(), exc.ctx) from None

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module, attr = target.split(":")
        command: click.Command = getattr(importlib.import_module(module), attr)
        return command


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ntrace")
def main() -> None:
    """Record and analyse Neural Taylor Approximation traces of PyTorch training."""
