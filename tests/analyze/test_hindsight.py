"""Hindsight Taylor optima end to end, against convex problems solved another way.

With a single linear layer (identity activation) the Taylor loss is the loss itself, so the
hindsight optimum is an ordinary convex problem: least squares (numpy lstsq) for MSE,
multinomial logistic regression in a ball or box (scipy) for cross-entropy."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.optimize import minimize

from ntrace.analyze import AnalysisOptions, analyze_trace
from ntrace.analyze.solve import CONVERGED, UNBOUNDED
from ntrace.format.reader import open_trace

from .conftest import synthetic_trace


def _data(path):
    tr = open_trace(path)
    X = tr.read("layers/0/input").astype(np.float64)
    X = np.concatenate([X, np.ones(X.shape[:2] + (1,))], axis=2)  # (t, s, i) augmented
    W = np.concatenate([tr.read("layers/0/weight"), tr.read("layers/0/bias")[..., None]],
                       axis=2).astype(np.float64)  # (t, j, i)
    return tr, X, W, tr.read("taylor/target"), tr.read("taylor/output").astype(np.float64)


def _certified(got: float, gap: float, ref: float, tol: float) -> None:
    assert gap <= tol
    assert got - ref <= gap + 1e-10  # true suboptimality ≤ certificate
    assert got >= ref - 1e-7  # and the reference is at least as good as it claims


def test_linear_mse_unconstrained_equals_least_squares(linear_mse) -> None:
    tol = 1e-10
    ds = analyze_trace(linear_mse, AnalysisOptions(domain="none", tol=tol, checkpoints=6,
                                                   exploration=False))
    tr, X, W, Y, F = _data(linear_mse)
    p = Y.shape[-1]
    # spec section 8: T_s = f_s + (V − W) x_s; the recorded f_s differs from W x_s by float32
    # rounding, so the least-squares target is y − (f − W x)
    A = np.einsum("tsi,tji->tsj", X, W)
    Y = Y.astype(np.float64) - (F - A)
    for k, T in enumerate(ds.checkpoint.values):
        Xs, Ys, Fs = X[:T].reshape(-1, X.shape[-1]), Y[:T].reshape(-1, p), F[:T].reshape(-1, p)
        Fs = Fs - (F[:T] - A[:T]).reshape(-1, p)  # so that Fs − Ys is the recorded error
        V = np.linalg.lstsq(Xs, Ys, rcond=None)[0]
        ref = float(np.mean((Xs @ V - Ys) ** 2))
        for scale in ("network", "layer"):
            got = ds[f"{scale}_optimum"].values[k]
            gap = ds[f"{scale}_gap"].values[k]
            _certified(float(np.ravel(got)[0]), float(np.ravel(gap)[0]), ref, tol)
        for j in range(p):
            v = np.linalg.lstsq(Xs, Ys[:, j], rcond=None)[0]
            others = [o for o in range(p) if o != j]
            ref_j = (np.sum((Fs[:, others] - Ys[:, others]) ** 2)
                     + np.sum((Xs @ v - Ys[:, j]) ** 2)) / Ys.size
            _certified(float(ds.neuron_optimum.values[k, j]), float(ds.neuron_gap.values[k, j]),
                       ref_j, tol)
    cum = np.cumsum(tr.read("taylor/sample_loss").astype(np.float64).mean(1))
    counts = ds.checkpoint.values
    np.testing.assert_allclose(ds.cumulative_loss.values, cum[counts - 1], rtol=1e-12)
    np.testing.assert_allclose(ds.network_regret.values,
                               cum[counts - 1] - counts * ds.network_optimum.values, rtol=1e-12)
    np.testing.assert_allclose(ds.network_regret_over_sqrt_n.values,
                               ds.network_regret.values / np.sqrt(counts), rtol=1e-12)


def _ce(V: np.ndarray, X: np.ndarray, y: np.ndarray, F: np.ndarray,
        W: np.ndarray, j: int | None = None) -> tuple[float, np.ndarray]:
    """Mean cross-entropy of the Taylor logits F + (V − W_k) x_k (for neuron j: only logit
    j moves, by (v − W_kj)·x_k) and its gradient; X (k, i), W (k, j, i) or (k, i)."""
    if j is None:
        Vm = V.reshape(-1, X.shape[1])
        z = F + X @ Vm.T - np.einsum("kji,ki->kj", W, X)
    else:
        z = F.copy()
        z[:, j] += X @ V - np.einsum("ki,ki->k", W, X)
    z = z - z.max(1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(1, keepdims=True)
    val = float(np.mean(-np.log(p[np.arange(len(y)), y])))
    r = p.copy()
    r[np.arange(len(y)), y] -= 1
    if j is None:
        return val, (r.T @ X / len(y)).ravel()
    return val, r[:, j] @ X / len(y)


def _ball_min(fun, m: np.ndarray, R: float) -> float:
    cons = {"type": "ineq", "fun": lambda v: R * R - np.sum((v - m) ** 2),
            "jac": lambda v: -2 * (v - m)}
    res = minimize(fun, m, jac=True, method="SLSQP", constraints=[cons],
                   options={"ftol": 1e-15, "maxiter": 2000})
    # status 8: no further descent at this precision (already optimal)
    assert res.status in (0, 8) and np.sum((res.x - m) ** 2) <= R * R * (1 + 1e-9)
    return float(res.fun)


def test_linear_cross_entropy_ball_equals_scipy(linear_ce) -> None:
    tol = 1e-9
    ds = analyze_trace(linear_ce, AnalysisOptions(domain="ball", tol=tol, checkpoints=4,
                                                   exploration=False))
    tr, X, W, y, F = _data(linear_ce)
    T_all = tr.taylor_rounds
    flat = W[:T_all].reshape(T_all, -1)
    m = flat.mean(0)
    R = float(np.max(np.linalg.norm(flat - m, axis=1)))
    assert float(ds.network_domain_size) == pytest.approx(R, rel=1e-12)
    for k, T in enumerate(ds.checkpoint.values):
        Xs, ys = X[:T].reshape(-1, X.shape[-1]), y[:T].reshape(-1)
        Fs = F[:T].reshape(-1, F.shape[-1])
        Ws = np.repeat(W[:T], X.shape[1], axis=0)  # each sample's own round's iterate
        ref = _ball_min(lambda v, Xs=Xs, ys=ys, Fs=Fs, Ws=Ws: _ce(v, Xs, ys, Fs, Ws), m, R)
        _certified(float(ds.network_optimum[k]), float(ds.network_gap[k]), ref, tol)
        _certified(float(ds.layer_optimum[k, 0]), float(ds.layer_gap[k, 0]), ref, tol)
        for j in range(W.shape[1]):
            Wj = np.repeat(W[:T, j], X.shape[1], axis=0)  # iterate row j of each sample's round
            mj = W[:T_all, j].mean(0)
            Rj = float(np.max(np.linalg.norm(W[:T_all, j] - mj, axis=1)))
            ref_j = _ball_min(lambda v, Xs=Xs, ys=ys, Fs=Fs, Wj=Wj, j=j:
                              _ce(v, Xs, ys, Fs, Wj, j), mj, Rj)
            _certified(float(ds.neuron_optimum[k, j]), float(ds.neuron_gap[k, j]), ref_j, tol)


def test_linear_cross_entropy_unconstrained(linear_ce, separable_ce) -> None:
    tol = 1e-9
    ds = analyze_trace(linear_ce, AnalysisOptions(domain="none", tol=tol, checkpoints=(25,),
                                                  exploration=False))
    _, X, W, y, F = _data(linear_ce)
    Xs, ys, Fs = X.reshape(-1, X.shape[-1]), y.reshape(-1), F.reshape(-1, F.shape[-1])
    Ws = np.repeat(W, X.shape[1], axis=0)
    res = minimize(lambda v: _ce(v, Xs, ys, Fs, Ws), W[-1].ravel(), jac=True, method="BFGS",
                   options={"gtol": 1e-12, "maxiter": 10000})
    assert int(ds.network_status[0]) == CONVERGED
    _certified(float(ds.network_optimum[0]), float(ds.network_gap[0]), float(res.fun), tol)
    sep = analyze_trace(separable_ce, AnalysisOptions(domain="none", checkpoints=3,
                                                      exploration=False))
    assert (sep.network_status.values == UNBOUNDED).all()
    assert np.isnan(sep.network_optimum.values).all()
    assert np.isnan(sep.network_regret.values).all()
    assert (sep.neuron_status.values == UNBOUNDED).all()


def test_linear_mse_box_equals_lbfgsb(linear_mse) -> None:
    tol = 1e-9
    ds = analyze_trace(linear_mse, AnalysisOptions(domain="box", tol=tol, checkpoints=3,
                                                   scales=("network",), exploration=False))
    tr, X, W, Y, F = _data(linear_mse)
    Y = Y.astype(np.float64) - (F - np.einsum("tsi,tji->tsj", X, W))  # as in the test above
    flat = W.reshape(len(W), -1)
    lo, hi = flat.min(0), flat.max(0)
    for k, T in enumerate(ds.checkpoint.values):
        Xs, Ys = X[:T].reshape(-1, X.shape[-1]), Y[:T].reshape(-1, Y.shape[-1])

        def f(v: np.ndarray, Xs: np.ndarray = Xs, Ys: np.ndarray = Ys
              ) -> tuple[float, np.ndarray]:
            r = Xs @ v.reshape(-1, Xs.shape[1]).T - Ys
            return float(np.mean(r ** 2)), (2 * r.T @ Xs / r.size).ravel()

        res = minimize(f, flat.mean(0), jac=True, method="L-BFGS-B",
                       bounds=list(zip(lo, hi, strict=True)),
                       options={"ftol": 1e-16, "gtol": 1e-14, "maxiter": 20000})
        _certified(float(ds.network_optimum[k]), float(ds.network_gap[k]), float(res.fun), tol)


def test_optimum_is_no_worse_than_the_mean_iterate(mlp_mse) -> None:
    """The ball contains its centre, so the optimum is at most the Taylor loss there."""
    from ntrace.analyze import taylor_loss

    ds = analyze_trace(mlp_mse, AnalysisOptions(checkpoints=(20,), exploration=False))
    tr = open_trace(mlp_mse)
    mean = {}
    for name in tr.layers:
        mean[name] = (np.asarray(tr.read(f"layers/{name}/weight"), np.float64).mean(0),
                      np.asarray(tr.read(f"layers/{name}/bias"), np.float64).mean(0))
    import torch

    at_center = np.mean([float(taylor_loss(tr, t, {n: (torch.as_tensor(V), torch.as_tensor(c))
                                                   for n, (V, c) in mean.items()}))
                         for t in range(20)])
    assert float(ds.network_optimum[0]) <= at_center + 1e-12
    assert (ds.neuron_status.values == CONVERGED).all()


def test_checkpoints_do_not_change_the_answer(mlp_mse) -> None:
    many = analyze_trace(mlp_mse, AnalysisOptions(checkpoints=12, exploration=False))
    one = analyze_trace(mlp_mse, AnalysisOptions(checkpoints=(20,), exploration=False))
    for scale in ("network", "layer", "neuron"):
        a, b = many[f"{scale}_optimum"].values[-1], one[f"{scale}_optimum"].values[-1]
        ga, gb = many[f"{scale}_gap"].values[-1], one[f"{scale}_gap"].values[-1]
        ok = np.isfinite(a)
        assert (np.abs(a - b)[ok] <= (ga + gb)[ok] + 1e-12).all()


def test_a_trace_still_being_written_uses_committed_rows(tmp_path) -> None:
    path = synthetic_trace(tmp_path / "running.zarr", T=9, close=False)
    tr = open_trace(path)
    assert tr.attrs.status == "running"
    assert tr.zarr_array("taylor/output").shape[0] > tr.taylor_rounds == 9
    ds = analyze_trace(path, AnalysisOptions(checkpoints=4, exploration=False))
    assert int(ds.checkpoint[-1]) == 9
    for name in ("network_optimum", "layer_optimum", "neuron_optimum", "cumulative_loss"):
        assert np.isfinite(ds[name].values).all(), name
    assert math.isfinite(float(ds.network_regret[-1]))


def test_dynamic_best_responses_bound_each_round(mlp_mse) -> None:
    ds = analyze_trace(mlp_mse, AnalysisOptions(checkpoints=5, dynamic=True,
                                                exploration=False, scales=("neuron",)))
    assert ds.attrs["ntrace"]["dynamic"]
    br = ds.neuron_best_response.values
    # each round's best response is at most the loss at the iterate (the iterate is in H),
    # up to the float32 rounding of the recorded sample losses
    assert (br <= ds.taylor_loss.values[:, None] * (1 + 1e-7)).all()
    assert (ds.neuron_best_response_gap.values <= 1e-6).all()
    assert (ds.neuron_dynamic_regret.values >= -1e-6).all()
    # the dynamic comparator is at least as strong as the static one
    assert (ds.neuron_dynamic_regret.values >= ds.neuron_regret.values - 1e-6).all()
    assert "DYNAMIC" in ds.neuron_dynamic_regret.attrs["description"]
