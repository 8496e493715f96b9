"""``ntrace info`` and ``ntrace validate``: look at a trace without analysing it."""

from __future__ import annotations

import click
from rich.console import Console
from rich.table import Table

from ntrace.cli import Command, fail_with_reasons, handle_errors
from ntrace.cli.text import plain, size, visible


@click.command(cls=Command, short_help="Summarise a trace: format, run, layers, arrays and bytes.")
@click.argument("trace", type=click.Path())
@handle_errors
def info(trace: str) -> None:
    """Summarise a trace: format, run, layers, arrays and bytes on disk."""
    from ntrace.format.summary import summarize

    s = summarize(trace)
    console = Console()
    head = Table.grid(padding=(0, 2))
    head.add_column(style="bold")
    head.add_column()
    for key, value in s.header:
        head.add_row(key, plain(value))
    console.print(head)
    layers = Table(title="tracked layers", title_justify="left")
    for col in ("layer", "kind", "shape", "activation", "tracked", "jacobian"):
        layers.add_column(col)
    for row in s.layers:
        layers.add_row(*map(plain, row))
    console.print(layers)
    arrays = Table(title="arrays", title_justify="left")
    for col, just in (("array", "left"), ("dims", "left"), ("shape", "left"), ("dtype", "left"),
                      ("stored", "right"), ("raw", "right"), ("ratio", "right")):
        arrays.add_column(col, justify=just, overflow="fold")  # type: ignore[arg-type]
    for path, dims, shape, dtype, stored, raw in s.arrays:
        arrays.add_row(*map(plain, (path, dims, shape, dtype)), size(stored), size(raw),
                       f"{raw / stored:.1f}" if stored else "—")
    console.print(arrays)
    console.print(f"[bold]total[/] {size(s.stored)} on disk for {size(s.raw)} of data "
                  f"(compression ×{s.ratio:.1f}); activations at {s.bits_per_activation:.3f} "
                  "bits each")


@click.command(cls=Command, short_help="Check that a trace conforms to the format spec.")
@click.argument("trace", type=click.Path())
@click.option("--quick", is_flag=True, help="check metadata and structure only, not the data")
@handle_errors
def validate(trace: str, quick: bool) -> None:
    """Check that TRACE conforms to the format spec; exit 1 listing every reason if not."""
    from ntrace.cli.progress import Bars
    from ntrace.format.validate import validate_trace

    with Bars(Console(stderr=True)) as bars:
        report = validate_trace(trace, deep=not quick, progress=bars)
    if report.ok:
        a = report.attrs
        assert a is not None
        note = "" if a.status == "complete" else f" (status {a.status}: committed prefix only)"
        click.echo(f"valid: {visible(trace)} conforms to format {a.format_version}; "
                   f"{a.commit.rounds} rounds, {a.commit.taylor_rounds} Taylor rounds, "
                   f"{a.commit.snapshots} snapshots{note}")
        for line in report.notes:
            click.echo(visible(f"note: {line}"))
        return
    fail_with_reasons("invalid", trace, list(report.reasons))
