"""Small real traces for the analyzer tests, recorded once per session on tiny models."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from ntrace.format.metadata import Sampling
from ntrace.recording import record


def record_run(model: nn.Module, path: Path, loss: str, X: torch.Tensor, Y: torch.Tensor,
               rounds: int, batch: int, sampling: Sampling, lr: float = 0.05,
               probe: torch.Tensor | None = None, probe_every: int | None = None,
               optimizer: str = "sgd", seed: int = 0) -> Path:
    """Train ``model`` on (X, Y) with the recorder attached; return the trace path."""
    torch.manual_seed(seed)
    opt: torch.optim.Optimizer = (torch.optim.SGD(model.parameters(), lr=lr)
                                  if optimizer == "sgd" else
                                  torch.optim.Adam(model.parameters(), lr=lr))
    fn = nn.functional.mse_loss if loss == "mse" else nn.functional.cross_entropy
    gen = torch.Generator().manual_seed(seed)
    with record(model, path, loss=loss, optimizer=opt, sampling=sampling, probe=probe,
                probe_every=probe_every, expected_rounds=rounds, overwrite=True) as rec:
        for _ in range(rounds):
            idx = torch.randperm(len(X), generator=gen)[:batch]
            out = model(X[idx])
            value = fn(out, Y[idx])
            rec.step(value, out, Y[idx], indices=idx)
            opt.zero_grad()
            value.backward()
            opt.step()
    return path


def mlp(sizes: tuple[int, ...], leaky: bool = False) -> nn.Sequential:
    mods: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        mods.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            mods.append(nn.LeakyReLU(0.1) if leaky and i == 0 else nn.ReLU())
    return nn.Sequential(*mods)


@pytest.fixture(scope="session")
def mlp_mse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6-5-4-3 ReLU/LeakyReLU regression, MSE: Taylor data on 6 of 8 samples every 2nd
    round (20 Taylor rounds), 20 probe snapshots of 32 points."""
    torch.manual_seed(1)
    X = torch.randn(128, 6)
    Y = torch.tanh(X[:, :3] * 2 + X[:, 3:])
    model = mlp((6, 5, 4, 3), leaky=True)
    return record_run(model, tmp_path_factory.mktemp("mse") / "mlp.zarr", "mse", X, Y, 40, 8,
                      Sampling(taylor_every=2, samples_per_round=6), lr=0.1, probe=X[:32],
                      probe_every=2)


