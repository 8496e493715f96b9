"""``ntrace analyze`` and ``ntrace compare``: parse, call the analyzer, render with rich."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.table import Table

from ntrace.cli import Command, handle_errors
from ntrace.cli.options import (
    DEVICE,
    MAX_CHECKPOINTS,
    MAX_DIM,
    MAX_ITER,
    MAX_TOL,
    MAX_WORKERS,
    MIN_TOL,
    Checkpoints,
    FiniteFloat,
    mib,
)
from ntrace.cli.progress import Bars
from ntrace.cli.text import markup, plain, visible

F = TypeVar("F", bound=Callable[..., Any])


def _options(domain: str, checkpoints: int | tuple[int, ...], tol: float, max_iter: int,
             scale: str | None, layer: Sequence[str], neuron: Sequence[int], device: str,
             max_dim: int | None, max_memory: int, dynamic: bool, exploration: bool, progress: Any,
             scheduler: str | None = None, workers: int | None = None) -> Any:
    from ntrace.analyze import AnalysisOptions, parse_scales

    return AnalysisOptions(domain=domain, checkpoints=checkpoints, tol=tol,
                           max_iter=max_iter, scales=parse_scales(scale),
                           layers=tuple(layer) or None, neurons=tuple(neuron) or None,
                           device=device, max_dim=max_dim, max_memory=max_memory * 2**20,
                           dynamic=dynamic, exploration=exploration, progress=progress,
                           scheduler=scheduler, workers=workers)


def _fmt(x: float, spec: str = ".4g") -> str:
    import math

    return "–" if x is None or not math.isfinite(x) else format(x, spec)


def summary_table(ds: Any, title: str) -> Table:
    """One row per scale/layer: optimum, regret / √N and exponent at the last checkpoint."""
    import numpy as np

    from ntrace.analyze.results import layer_names

    a = ds.attrs["ntrace"]
    names = layer_names(ds)
    n = int(ds.checkpoint.values[-1])
    t = Table(title=plain(title), title_justify="left",
              caption=f"mean loss at the iterates (cumulative loss / N): "
                      f"{_fmt(float(ds.cumulative_loss.values[-1]) / n)}",
              caption_justify="left")
    for col, just in (("scale", "left"), ("unit", "left"), ("optimum", "right"),
                      ("regret/√N", "right"), ("exponent", "right"),
                      ("gap", "right"), ("ok", "right")):
        t.add_column(col, justify=just, overflow="fold")  # type: ignore[arg-type]

    def conv(status: Any) -> str:
        s = np.asarray(status)
        unbounded = int((s == 2).sum())
        return f"{int((s == 0).sum())}/{s.size}" + (f" ({unbounded} unbounded)"
                                                    if unbounded else "")

    if "network_optimum" in ds:
        t.add_row("network", "all", _fmt(float(ds.network_optimum[-1])),
                  _fmt(float(ds.network_regret_over_sqrt_n[-1])),
                  f"{_fmt(float(ds.network_regret_exponent), '.2f')} "
                  f"[{_fmt(float(ds.network_regret_exponent_low), '.2f')}, "
                  f"{_fmt(float(ds.network_regret_exponent_high), '.2f')}]",
                  _fmt(float(np.nanmax(ds.network_gap.values)), ".1e"),
                  conv(ds.network_status.values))
    if "layer_optimum" in ds:
        for li, name in enumerate(names):
            if name not in a["layer_scale_layers"]:
                continue
            t.add_row("layer", plain(name), _fmt(float(ds.layer_optimum[-1, li])),
                      _fmt(float(ds.layer_regret_over_sqrt_n[-1, li])),
                      f"{_fmt(float(ds.layer_regret_exponent[li]), '.2f')} "
                      f"[{_fmt(float(ds.layer_regret_exponent_low[li]), '.2f')}, "
                      f"{_fmt(float(ds.layer_regret_exponent_high[li]), '.2f')}]",
                      _fmt(float(np.nanmax(ds.layer_gap.values[:, li])), ".1e"),
                      conv(ds.layer_status.values[:, li]))
    if "neuron_optimum" in ds:
        for name in names:
            sel = ds.neuron_layer.values == name
            if not sel.any():
                continue
            e = ds.neuron_regret_exponent.values[sel]
            r = ds.neuron_regret_over_sqrt_n.values[-1, sel]
            fitted = int(np.isfinite(e).sum())
            t.add_row("neurons", plain(f"{name} ×{int(sel.sum())}"),
                      _fmt(float(np.nanmean(ds.neuron_optimum.values[-1, sel]))),
                      f"{_fmt(float(np.nanmean(r)), '.3g')}±{_fmt(float(np.nanstd(r)), '.2g')}",
                      (f"{_fmt(float(np.nanmean(e)), '.2f')}±{_fmt(float(np.nanstd(e)), '.2f')}"
                       f" ({fitted})") if fitted else "–",
                      _fmt(float(np.nanmax(ds.neuron_gap.values[:, sel])), ".1e"),
                      conv(ds.neuron_status.values[:, sel]))
    return t


def _print_summary(console: Console, ds: Any, title: str) -> None:
    import numpy as np

    a = ds.attrs["ntrace"]
    console.print(summary_table(ds, title))
    console.print(f"[dim]domain: {markup(a['domain'])} ({markup(a['domain_definition'])}); "
                  f"tolerance {a['tolerance']:g}; {len(a['checkpoints'])} checkpoints up to "
                  f"N = {a['checkpoints'][-1]}[/]")
    console.print(f"[dim]{markup(a['comparison'])}[/]")
    if "min_distance" in ds:
        frac = ds.min_distance_fraction.values[1:]
        console.print(f"exploration: nearest earlier configuration at "
                      f"{_fmt(float(np.nanmean(frac)), '.3g')} of the bits on average; "
                      f"median switch fraction {_fmt(float(np.median(ds.switch_fraction)), '.3g')}"
                      f"; median log-volume {_fmt(float(np.median(ds.log_volume)), '.4g')}")
    for line in list(a["skipped"]) + list(a["notes"]):
        console.print(f"[yellow]note:[/] {markup(line)}")


_common = [
    click.option("--domain", type=click.Choice(["ball", "box", "none"]), default="ball",
                 show_default=True, help="comparator set H of the hindsight optimum"),
    click.option("--checkpoints", type=Checkpoints(), default="32", show_default=True,
                 help=f"number of log-spaced checkpoints, or comma-separated Taylor-round "
                      f"counts; at most {MAX_CHECKPOINTS}, as each one solves every problem "
                      "again"),
    click.option("--tol", type=FiniteFloat(MIN_TOL, MAX_TOL), default=1e-6, show_default=True,
                 help=f"certified suboptimality each solve must reach (loss units), from "
                      f"{MIN_TOL:g} (float64 sums of float32 data certify no less: solves would "
                      f"only run to --max-iter) to {MAX_TOL:g}"),
    click.option("--max-iter", type=click.IntRange(1, MAX_ITER), default=20000,
                 show_default=True, help="iteration cap of the iterative solvers"),
    click.option("--scale", default=None,
                 help="comma-separated subset of network,layer,neuron [default: all possible]"),
    click.option("--device", type=DEVICE, default="cpu", show_default=True),
    click.option("--max-dim", type=click.IntRange(1, MAX_DIM), default=None,
                 help=f"largest layer/network/neuron problem solved (parameters), at most "
                      f"{MAX_DIM} (a dense Hessian holds d² float64 values) [default: 4096 CPU, "
                      "16384 CUDA]"),
    click.option("--max-memory", type=mib(), default=2048, show_default=True,
                 help="MiB of Taylor data held in memory by cross-entropy and binary logistic "
                      "analyses"),
    click.option("--dynamic", is_flag=True,
                 help="also solve each round's own best response (DYNAMIC regret, neurons)"),
    click.option("--no-exploration", is_flag=True, help="skip the exploration measures"),
    click.option("--scheduler", default=None, metavar="ADDRESS",
                 help="run the solves as Dask tasks on this distributed scheduler (e.g. "
                      "tcp://host:8786); its workers must read the trace path or URL"),
    click.option("--workers", type=click.IntRange(1, MAX_WORKERS), default=None,
                 help="run the solves as Dask tasks on a local cluster of N processes"),
    click.option("--no-figures", is_flag=True, help="write results only, no figures"),
    click.option("--quiet", "-q", is_flag=True, help="no summary table"),
]


def _with_common(fn: F) -> F:
    for opt in reversed(_common):
        fn = opt(fn)
    return fn


@click.command(cls=Command)
@click.argument("trace", type=click.Path())
@click.option("--out", "-o", type=click.Path(), default=None,
              help="output directory [default: TRACE without .zarr + '.analysis']")
@click.option("--layer", multiple=True, help="analyse only this layer (repeatable)")
@click.option("--neuron", type=click.IntRange(min=0), multiple=True,
              help="analyse only this neuron of --layer (repeatable)")
@_with_common
@handle_errors
def analyze(trace: str, out: str | None, layer: tuple[str, ...], neuron: tuple[int, ...],
            domain: str, checkpoints: int | tuple[int, ...], tol: float, max_iter: int,
            scale: str | None,
            device: str, max_dim: int | None, max_memory: int, dynamic: bool,
            no_exploration: bool, scheduler: str | None, workers: int | None,
            no_figures: bool, quiet: bool) -> None:
    """Hindsight Taylor optima, regret and exploration of TRACE.

    Writes OUT/results.zarr (an xarray Dataset) and OUT/figures/*.png|svg. With --scheduler
    or --workers the solves and exploration kernels run as Dask tasks (same results).
    """
    from ntrace.analyze import analyze_trace

    console = Console(stderr=True)
    if not no_figures:
        _plot()  # fail before the analysis, not after it
    out_dir = Path(out) if out else Path(str(Path(trace)).removesuffix("/")
                                         .removesuffix(".zarr") + ".analysis")
    with Bars(console) as bars:
        opts = _options(domain, checkpoints, tol, max_iter, scale, layer, neuron, device,
                        max_dim, max_memory, dynamic, not no_exploration, bars, scheduler,
                        workers)
        _prepare(out_dir, trace)
        ds = analyze_trace(trace, opts, out=out_dir / "results.zarr")
    figs: list[Path] = []
    if not no_figures:
        figs = _plot().make_figures([ds], out_dir / "figures", [_label(ds, trace)])
    if not quiet:
        _print_summary(Console(), ds, f"{trace}: {ds.attrs['ntrace']['loss']}, "
                       f"N = {int(ds.checkpoint[-1])} Taylor rounds")
    click.echo(visible(f"results: {out_dir / 'results.zarr'}" +
                       (f"; figures: {out_dir / 'figures'}" if figs else "")), err=True)


def _plot() -> Any:
    """The figures module, or a usage error naming what to install."""
    from ntrace.errors import UsageError

    try:
        from ntrace import plot
    except ImportError as exc:
        if not (exc.name or "").startswith("matplotlib"):
            raise  # not a missing matplotlib: a bug, reported as one
        raise UsageError(f"figures need matplotlib, a dependency of ntrace ({exc}): pip install "
                         "matplotlib, or pass --no-figures") from None
    return plot


def _prepare(out_dir: Path, *traces: str) -> None:
    from ntrace.analyze.results import check_output
    from ntrace.errors import UsageError

    for t in traces:
        check_output(out_dir, t)
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out {out_dir} exists and is not a directory")
    if not out_dir.parent.exists():
        raise UsageError(f"cannot write to {out_dir}: directory {out_dir.parent} does not exist")
    out_dir.mkdir(exist_ok=True)


def _label(ds: Any, path: str) -> str:
    opt = (ds.attrs["ntrace"].get("optimizer") or {}).get("name")
    return str(opt) if opt else Path(path).name.removesuffix(".zarr")


@click.command(cls=Command,
               short_help="Analyse several traces and overlay them (optimizer comparison).")
@click.argument("inputs", nargs=-1, required=True, type=click.Path())
@click.option("--out", "-o", type=click.Path(), required=True, help="output directory")
@click.option("--label", multiple=True, help="legend label of each input, in order")
@_with_common
@handle_errors
def compare(inputs: tuple[str, ...], out: str, label: tuple[str, ...], domain: str,
            checkpoints: int | tuple[int, ...], tol: float, max_iter: int, scale: str | None,
            device: str, max_dim: int | None, max_memory: int, dynamic: bool, no_exploration: bool,
            scheduler: str | None, workers: int | None, no_figures: bool,
            quiet: bool) -> None:
    """Analyse several traces (e.g. SGD, RMSProp, Adam) and overlay them in one set of
    figures. An input that is already a results store is reused as it is. With --scheduler
    or --workers every trace is analysed on one Dask cluster."""
    from ntrace.analyze import analyze_trace, is_results_store, open_results
    from ntrace.errors import UsageError

    if len(inputs) < 2:
        raise UsageError(f"compare needs at least two traces, found {len(inputs)}; use "
                         "'ntrace analyze' for one")
    if label and len(label) != len(inputs):
        raise UsageError(f"{len(label)} --label values for {len(inputs)} inputs; give one "
                         "per input or none")
    console = Console(stderr=True)
    if not no_figures:
        _plot()
    out_dir = Path(out)
    _prepare(out_dir, *inputs)

    def options(bars: Any) -> Any:
        return _options(domain, checkpoints, tol, max_iter, scale, (), (), device, max_dim,
                        max_memory, dynamic, not no_exploration, bars, scheduler, workers)

    results, labels = [], []
    with contextlib.ExitStack() as stack:
        cluster = None
        if (scheduler is not None or workers is not None) and not all(
                is_results_store(p) for p in inputs):
            from ntrace.analyze.cluster import open_cluster

            with Bars(console) as bars:
                cluster = stack.enter_context(open_cluster(options(bars)))
        for k, path in enumerate(inputs):
            if is_results_store(path):
                ds = open_results(path)
            else:
                with Bars(console, prefix=f"[{k + 1}/{len(inputs)}] ") as bars:
                    ds = analyze_trace(path, options(bars), out=out_dir / f"results_{k}.zarr",
                                       cluster=cluster)
            results.append(ds)
            labels.append(label[k] if label else _label(ds, path))
    seen: dict[str, int] = {}
    for i, lab in enumerate(labels):  # make labels unique
        seen[lab] = seen.get(lab, 0) + 1
        if seen[lab] > 1:
            labels[i] = f"{lab} ({seen[lab]})"
    if not no_figures:
        _plot().make_figures(results, out_dir / "figures", labels)
    if not quiet:
        con = Console()
        for ds, lab in zip(results, labels, strict=True):
            con.print(summary_table(ds, f"{lab}: {ds.attrs['ntrace']['trace']}"))
    click.echo(visible(f"results: {out_dir}" + ("" if no_figures
                                                else f"; figures: {out_dir / 'figures'}")),
               err=True)
