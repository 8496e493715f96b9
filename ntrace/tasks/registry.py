"""The table of built-in tasks: model, data, loss and training defaults of each."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import nn

import ntrace.tasks.datasets as datasets
from ntrace.errors import UsageError
from ntrace.format.metadata import Sampling
from ntrace.tasks.cifar import load_cifar10

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


def autoencoder(sample_shape: tuple[int, ...]) -> nn.Sequential:
    """The paper's autoencoder shape: inputs→50→30→20→30→50→inputs, ReLU, linear output."""
    inputs = int(np.prod(sample_shape))
    return mlp((inputs, *AUTOENCODER_HIDDEN, inputs))


def convnet(sample_shape: tuple[int, ...], classes: int = 10) -> nn.Sequential:
    """The paper's convnet: three 5×5 convolutions of 64 channels, each followed by ReLU and
    2×2 max-pooling, then a fully connected layer of 192 with ReLU and a linear output."""
    channels, height, width = sample_shape
    mods: OrderedDict[str, nn.Module] = OrderedDict()
    c = channels
    for i in range(1, 4):
        mods[f"conv{i}"] = nn.Conv2d(c, 64, 5, padding=2)
        mods[f"relu{i}"] = nn.ReLU()
        mods[f"pool{i}"] = nn.MaxPool2d(2)
        c, height, width = 64, height // 2, width // 2
    mods["flatten"] = nn.Flatten()
    mods["fc1"] = nn.Linear(64 * height * width, 192)
    mods["relu4"] = nn.ReLU()
    mods["fc2"] = nn.Linear(192, classes)
    return nn.Sequential(mods)


@dataclass(frozen=True)
class Task:
    """A built-in experiment. ``load`` returns (x, y) given an optional data directory;
    ``target`` says whether the training target is the input (autoencoder) or the label."""

    name: str
    description: str
    load: Callable[[str | None], tuple[np.ndarray, np.ndarray]]
    build: Callable[[tuple[int, ...]], nn.Module]  # from the shape of one sample
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
                "sample_shape": [int(v) for v in x.shape[1:]], "data_dir": data_dir}


AE_LR = {"sgd": 0.05, "momentum": 0.01, "rmsprop": 0.001, "adam": 0.001, "adagrad": 0.01}
CNN_LR = {"sgd": 0.01, "momentum": 0.005, "rmsprop": 0.0003, "adam": 0.0005, "adagrad": 0.01}
CNN_SAMPLING = Sampling(taylor_every=10, samples_per_round=4, neurons=50)


def _mnist_images(data_dir: str | None) -> tuple[np.ndarray, np.ndarray]:
    x, y = datasets.load_mnist(data_dir)
    return x.reshape(len(x), 1, 28, 28), y


def _digits_images(_dir: str | None) -> tuple[np.ndarray, np.ndarray]:
    x, y = datasets.load_digits()
    return x.reshape(len(x), 1, 8, 8), y


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("digits-autoencoder",
             "the paper's autoencoder (64-50-30-20-30-50-64, ReLU, MSE) on scikit-learn's "
             "bundled 8x8 digits; no download",
             lambda _dir: datasets.load_digits(), autoencoder, "mse", "input",
             64, 50, AE_LR),
        Task("mnist-autoencoder",
             "the paper's autoencoder (784-50-30-20-30-50-784, ReLU, MSE) on MNIST IDX files "
             "from --data-dir",
             datasets.load_mnist, autoencoder, "mse", "input", 64, 5, AE_LR,
             sampling=Sampling(taylor_every=20, samples_per_round=4), probe_size=256,
             needs_data_dir=True),
        Task("cifar10-convnet",
             "the paper's convnet (three 5x5 conv layers of 64 channels with ReLU and 2x2 "
             "max-pool, FC 192, FC 10, cross-entropy) on CIFAR-10 from --data-dir (binary "
             "batches or an .npz)", load_cifar10, convnet, "cross_entropy", "label", 128, 5,
             CNN_LR, sampling=CNN_SAMPLING, probe_size=100, needs_data_dir=True),
        Task("mnist-convnet",
             "the paper's convnet shape on MNIST (1x28x28) from --data-dir, cross-entropy",
             _mnist_images, convnet, "cross_entropy", "label", 128, 2, CNN_LR,
             sampling=CNN_SAMPLING, probe_size=100, needs_data_dir=True),
        Task("digits-convnet",
             "the paper's convnet shape on scikit-learn's bundled 8x8 digits (1x8x8), "
             "cross-entropy; no download", _digits_images, convnet, "cross_entropy", "label",
             128, 20, CNN_LR, sampling=CNN_SAMPLING, probe_size=100),
    )
}


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise UsageError(f"unknown task {name!r}; choose one of: {', '.join(TASKS)}") from None
