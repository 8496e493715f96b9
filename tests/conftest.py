"""Shared fixtures: small real traces recorded once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from ntrace.format.metadata import Sampling
from ntrace.recording import record
from ntrace.tasks import get_task
from ntrace.tasks.datasets import load_digits
from ntrace.tasks.runner import RunOptions, run_task

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(autouse=True)
def _torch_threads() -> object:
    """Tests that pin torch to one thread (for reproducible sums) do not leak it into the
    next test, whose plain subprocess would otherwise sum in another order than its
    in-process run."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = SHARED / "data"
    if not path.is_dir():
        pytest.skip("../shared/data is not available")
    return path


@pytest.fixture(scope="session")
def ae_trace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default task (digits autoencoder, MSE), 60 rounds, Taylor data every 3 rounds."""
    out = tmp_path_factory.mktemp("ae") / "ae.zarr"
    run_task(get_task("digits-autoencoder"), RunOptions(
        out=str(out), steps=60, optimizer="adam", seed=1,
        sampling=Sampling(taylor_every=3, samples_per_round=8), probe_size=64))
    return out


def leaky_classifier() -> nn.Sequential:
    return nn.Sequential(nn.Linear(64, 32), nn.LeakyReLU(0.1), nn.Linear(32, 16), nn.ReLU(),
                         nn.Linear(16, 10))


@pytest.fixture(scope="session")
def ce_trace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LeakyReLU classifier on digits with cross-entropy, recorded through the Python API
    with a tracked-neuron sample, the whole minibatch as Taylor samples and a final ReLU-free
    output layer."""
    out = tmp_path_factory.mktemp("ce") / "ce.zarr"
    torch.manual_seed(0)
    x, y = load_digits()
    xs, ys = torch.as_tensor(x), torch.as_tensor(y)
    model = leaky_classifier()
    opt = torch.optim.RMSprop(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    with record(model, out, loss="cross_entropy", optimizer=opt,
                sampling=Sampling(taylor_every=2, samples_per_round=16, neurons=12),
                probe=xs[:80], probe_index=range(80), probe_every=5,
                expected_rounds=40) as rec:
        for step in range(40):
            idx = torch.arange(step * 16, step * 16 + 16) % len(xs)
            out_ = model(xs[idx])
            loss = loss_fn(out_, ys[idx])
            rec.step(loss, out_, ys[idx], indices=idx)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return out
