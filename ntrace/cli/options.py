"""Option types and ranges shared by the commands: every value is checked by click before a
command runs, so a bad one is a one-line usage error (exit 2), never a traceback or a run
that does something else than asked (``--epochs 0`` training the default epochs)."""

from __future__ import annotations

import math
import re
from typing import Any

import click

MAX_ROUNDS = 10**9  # steps, and rounds between Taylor rounds, snapshots or checkpoints
MAX_LR = 1e6  # larger steps overflow float32 weights on the first update
MAX_PROBE = 65_536  # probe points: every snapshot stores one bit per point and unit
MAX_MIB = 1 << 20  # memory budgets in MiB: 1 TiB
MAX_CHECKPOINTS = 1000  # analysis checkpoints: each one solves every problem again
MIN_TOL, MAX_TOL = 1e-10, 1.0  # below: float64 sums of float32 data cannot certify it
MAX_ITER = 10**6
MAX_DIM = 65_536  # a dense Hessian of d parameters holds d² float64 values (34 GB here)
MAX_WORKERS = 1024


class FiniteFloat(click.FloatRange):
    """A :class:`click.FloatRange` that also refuses NaN (which compares false with
    everything, so a range alone lets it through) and infinities."""

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> Any:
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return rv


class Device(click.ParamType):
    """``cpu``, ``cuda`` or ``cuda:N``: the device kinds ntrace runs on."""

    name = "device"
    KINDS = ("cpu", "cuda")
    PATTERN = re.compile(r"cpu|cuda(:[0-9]{1,4})?")

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:
        return "[cpu|cuda|cuda:N]"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> Any:
        if not isinstance(value, str) or not self.PATTERN.fullmatch(value):
            self.fail(f"{value!r} is not one of cpu, cuda, cuda:N", param, ctx)
        return value


class Neurons(click.ParamType):
    """``all`` or a count K >= 1 of tracked neurons per layer."""

    name = "all|K"

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:
        return self.name

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> Any:
        if value == "all" or isinstance(value, int):
            return value
        try:
            k = int(value)
        except ValueError:
            k = 0
        if not 1 <= k <= MAX_ROUNDS:
            self.fail(f"{value!r} is neither 'all' nor a count from 1 to {MAX_ROUNDS}", param,
                      ctx)
        return k


class Subset(click.ParamType):
    """A comma-separated subset of a closed set of names (``sgd,adam``), as a tuple."""

    name = "subset"

    def __init__(self, choices: tuple[str, ...]) -> None:
        self.choices = tuple(choices)

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:
        return "[" + ",".join(self.choices) + "]"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> Any:
        if isinstance(value, tuple):
            return value
        names = tuple(n.strip() for n in str(value).split(",") if n.strip())
        odd = [n for n in names if n not in self.choices]
        if odd or not names:
            self.fail(f"{', '.join(map(repr, odd)) or repr(value)} is not a comma-separated "
                      f"subset of {', '.join(self.choices)}", param, ctx)
        return names


class Checkpoints(click.ParamType):
    """A count of log-spaced checkpoints, or comma-separated Taylor-round counts."""

    name = "N|N1,N2,..."

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> Any:
        if isinstance(value, int | tuple):
            return value
        try:
            counts = tuple(int(t) for t in str(value).split(",") if t.strip())
        except ValueError:
            counts = ()
        if not counts:
            self.fail(f"{value!r} is neither a count nor comma-separated Taylor-round counts",
                      param, ctx)
        if "," in str(value):
            if len(counts) > MAX_CHECKPOINTS or min(counts) < 1:
                self.fail(f"give 1 to {MAX_CHECKPOINTS} positive Taylor-round counts, found "
                          f"{len(counts)} from {min(counts)}", param, ctx)
            return counts
        if not 1 <= counts[0] <= MAX_CHECKPOINTS:
            self.fail(f"{counts[0]} is not a count from 1 to {MAX_CHECKPOINTS} (each "
                      "checkpoint solves every problem again)", param, ctx)
        return counts[0]


def rounds(minimum: int = 1) -> click.IntRange:
    return click.IntRange(minimum, MAX_ROUNDS)


def mib() -> click.IntRange:
    return click.IntRange(1, MAX_MIB)


DEVICE = Device()
