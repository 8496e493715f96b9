"""``ntrace record``: run a built-in task with the recorder attached."""

from __future__ import annotations

import os
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

from ntrace.cli import Command, handle_errors
from ntrace.cli.options import (
    DEVICE,
    MAX_LR,
    MAX_PROBE,
    FiniteFloat,
    Neurons,
    mib,
    rounds,
)
from ntrace.cli.progress import Bars
from ntrace.cli.text import markup, size
from ntrace.progress import Progress
from ntrace.tasks.runner import MAX_SEED, OPTIMIZERS


@click.command(cls=Command,
               short_help="Train a task (or run a script) and record its Taylor trace.")
@click.option("--task", default=None,
              help="built-in task [default: digits-autoencoder]; not with a command")
@click.option("--out", "out", default=None, help="trace path [default: TASK-OPTIMIZER.zarr]")
@click.option("--optimizer", type=click.Choice(OPTIMIZERS), default="sgd", show_default=True)
@click.option("--lr", type=FiniteFloat(0, MAX_LR, min_open=True), default=None,
              help=f"learning rate, at most {MAX_LR:g} (larger overflows float32 weights) "
                   "[default: per task]")
@click.option("--epochs", type=rounds(), default=None, help="epochs [default: per task]")
@click.option("--steps", type=rounds(), default=None, help="train this many rounds instead")
@click.option("--seed", type=click.IntRange(0, MAX_SEED), default=0, show_default=True,
              help="seed of the initialisation, data order and probe (0 to 2^63-1)")
@click.option("--device", type=DEVICE, default="cpu", show_default=True)
@click.option("--data-dir", type=click.Path(), default=None,
              help="directory with the data set's standard files (MNIST IDX)")
@click.option("--overwrite", is_flag=True, help="replace an existing trace at --out")
@click.option("--taylor-every", type=rounds(), default=None,
              help="record Taylor data every k rounds [default: per task]")
@click.option("--samples-per-round", type=click.IntRange(1, MAX_PROBE), default=None,
              help="samples of each recorded minibatch [default: per task]")
@click.option("--neurons", type=Neurons(), default=None,
              help="'all' or K: a seeded sample of K tracked neurons per layer [default: per "
                   "task]")
@click.option("--probe-size", type=click.IntRange(0, MAX_PROBE), default=None,
              help=f"probe points for activation configurations, 0 = none, at most {MAX_PROBE} "
                   "(each snapshot stores a bit per point and unit) [default: per task]")
@click.option("--probe-every", type=rounds(), default=None,
              help="rounds between snapshots [default: each epoch, >= 64 per run]")
@click.option("--max-jacobian-memory", type=mib(), default=256, show_default=True,
              help="MiB for one chunk of batched Jacobian products (graph models)")
@click.option("--unsupported", type=click.Choice(["error", "warn", "skip"]), default="error",
              show_default=True, help="what to do with modules ntrace cannot interpret")
@click.option("--batchnorm", type=click.Choice(["fixed-stats"]), default=None,
              help="record BatchNorm in training mode with the batch statistics held fixed, "
                   "an approximation whose gradient error is measured and stored [default: "
                   "refuse it]")
@click.option("--checkpoint-every", type=rounds(), default=None,
              help="rounds between resumable checkpoints [default: at the end of the first "
                   "epoch (or after 5 s), then at most one a minute, and one at the end]")
@click.option("--resume", "resume", type=click.Path(), default=None,
              help="continue the built-in task run recorded in this trace from its last "
                   "checkpoint (a killed run, or a finished one with a larger --steps)")
@click.option("--list-tasks", is_flag=True, help="list the built-in tasks and exit")
@click.option("--list-supported", is_flag=True,
              help="list what is recorded for each module and functional op, and exit")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@handle_errors
