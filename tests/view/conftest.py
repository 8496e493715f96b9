"""Traces for the view tests (``tools/bench_view.set_commit`` cuts them back to a prefix)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from analyze.conftest import mlp, record_run

from ntrace.format.metadata import Sampling


@pytest.fixture(scope="session")
def long_mse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6-5-4-3 ReLU regression, MSE: 90 rounds, Taylor data every round on 6 samples, a
    probe snapshot every 3rd round."""
    torch.manual_seed(1)
    X = torch.randn(128, 6)
    Y = torch.tanh(X[:, :3] * 2 + X[:, 3:])
    return record_run(mlp((6, 5, 4, 3)), tmp_path_factory.mktemp("view") / "mlp.zarr", "mse",
                      X, Y, 90, 8, Sampling(taylor_every=1, samples_per_round=6), lr=0.1,
                      probe=X[:32], probe_every=3)


@pytest.fixture(scope="session")
def long_ce(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6-5-3 classifier with cross-entropy: 40 rounds, Taylor data every round on 4 samples."""
    torch.manual_seed(2)
    X = torch.randn(96, 6)
    Y = (X[:, 0] + X[:, 1] > 0).long() + (X[:, 2] > 0.5).long()
    return record_run(mlp((6, 5, 3)), tmp_path_factory.mktemp("view") / "ce.zarr",
                      "cross_entropy", X, Y, 40, 8, Sampling(taylor_every=1, samples_per_round=4),
                      lr=0.2, probe=X[:16], probe_every=3)
