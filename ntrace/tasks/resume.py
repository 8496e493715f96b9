"""Rebuilding the options of a built-in task run from its trace, for ``--resume``."""

from __future__ import annotations

import os
from typing import Any

from ntrace.errors import UsageError
from ntrace.format.reader import open_trace
from ntrace.tasks.registry import Task, get_task
from ntrace.tasks.runner import RunOptions


def resume_options(path: str | os.PathLike[str], *, steps: int | None = None,
                   epochs: int | None = None, data_dir: str | None = None,
                   device: str | None = None, checkpoint_every: int | None = None
                   ) -> tuple[Task, RunOptions]:
    """The task and options that continue the run recorded at ``path``; ``steps``/``epochs``
    may extend a finished run, ``data_dir``/``device`` may point elsewhere than before."""
    tr = open_trace(path)
    run: dict[str, Any] = dict(tr.attrs.run)
    if not run.get("task"):
        raise UsageError(f"{path} was not recorded from a built-in task; resume it from your "
                         "own loop with ntrace.record(model, path, resume=True, ...)")
    task = get_task(str(run["task"]))
    dataset = run.get("dataset") or {}
    total = steps if steps is not None else (
        epochs * (int(dataset.get("size", 0)) // task.batch_size) if epochs is not None
        else int(run.get("steps") or run.get("expected_rounds") or 0))
    ck = tr.attrs.checkpoint
    if ck is None:
        raise UsageError(f"{path} holds no checkpoint to resume from: the run stopped before "
                         "its first one (at the end of its first epoch, or after 5 s); record "
                         "it again")
    if total <= ck["round"]:
        raise UsageError(f"the run already reached round {ck['round']}; pass --steps larger "
                         "than that to extend it")
    opts = RunOptions(out=os.fspath(path), optimizer=str(run.get("optimizer_choice", "sgd")),
                      lr=float(run["learning_rate"]) if "learning_rate" in run else None,
                      steps=total, seed=int(run.get("seed", 0)),
                      device=device or "cpu",
                      data_dir=data_dir if data_dir is not None else dataset.get("data_dir"),
                      probe_size=tr.attrs.sampling.probe_size,
                      probe_every=tr.attrs.sampling.probe_every or None, resume=True,
                      checkpoint_every=checkpoint_every)
    return task, opts
