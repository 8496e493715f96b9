"""The one exception hierarchy of ntrace.

Every error a user can cause derives from :class:`NtraceError` and from the built-in
exception it most resembles, so ``except FileNotFoundError`` keeps working for callers
that do not know ntrace. Messages say what was found, what was expected and what to do.
The CLI maps each class to a one-line message and the exit code in ``exit_code``.
"""

from __future__ import annotations


class NtraceError(Exception):
    """Base class of every error ntrace raises on purpose."""

    exit_code = 1


class UsageError(NtraceError, ValueError):
    """Raised when an argument or option has a value ntrace cannot use."""

    exit_code = 2


class TraceNotFoundError(NtraceError, FileNotFoundError):
    """Raised when a path given as a trace does not exist or holds no Zarr group."""

    exit_code = 3


class TraceExistsError(NtraceError, FileExistsError):
    """Raised when the output path exists and overwriting was not asked for."""

    exit_code = 4


class InvalidTraceError(NtraceError, ValueError):
    """Raised when a trace breaks the spec; ``reasons`` lists every violation found."""

    exit_code = 5

    def __init__(self, message: str, reasons: list[str] | None = None) -> None:
        super().__init__(message)
        self.reasons = list(reasons) if reasons else [message]


class UnsupportedVersionError(InvalidTraceError):
    """Raised when a trace has a format major version this ntrace cannot read."""


class UnsupportedModelError(NtraceError, TypeError):
    """Raised when the recorder meets a module or model structure it cannot trace."""

    exit_code = 6


class DatasetError(NtraceError, ValueError):
    """Raised when a data set is missing, malformed or of the wrong shape."""

    exit_code = 7


class NonFiniteLossError(NtraceError, FloatingPointError):
    """Raised when training produces a NaN or infinite loss; recorded rounds are kept."""

    exit_code = 8


class LossMismatchError(NtraceError, ValueError):
    """Raised when the loss the user computes disagrees with the declared loss identifier."""

    exit_code = 9


class WriterError(NtraceError, OSError):
    """Raised when the background trace writer fails (disk full, permissions, ...)."""

    exit_code = 10


class EmptyTraceError(NtraceError, ValueError):
    """Raised when a trace holds no committed rounds of the data an analysis needs."""

    exit_code = 12


class ScriptError(NtraceError, RuntimeError):
    """Raised when a script run by ``ntrace record -- python script.py`` exits with a
    non-zero status or raises an exception of its own; the trace keeps the rounds recorded
    before (status ``aborted``). ``status`` is the exit status Python would have given the
    script, ``detail`` what Python would have printed (its ``sys.exit`` message or its
    traceback). One exit code for every such failure keeps a script's own status from being
    read as one of ntrace's (``sys.exit(3)`` is not "trace not found")."""

    exit_code = 13

    def __init__(self, message: str, status: int, detail: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.detail = detail