def record(task: str, out: str | None, optimizer: str, lr: float | None, epochs: int | None,
           steps: int | None, seed: int, device: str, data_dir: str | None, overwrite: bool,
           taylor_every: int | None, samples_per_round: int | None,
           neurons: str | int | None,
           probe_size: int | None, probe_every: int | None, max_jacobian_memory: int,
           unsupported: str, batchnorm: str | None, checkpoint_every: int | None,
           resume: str | None, list_tasks: bool, list_supported: bool,
           command: tuple[str, ...]) -> None:
    """Train a built-in task and record its Taylor trace, or record an unmodified script:
    ``ntrace record [OPTIONS] -- python train.py [ARGS]`` (or ``-- python -m MODULE``)."""
    from ntrace.errors import UsageError
    from ntrace.format.summary import dir_bytes
    from ntrace.tasks import get_task
    from ntrace.tasks.runner import RunOptions, run_task

    console = Console(stderr=True)
    if list_tasks:
        _print_tasks()
        return
    if list_supported:
        from ntrace.ops import support

        click.echo(support.text())
        return
    if command:
        if task is not None:
            raise UsageError("give --task or a command after '--', not both")
        _record_command(list(command), out or "wrapped.zarr", overwrite, taylor_every,
                        samples_per_round, neurons, probe_size, probe_every,
                        max_jacobian_memory, unsupported, console,
                        None if batchnorm is None else batchnorm.replace("-", "_"))
        return
    if batchnorm is not None:
        raise UsageError("--batchnorm applies to a recorded script (ntrace record --batchnorm "
                         "fixed-stats -- python train.py); the built-in tasks have no BatchNorm")
    if resume is not None:
        from ntrace.tasks.resume import resume_options

        if task is not None or out is not None:
            raise UsageError("--resume continues the trace it names: give neither --task nor "
                             "--out")
        spec, opts = resume_options(resume, steps=steps, epochs=epochs, data_dir=data_dir,
                                    device=device, checkpoint_every=checkpoint_every)
        task, out = spec.name, resume
    else:
        task = task or "digits-autoencoder"
        spec = get_task(task)
        out = out or f"{task}-{optimizer}.zarr"
        sampling = _sampling(spec.sampling, taylor_every, samples_per_round, neurons)
        if sampling.samples_per_round > spec.batch_size:
            raise UsageError(f"--samples-per-round {sampling.samples_per_round} exceeds the "
                             f"batch size {spec.batch_size} of {task}")
        opts = RunOptions(out=out, optimizer=optimizer, lr=lr, epochs=epochs, steps=steps,
                          seed=seed, device=device, data_dir=data_dir, overwrite=overwrite,
                          sampling=sampling, probe_size=probe_size, probe_every=probe_every,
                          max_jacobian_memory=max_jacobian_memory << 20,
                          checkpoint_every=checkpoint_every)
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]:>6.0f} rounds/s  {task.fields[size]:>9s}"),
               TimeRemainingColumn())

    def fields(p: Progress) -> dict[str, Any]:
        return {"rate": p.done / max(p.elapsed or 0.0, 1e-9),
                "size": size(dir_bytes(out)) if os.path.isdir(out) else ""}

    with Bars(console, columns, describe=lambda p: f"recording {task}", fields=fields,
              every=0.25) as bars:
        bars(Progress("rounds", 0, None))
        result = run_task(spec, opts, bars)
    console.print(f"[green]recorded[/] {result.rounds} rounds in {result.seconds:.1f} s, "
                  f"final loss {result.final_loss:.5f} → {markup(out)}")


@click.command(cls=Command, short_help="List the built-in tasks and the data each needs.")
@handle_errors
def tasks() -> None:
    """List the built-in tasks of ``ntrace record --task``: the data each needs (bundled, or
    files under --data-dir), its loss and its training defaults."""
    _print_tasks()


def _print_tasks() -> None:
    import textwrap

    from ntrace.tasks import TASKS

    for task in TASKS.values():
        data = "data: files under --data-dir" if task.needs_data_dir else \
            "data: bundled, no download"
        click.echo(f"{task.name:20s} {data:30s} {task.loss}, batch {task.batch_size}, "
                   f"{task.epochs} epochs")
        click.echo(textwrap.fill(task.description, 88, initial_indent="    ",
                                 subsequent_indent="    "))


def _sampling(defaults: Any, taylor_every: int | None, samples_per_round: int | None,
              neurons: str | int | None) -> Any:
    """The sampling policy: the options given, the defaults for the rest."""
    from ntrace.errors import UsageError
    from ntrace.format.metadata import Sampling

    try:
        return Sampling(
            taylor_every=defaults.taylor_every if taylor_every is None else taylor_every,
            samples_per_round=(defaults.samples_per_round if samples_per_round is None
                               else samples_per_round),
            neurons=defaults.neurons if neurons is None else neurons)
    except ValueError as exc:
        raise UsageError(f"bad sampling option: {exc}") from None


def _record_command(command: list[str], out: str, overwrite: bool, taylor_every: int | None,
                    samples_per_round: int | None, neurons: str | int | None,
                    probe_size: int | None, probe_every: int | None, max_jacobian_memory: int,
                    unsupported: str, console: Console, batchnorm: str | None = None) -> None:
    from ntrace.format.metadata import Sampling
    from ntrace.recording.wrap import WrapOptions, run_wrapped

    sampling = _sampling(Sampling(), taylor_every, samples_per_round, neurons)
    opts = WrapOptions(out=out, sampling=sampling,
                       probe_size=256 if probe_size is None else probe_size,
                       probe_every=10 if probe_every is None else probe_every,
                       overwrite=overwrite, unsupported=unsupported,
                       max_jacobian_memory=max_jacobian_memory << 20, batchnorm=batchnorm)
    result = run_wrapped(command, opts)
    console.print(f"[green]recorded[/] {result.rounds} rounds of {markup(' '.join(command))} → "
                  f"{markup(out)}")
