"""``ntrace view``: a live web page over traces while they are written."""

from __future__ import annotations

import sys

import click

from ntrace.analyze.options import DOMAINS
from ntrace.cli import Command, handle_errors
from ntrace.cli.options import MAX_DIM
from ntrace.cli.text import visible
from ntrace.errors import UsageError

VIEW_MAX_DIM = 1024  # ntrace.view.live.VIEW_MAX_DIM, without importing torch for --help


@click.command(cls=Command, short_help="Serve a live web page over traces as they are written.")
@click.argument("paths", nargs=-1, required=True)
@click.option("--port", type=click.IntRange(0, 65535), default=5006, show_default=True,
              help="TCP port (0: any free one)")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="address to listen on; any other than 127.0.0.1/localhost is reachable from "
                   "other machines, so the URL then carries a random access token")
@click.option("--domain", type=click.Choice(DOMAINS), default="none", show_default=True,
              help="comparator set H of the hindsight optima: none updates incrementally; "
                   "ball and box are rebuilt from every iterate, so each update re-reads the "
                   "committed prefix")
@click.option("--scales", default=None, metavar="LIST",
              help="comma-separated scales to solve (network, layer, neuron); default: the "
                   "layer and neuron scales the trace supports")
@click.option("--max-dim", type=click.IntRange(1, MAX_DIM), default=VIEW_MAX_DIM,
              show_default=True, help="largest problem solved (parameters of a layer or "
              "neuron); larger layers are left to ntrace analyze, as their dense solves would "
              "repeat at every update")
@click.option("--poll", type=click.FloatRange(0.05, 60), default=0.5, show_default=True,
              help="seconds between looks for new commits")
@handle_errors
def view(paths: tuple[str, ...], port: int, host: str, domain: str, scales: str | None,
         max_dim: int, poll: float) -> None:
    """Serve a web page over the traces PATHS (``.zarr`` directories, ``.zip`` files, URLs,
    or directories searched for them) that updates while they are written.

    The page has a table of the runs (status, task, model, optimizer and hyperparameters,
    rounds, Taylor rounds, size) and, for the runs checked (overlaid), the minibatch loss;
    the Taylor loss at the iterates against the hindsight Taylor optimum; regret / sqrt(N)
    per layer and per neuron (mean +- s.d.) with fitted exponents; and the three exploration
    measures. New rows are analysed incrementally. Only the given traces are read, through
    the same guarded reader as every command, and nothing is written. Needs
    pip install 'ntrace[view]'. Stop with Ctrl-C.
    """
    try:
        from ntrace.view.server import start_view
    except ImportError as exc:
        raise UsageError(f"ntrace view needs Bokeh ({exc.name or exc} is missing): "
                         "pip install 'ntrace[view]'") from exc
    from ntrace.analyze.options import AnalysisOptions, parse_scales
    from ntrace.view.runs import Monitor

    opts = AnalysisOptions(domain=domain, scales=parse_scales(scales), max_dim=max_dim)
    monitor = Monitor(list(paths), opts, poll=poll)
    v = start_view(monitor, host, port)
    if v.token is not None:
        click.echo(f"warning: serving on {visible(host)}, reachable from other machines; "
                   "anyone with the URL below (its token) can see these runs", err=True)
    click.echo(f"ntrace view: {len(monitor.runs)} run(s) at {v.url}")
    sys.stdout.flush()  # the URL is what a script waits for
    try:
        v.run()
    finally:
        v.stop()
