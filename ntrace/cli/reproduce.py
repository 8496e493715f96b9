"""``ntrace reproduce``: the paper's experiments, analysed and judged in a report."""

from __future__ import annotations

from typing import Any

import click
from rich.console import Console
from rich.table import Table

from ntrace.cli import Command, handle_errors
from ntrace.cli.options import DEVICE, Subset
from ntrace.cli.progress import Bars
from ntrace.cli.text import markup, plain
from ntrace.reproduce.plan import OPTIMIZERS

MAX_SEEDS = 100  # every seed is a full set of recorded and analysed runs


@click.command(cls=Command, short_help="Reproduce the paper and judge its claims in a report.")
@click.option("--out", "-o", type=click.Path(), default="repro", show_default=True,
              help="output directory (rerunning into it skips finished runs)")
@click.option("--scale", type=click.Choice(["small", "paper", "tiny"]), default="small",
              show_default=True,
              help="small: offline data, < 30 min on 2 CPU cores; paper: full data sets and "
                   "epochs (GPU); tiny: a one-minute smoke test")
@click.option("--data-dir", type=click.Path(), default=None,
              help="folder with MNIST and/or CIFAR-10 files, or with mnist/ and cifar10/ "
                   "subfolders [default: the bundled 8x8 digits]")
@click.option("--seeds", type=click.IntRange(1, MAX_SEEDS), default=1, show_default=True,
              help="seeds per task and optimizer at the chosen learning rate (bands over "
                   f"seeds), at most {MAX_SEEDS}")
@click.option("--device", type=DEVICE, default="cpu", show_default=True)
@click.option("--optimizers", type=Subset(OPTIMIZERS), default="sgd,rmsprop,adam",
              show_default=True,
              help="optimizers to compare (must include sgd)")
@click.option("--no-figures", is_flag=True, help="report without figures")
@handle_errors
def reproduce(out: str, scale: str, data_dir: str | None, seeds: int, device: str,
              optimizers: tuple[str, ...], no_figures: bool) -> None:
    """Reproduce Sec. 2.4 and 3.3 of Balduzzi et al. (ICML 2017): the autoencoder and the
    convnet trained with SGD, RMSProp and Adam (learning rates from a recorded sweep),
    traced, analysed, and each claim of the paper judged in OUT/report.md and report.html."""
    from ntrace.reproduce import make_plan
    from ntrace.reproduce import reproduce as run
    from ntrace.tasks.runner import resolve_device

    resolve_device(device)
    plan = make_plan(scale, data_dir, seeds, device, optimizers)
    console = Console(stderr=True)
    with Bars(console, outer="jobs",
              describe=lambda p: p.label if p.stage == "jobs" else f"  {p.label}") as bars:
        rep = run(out, plan, bars, figures=not no_figures)
    _print(Console(), rep)
    console.print(f"report: {markup(rep.files[0])} and {markup(rep.files[1])} "
                  f"({rep.seconds / 60:.1f} min; {rep.skipped} runs reused)")


def _print(console: Console, rep: Any) -> None:
    colors = {"supported": "green", "not supported": "red", "inconclusive": "yellow"}
    t = Table(title="claims", title_justify="left")
    for col in ("#", "claim", "on", "verdict"):
        t.add_column(col, overflow="fold")
    for i, v in enumerate(rep.verdicts, 1):
        t.add_row(str(i), plain(v.statement), plain(v.scope),
                  f"[{colors[v.verdict]}]{v.verdict}[/]")
    console.print(t)
