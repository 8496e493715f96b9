"""The ``ntrace`` command line: parse, call the library, render. Nothing else.

Every :class:`~ntrace.errors.NtraceError` becomes one line on stderr and the exit code of
its class (documented in the README); no traceback is shown for user mistakes.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from ntrace import __version__

F = TypeVar("F", bound=Callable[..., Any])


def fail(message: str, code: int) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def fail_with_reasons(verdict: str, what: str, reasons: list[str]) -> None:
    """``verdict: what: N problem(s)`` and one indented line per reason on stderr; exit 1."""
    click.echo(f"{verdict}: {what}: {len(reasons)} problem(s)", err=True)
    for reason in reasons:
        click.echo(f"  - {reason}", err=True)
    sys.exit(1)


def handle_errors(fn: F) -> F:
    """Turn library errors (and a few OS ones) into one-line messages and exit codes."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from ntrace.errors import NtraceError

        try:
            return fn(*args, **kwargs)
        except NtraceError as exc:
            fail(str(exc), exc.exit_code)
        except KeyboardInterrupt:
            fail("interrupted", 130)
        except MemoryError:
            fail("out of memory; reduce --samples-per-round or the model size", 12)
        except OSError as exc:
            fail(f"{exc.filename or ''}{': ' if exc.filename else ''}{exc.strerror or exc}", 11)

    return wrapper  # type: ignore[return-value]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ntrace")
def main() -> None:
    """Record and analyse Neural Taylor Approximation traces of PyTorch training."""


def _register() -> None:
    from ntrace.cli.inspect import info, validate
    from ntrace.cli.record import record

    main.add_command(record)
    main.add_command(info)
    main.add_command(validate)
    from ntrace.cli.share import pack, verify

    main.add_command(pack)
    main.add_command(verify)
    try:
        from ntrace.cli.analyze import analyze, compare
    except ImportError:  # the analyzer is optional until it is installed
        return
    main.add_command(analyze)
    main.add_command(compare)
    from ntrace.cli.reproduce import reproduce

    main.add_command(reproduce)


_register()
