"""The exit codes of ``ntrace``: one table, shown at the end of ``ntrace --help`` and of every
command's help, and copied into the README (a test keeps that copy equal to
:func:`markdown`). Codes of library errors come from their class in :mod:`ntrace.errors`."""

from __future__ import annotations

from ntrace import errors as E

#: exit codes of failures that are not an :class:`~ntrace.errors.NtraceError`
OS_ERROR, OUT_OF_MEMORY, INTERNAL_ERROR, INTERRUPTED = 11, 14, 15, 130

EXIT_CODES: tuple[tuple[int, str], ...] = (
    (0, "success"),
    (E.NtraceError.exit_code, "invalid trace (`validate`) or corrupt archive (`verify`): "
                              "every reason listed"),
    (E.UsageError.exit_code, "bad option or argument (out of its range, unknown command or "
                             "option)"),
    (E.TraceNotFoundError.exit_code, "trace not found"),
    (E.TraceExistsError.exit_code, "output exists (use `--overwrite`), or another process is "
                                   "writing it (named)"),
    (E.InvalidTraceError.exit_code, "invalid trace (other commands), including run metadata "
                                    "or a checkpoint that `--resume` cannot use"),
    (E.UnsupportedModelError.exit_code, "unsupported model"),
    (E.DatasetError.exit_code, "data set missing or malformed"),
    (E.NonFiniteLossError.exit_code, "loss became NaN/inf (the trace keeps the earlier rounds, "
                                     "status `aborted`), also when a wrapped script catches "
                                     "the error"),
    (E.LossMismatchError.exit_code, "declared loss disagrees with the trained loss (a wrapped "
                                    "script's loss with extra terms)"),
    (E.WriterError.exit_code, "writer failure"),
    (OS_ERROR, "other OS error"),
    (E.EmptyTraceError.exit_code, "nothing to analyse (no committed Taylor rounds)"),
    (E.ScriptError.exit_code, "the script run by `ntrace record -- python …` exited with a "
                              "non-zero status or raised; its message or traceback is printed "
                              "first, the line names its status (`sys.exit(3)` gives 13, "
                              "never 3)"),
    (OUT_OF_MEMORY, "out of memory"),
    (INTERNAL_ERROR, "internal error, a bug: one line, `NTRACE_DEBUG=1` shows the traceback"),
    (INTERRUPTED, "interrupted (Ctrl-C)"),
)


def markdown() -> str:
    """The table as the README shows it."""
    rows = ["| code | meaning |", "| --- | --- |"]
    rows += [f"| `{code}` | {text} |" for code, text in EXIT_CODES]
    return "\n".join(rows) + "\n"


def help_rows() -> list[tuple[str, str]]:
    """The table as help text shows it (no Markdown)."""
    return [(str(code), text.replace("`", "")) for code, text in EXIT_CODES]
