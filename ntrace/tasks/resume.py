"""Rebuilding the options of a built-in task run from its trace, for ``--resume``.

The run metadata and the checkpoint are data someone else may have written: every field used
is checked (type and range) before anything is written to the trace, and a field that does
not fit is an :class:`~ntrace.errors.InvalidTraceError` naming it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from ntrace.errors import InvalidTraceError, UsageError
from ntrace.format.checkpoint import read_checkpoint
from ntrace.format.metadata import parse_float, parse_int, parse_mapping, parse_opt_str, parse_str
from ntrace.format.reader import open_trace
from ntrace.tasks.position import data_position
from ntrace.tasks.registry import TASKS, Task
from ntrace.tasks.runner import MAX_SEED, OPTIMIZERS, RunOptions


def resume_options(path: str | os.PathLike[str], *, steps: int | None = None,
                   epochs: int | None = None, data_dir: str | None = None,
                   device: str | None = None, checkpoint_every: int | None = None
                   ) -> tuple[Task, RunOptions]:
    """The task and options that continue the run recorded at ``path``; ``steps``/``epochs``
    may extend a finished run, ``data_dir``/``device`` may point elsewhere than before."""
    tr = open_trace(path)
    run: Mapping[str, Any] = tr.attrs.run
    if not run.get("task"):
        raise UsageError(f"{path} was not recorded from a built-in task; resume it from your "
                         "own loop with ntrace.record(model, path, resume=True, ...)")
    ck = tr.attrs.checkpoint
    if ck is None:
        raise UsageError(f"{path} holds no checkpoint to resume from: the run stopped before "
                         "its first one (at the end of its first epoch, or after 5 s); record "
                         "it again")
    saved = read_checkpoint(tr.root, ck["slot"])
    try:
        task = TASKS[parse_str(run["task"], "run.task", tuple(TASKS))]
        dataset = parse_mapping(run.get("dataset", {}), "run.dataset")
        size = parse_int(dataset.get("size", 0), "run.dataset.size", 0)
        recorded = parse_int(run.get("steps") or run.get("expected_rounds") or 0, "run.steps", 0)
        lr = run.get("learning_rate")
        if lr is not None and not parse_float(lr, "run.learning_rate") > 0:
            raise InvalidTraceError(f"run.learning_rate: expected a positive number, found {lr}")
        seed = parse_int(run.get("seed", 0), "run.seed", 0)
        if seed > MAX_SEED:
            raise InvalidTraceError(f"run.seed: expected an integer below 2^63, found {seed}")
        opts = RunOptions(
            out=os.fspath(path),
            optimizer=parse_str(run.get("optimizer_choice", "sgd"), "run.optimizer_choice",
                                OPTIMIZERS),
            lr=None if lr is None else float(lr),
            steps=steps if steps is not None else (
                epochs * (size // task.batch_size) if epochs is not None else recorded),
            seed=seed, device=device or "cpu",
            data_dir=data_dir if data_dir is not None else parse_opt_str(
                dataset.get("data_dir"), "run.dataset.data_dir"),
            probe_size=tr.attrs.sampling.probe_size,
            probe_every=tr.attrs.sampling.probe_every or None, resume=True,
            checkpoint_every=checkpoint_every)
        data_position(saved, size, size // task.batch_size)
    except InvalidTraceError as exc:
        raise InvalidTraceError(f"{path}: {exc}; the run cannot be resumed from it") from None
    assert opts.steps is not None
    if opts.steps <= ck["round"]:
        raise UsageError(f"the run already reached round {ck['round']}; pass --steps larger "
                         "than that to extend it")
    return task, opts
