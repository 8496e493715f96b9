"""Running a built-in task: train it with the recorder attached."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ntrace.errors import UsageError
from ntrace.format.metadata import Sampling
from ntrace.progress import OnProgress, Progress
from ntrace.recording.recorder import Recorder
from ntrace.tasks.position import data_position
from ntrace.tasks.registry import Task

OPTIMIZERS = ("sgd", "momentum", "rmsprop", "adam", "adagrad")
MAX_SEED = 2**63 - 1  # an int64: every JSON reader of the trace reads it exactly


@dataclass(frozen=True)
class RunOptions:
    """Everything a task run needs besides the task itself (the CLI builds one of these)."""

    out: str
    optimizer: str = "sgd"
    lr: float | None = None
    epochs: int | None = None
    steps: int | None = None
    seed: int = 0
    device: str = "cpu"
    data_dir: str | None = None
    overwrite: bool = False
    sampling: Sampling | None = None  # None: the task's default
    probe_size: int | None = None  # None: the task's default
    probe_every: int | None = None
    max_jacobian_memory: int = 256 << 20
    record: bool = True
    resume: bool = False  # continue the trace at ``out`` from its last checkpoint
    checkpoint_every: int | None = None  # rounds between checkpoints, or by time [default]:
    first_checkpoint_seconds: float = 5.0  # the first at the end of epoch 1 or after this,
    checkpoint_seconds: float = 60.0  # then at most one a minute, and one at the end


@dataclass(frozen=True)
class RunResult:
    rounds: int
    seconds: float
    final_loss: float
    path: str | None


def make_optimizer(name: str, params: Any, lr: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if name == "momentum":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "adagrad":
        return torch.optim.Adagrad(params, lr=lr)
    raise UsageError(f"unknown optimizer {name!r}; choose one of: {', '.join(OPTIMIZERS)}")


def resolve_device(name: str) -> torch.device:
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise UsageError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from exc
    if dev.type not in ("cpu", "cuda"):
        raise UsageError(f"device {name!r} is not one ntrace trains on; use cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {name!r} requested but CUDA is not available here; "
                         "use --device cpu")
    return dev


def run_task(task: Task, opts: RunOptions,
             progress: OnProgress | None = None) -> RunResult:
    """Train ``task`` for the requested epochs/steps, recording to ``opts.out``; ``progress``
    hears ``Progress("rounds", done, total, elapsed=...)`` after each round."""
    if opts.optimizer not in OPTIMIZERS:
        raise UsageError(f"unknown optimizer {opts.optimizer!r}; choose one of: "
                         f"{', '.join(OPTIMIZERS)}")
    if opts.epochs is not None and opts.steps is not None:
        raise UsageError("give --epochs or --steps, not both")
    if not 0 <= opts.seed <= MAX_SEED:
        raise UsageError(f"seed must be from 0 to 2^63-1, found {opts.seed}")
    for name, value, least in (("probe_size", opts.probe_size, 0),
                               ("probe_every", opts.probe_every, 1),
                               ("checkpoint_every", opts.checkpoint_every, 1)):
        if value is not None and value < least:
            raise UsageError(f"{name} must be at least {least}, found {value}")
    lr = opts.lr if opts.lr is not None else task.learning_rates[opts.optimizer]
    if not lr > 0 or not math.isfinite(lr):
        raise UsageError(f"--lr must be a positive number, found {lr}")
    device = resolve_device(opts.device)
    x_np, y_np = task.load(opts.data_dir)
    n = len(x_np)
    bs = task.batch_size
    if n < bs:
        raise UsageError(f"data set has {n} samples, fewer than one batch of {bs}")
    per_epoch = n // bs  # the last partial batch is dropped: every round has bs samples
    total = opts.steps if opts.steps is not None else per_epoch * (
        task.epochs if opts.epochs is None else opts.epochs)
    if total < 1:
        raise UsageError("nothing to train: --steps/--epochs must be at least 1")

    torch.manual_seed(opts.seed)
    gen = torch.Generator().manual_seed(opts.seed)
    model = task.build(tuple(x_np.shape[1:])).to(device)
    optimizer = make_optimizer(opts.optimizer, model.parameters(), lr)
    x = torch.as_tensor(x_np, device=device)
    y = torch.as_tensor(x_np if task.target == "input" else y_np, device=device)
    loss_fn: Callable[..., torch.Tensor] = (torch.nn.functional.mse_loss if task.loss == "mse"
                                            else torch.nn.functional.cross_entropy)
    rec: Recorder | None = None
    if opts.record:
        probe_size = task.probe_size if opts.probe_size is None else opts.probe_size
        probe_idx = np.sort(np.random.default_rng(opts.seed).choice(
            n, size=min(probe_size, n), replace=False)) if probe_size > 0 else None
        rec = Recorder(
            model, opts.out, loss=task.loss, optimizer=optimizer,
            sampling=None if opts.resume else (opts.sampling or task.sampling),
            probe=None if probe_idx is None else x[torch.as_tensor(probe_idx, device=device)],
            probe_index=probe_idx, probe_every=opts.probe_every, expected_rounds=total,
            rounds_per_epoch=per_epoch, overwrite=opts.overwrite,
            max_jacobian_memory=opts.max_jacobian_memory, resume=opts.resume,
            run={"task": task.name, "seed": opts.seed, "batch_size": bs,
                 "epochs": math.ceil(total / per_epoch),
                 "dataset": task.describe_data(x_np, opts.data_dir),
                 "learning_rate": lr, "optimizer_choice": opts.optimizer, "steps": total},
        )
    last_ck = time.perf_counter()
    made_ck = rec is not None and rec.resumed is not None  # the trace holds one already

    def due(done: int) -> bool:
        """Whether to checkpoint before round ``done``: every ``checkpoint_every`` rounds,
        or by default early (end of the first epoch, or after ``first_checkpoint_seconds``)
        so that a run killed early can resume, then at most once per ``checkpoint_seconds``
        (a checkpoint costs a commit and a copy of the training state: spec 'Checkpoints')."""
        if rec is None or done == 0 or (rec.resumed is not None and done <= rec.resumed.round):
            return False
        if opts.checkpoint_every:
            return done % opts.checkpoint_every == 0
        since = time.perf_counter() - last_ck
        if not made_ck:
            return done >= per_epoch or since >= opts.first_checkpoint_seconds
        return since >= opts.checkpoint_seconds
    done, order, first = 0, None, 0
    if rec is not None and rec.resumed is not None:  # continue exactly where it stopped
        done = rec.resumed.round
        first, order, rng = data_position(rec.resumed, n, per_epoch)
        gen.set_state(rng)
    start = time.perf_counter()
    last = float("nan")
    b = first

    def checkpoint() -> None:
        nonlocal last_ck, made_ck
        assert rec is not None and order is not None
        rec.checkpoint({"data.order": order, "data.rng": gen.get_state()},
                       {"epoch_position": b})
        last_ck, made_ck = time.perf_counter(), True

    try:
        while done < total:
            if order is None:
                order, first = torch.randperm(n, generator=gen), 0
            for b in range(first, per_epoch):  # noqa: B007 - checkpoint() reads b
                if done >= total:
                    break
                if due(done):
                    checkpoint()
                idx = order[b * bs:(b + 1) * bs]
                idx_dev = idx.to(device)
                xb, yb = x[idx_dev], y[idx_dev]
                out = model(xb)
                loss = loss_fn(out, yb)
                if rec is not None:
                    rec.step(loss, out, yb, indices=idx)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                done += 1
                if progress is not None:
                    progress(Progress("rounds", done, total,
                                      elapsed=time.perf_counter() - start))
            else:
                b, order = per_epoch, None
        if rec is not None:
            if order is None:  # at an epoch boundary: the next epoch draws a new order
                order, b = torch.randperm(n, generator=gen), 0
            checkpoint()  # so that a finished run can be extended with --resume --steps
            rec.close()
        last = float(loss.detach()) if done else last
    except BaseException as exc:
        if rec is not None:
            rec.__exit__(type(exc), exc, exc.__traceback__)
        raise
    return RunResult(done, time.perf_counter() - start, last,
                     os.fspath(opts.out) if opts.record else None)
