"""The table of built-in tasks: model, data, loss and training defaults of each."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import nn

from ntrace.errors import UsageError
from ntrace.format.metadata import Sampling
from ntrace.tasks import datasets

AUTOENCODER_HIDDEN = (50, 30, 20, 30, 50)


def mlp(sizes: tuple[int, ...]) -> nn.Sequential:
    """Linear layers ``fc1, fc2, …`` of the given widths with ReLU between them and a linear
    output (the names become the trace's layer groups)."""
    mods: OrderedDict[str, nn.Module] = OrderedDict()
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True), start=1):
        mods[f"fc{i}"] = nn.Linear(a, b)
        if i < len(sizes) - 1:
            mods[f"relu{i}"] = nn.ReLU()
    return nn.Sequential(mods)


def autoencoder(inputs: int) -> nn.Sequential:
    """The paper's autoencoder shape: inputs→50→30→20→30→50→inputs, ReLU, linear output."""
    return mlp((inputs, *AUTOENCODER_HIDDEN, inputs))


@dataclass(frozen=True)
class Task:
    """A built-in experiment. ``load`` returns (x, y) given an optional data directory;
    ``target`` says whether the training target is the input (autoencoder) or the label."""

    name: str
    description: str
    load: Callable[[str | None], tuple[np.ndarray, np.ndarray]]
    build: Callable[[int], nn.Module]
    loss: str
    target: str  # "input" | "label"
    batch_size: int
    epochs: int
    learning_rates: dict[str, float]
    sampling: Sampling = Sampling()
    probe_size: int = 500
    needs_data_dir: bool = False

    def describe_data(self, x: np.ndarray, data_dir: str | None) -> dict[str, Any]:
        return {"name": self.name.split("-")[0], "size": int(len(x)),
                "features": int(np.prod(x.shape[1:])), "data_dir": data_dir}


AE_LR = {"sgd": 0.05, "momentum": 0.01, "rmsprop": 0.001, "adam": 0.001, "adagrad": 0.01}

TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("digits-autoencoder",
             "the paper's autoencoder (64-50-30-20-30-50-64, ReLU, MSE) on scikit-learn's "
             "bundled 8x8 digits; no download",
             lambda _dir: datasets.load_digits(), lambda d: autoencoder(d), "mse", "input",
             64, 50, AE_LR),
        Task("mnist-autoencoder",
             "the paper's autoencoder (784-50-30-20-30-50-784, ReLU, MSE) on MNIST IDX files "
             "from --data-dir",
             datasets.load_mnist, lambda d: autoencoder(d), "mse", "input", 64, 5, AE_LR,
             sampling=Sampling(taylor_every=20, samples_per_round=4), probe_size=256,
             needs_data_dir=True),
    )
}


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise UsageError(f"unknown task {name!r}; choose one of: {', '.join(TASKS)}") from None