@pytest.fixture(scope="session")
def mlp_ce(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6-5-4 classifier with cross-entropy and 3 tracked neurons per layer."""
    torch.manual_seed(2)
    X = torch.randn(96, 6)
    Y = (X[:, 0] + X[:, 1] > 0).long() + (X[:, 2] > 0.5).long()
    model = mlp((6, 5, 4, 3))
    return record_run(model, tmp_path_factory.mktemp("ce") / "mlp.zarr", "cross_entropy", X,
                      Y, 30, 8, Sampling(taylor_every=1, samples_per_round=8, neurons=3),
                      lr=0.2, probe=X[:16], probe_every=3)


@pytest.fixture(scope="session")
def linear_mse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A single nn.Linear(4, 3) with MSE: the Taylor loss is the loss itself."""
    torch.manual_seed(3)
    X = torch.randn(64, 4)
    Y = X @ torch.randn(4, 3) + 0.3 * torch.randn(64, 3)
    return record_run(nn.Sequential(nn.Linear(4, 3)), tmp_path_factory.mktemp("lin") / "l.zarr",
                      "mse", X, Y, 30, 8, Sampling(taylor_every=1, samples_per_round=8),
                      lr=0.05)


@pytest.fixture(scope="session")
def linear_ce(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A single nn.Linear(3, 3) classifier on overlapping classes (not separable)."""
    torch.manual_seed(4)
    Y = torch.randint(0, 3, (90,))
    X = torch.randn(90, 3) + 0.8 * nn.functional.one_hot(Y, 3).float()
    return record_run(nn.Sequential(nn.Linear(3, 3)), tmp_path_factory.mktemp("lce") / "lce.zarr",
                      "cross_entropy", X, Y, 25, 12,
                      Sampling(taylor_every=1, samples_per_round=12), lr=0.3)


@pytest.fixture(scope="session")
def separable_ce(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A single nn.Linear(2, 2) classifier on linearly separable points."""
    torch.manual_seed(5)
    X = torch.randn(40, 2)
    Y = (X[:, 0] > 0).long()
    X[:, 0] += torch.where(Y == 1, 0.5, -0.5)
    return record_run(nn.Sequential(nn.Linear(2, 2)), tmp_path_factory.mktemp("sep") / "sep.zarr",
                      "cross_entropy", X, Y, 6, 8,
                      Sampling(taylor_every=1, samples_per_round=8), lr=0.1)


def same_results(a: Any, b: Any, close: str | None = None) -> None:
    """Every data variable and coordinate of two results bit for bit (NaN where NaN),
    except those whose names start with ``close`` (all if ""): solved in other batches, they
    stop at other points within the tolerance, so optima must agree within the sum of the
    certified gaps, gaps stay below the tolerance, statuses agree, iteration counts may
    differ and everything derived agrees to 1e-6."""
    assert sorted(a.data_vars) == sorted(b.data_vars)
    assert sorted(a.coords) == sorted(b.coords)
    tol = a.attrs["ntrace"]["tolerance"]
    for k in list(a.data_vars) + list(a.coords):
        x, y = a[k].values, b[k].values
        assert x.shape == y.shape, k
        k = str(k)
        if close is None or not k.startswith(close) or k.endswith("_status") or k in a.coords:
            np.testing.assert_array_equal(x, y, err_msg=k)
        elif k.endswith("_optimum") and k.replace("_optimum", "_gap") in a:
            gaps = a[k.replace("_optimum", "_gap")].values + b[k.replace("_optimum", "_gap")]
            np.testing.assert_array_equal(np.isnan(x), np.isnan(y), err_msg=k)
            assert np.all(np.abs(x - y)[~np.isnan(x)] <= gaps.values[~np.isnan(x)] + 1e-12), k
        elif k.endswith("_gap"):
            assert np.nanmax(np.abs(x - y)) <= tol, k
        elif not k.endswith("_iterations"):
            np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-9, err_msg=k)


def copy_trace(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def stacked(trace_path: Path, name: str, T: int | None = None) -> np.ndarray:
    """All committed rows of an array (small test traces only)."""
    from ntrace.format.reader import open_trace

    tr = open_trace(trace_path)
    a = tr.read(name)
    return a if T is None else a[:T]


def synthetic_trace(path: Path, T: int, S: int = 4, p: int = 3, d: int = 5, n: int = 6,
                    close: bool = True, seed: int = 0, compressible: bool = False) -> Path:
    """A two-layer trace written directly with TraceWriter: layer ``a`` (d → n, ReLU,
    stored Jacobian) then ``b`` (n → p, identity). Values are arbitrary but consistent
    (outputs, sample losses and masks follow from weights and inputs); ``close=False``
    leaves it 'running' with preallocated rows past the commit (NaN fill)."""
    from ntrace.format.bits import pack
    from ntrace.format.metadata import Activation, LayerAttrs, LossSpec, TraceAttrs
    from ntrace.format.writer import LayerRound, TaylorRound, TraceWriter

    s = Sampling(taylor_every=1, samples_per_round=S)
    attrs = TraceAttrs(loss=LossSpec("mse"), sampling=s, layers=("a", "b"), output_size=p)
    la = LayerAttrs("a", 0, "linear", d, n, True, Activation("relu"), "stored")
    lb = LayerAttrs("b", 1, "linear", n, p, True, Activation("identity"), "identity")
    w = TraceWriter.create(path, attrs, [la, lb], {"a": np.arange(n), "b": np.arange(p)},
                           None, expected_rounds=2 * T + 8, overwrite=True)
    rng = np.random.default_rng(seed)
    tile = rng.standard_normal((p, 1)).astype(np.float32)
    for t in range(T):
        x = rng.standard_normal((S, d)).astype(np.float32)
        Wa = rng.standard_normal((n, d)).astype(np.float32) * 0.3
        Wb = rng.standard_normal((p, n)).astype(np.float32) * 0.3
        a = x @ Wa.T
        h = np.maximum(a, 0)
        out = (h @ Wb.T).astype(np.float32)
        tgt = np.zeros((S, p), np.float32)
        jac = (np.ascontiguousarray(np.broadcast_to(tile[None], (S, p, n))) if compressible
               else (Wb[None] * (a > 0)[:, None, :]).astype(np.float32))
        tr = TaylorRound(t, np.arange(S), ((out - tgt) ** 2).mean(1).astype(np.float32), out,
                         tgt, {"a": LayerRound(Wa, x, np.zeros(n, np.float32), jac, pack(a > 0)),
                               "b": LayerRound(Wb, h.astype(np.float32),
                                               np.zeros(p, np.float32), None, None)})
        w.write_round(float(tr.sample_loss.mean()), tr)
    if close:
        w.close()
    else:
        w.commit()
    return path
