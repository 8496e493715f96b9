"""Conformance: from raw zarr + numpy alone (no ntrace reader), for every recorded round and
tracked layer, the Taylor loss at V = W_n equals the recorded loss and its gradient equals the
true gradient of that layer from torch.autograd on a model rebuilt from the stored weights.

Tolerances: float32 storage, so values agree to rtol 1e-4 / atol 1e-6 (losses) and
rtol 1e-3 / atol 1e-5 relative to the gradient's scale (gradients summed over samples).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

LOSS_RTOL, GRAD_RTOL = 1e-4, 1e-3


def unpack(packed: np.ndarray, n: int) -> np.ndarray:
    # spec §7, written out independently of ntrace.format.bits: bit j%8 of byte j//8, LSB first
    j = np.arange(n)
    return ((packed[..., j // 8] >> (j % 8)) & 1).astype(bool)


def loss_np(loss_id: str, f: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample loss (spec §4) and its gradient in f, in float64."""
    f = f.astype(np.float64)
    if loss_id == "mse":
        return ((f - y) ** 2).mean(-1), 2 * (f - y) / f.shape[-1]
    e = np.exp(f - f.max(-1, keepdims=True))
    p = e / e.sum(-1, keepdims=True)
    onehot = np.eye(f.shape[-1])[y]
    return -np.log((p * onehot).sum(-1)), p - onehot


def act_torch(kind: str, slope: float | None, a: torch.Tensor) -> torch.Tensor:
    if kind == "relu":
        return torch.relu(a)
    if kind == "leaky_relu":
        return torch.nn.functional.leaky_relu(a, slope)
    return a


def check_trace(path: Path) -> int:
    g = zarr.open_group(str(path), mode="r")
    attrs = g.attrs["ntrace"]
    loss_id = attrs["loss"]["id"]
    names = attrs["layers"]
    T = attrs["commit"]["taylor_rounds"]
    assert T > 0
    layer_attrs = [g[f"layers/{n}"].attrs["ntrace"] for n in names]
    checked = 0
    for t in range(T):
        f = g["taylor/output"][t]
        y = g["taylor/target"][t]
        recorded = g["taylor/sample_loss"][t]
        S = f.shape[0]
        # -- the autograd reference: rebuild the chain from the stored parameters -----------
        Ws = [torch.tensor(g[f"layers/{n}/weight"][t], dtype=torch.float64, requires_grad=True)
              for n in names]
        bs = [torch.tensor(g[f"layers/{n}/bias"][t], dtype=torch.float64, requires_grad=True)
              for n in names]
        h = torch.tensor(g[f"layers/{names[0]}/input"][t], dtype=torch.float64)
        for la, W, b in zip(layer_attrs, Ws, bs, strict=True):
            h = act_torch(la["activation"]["kind"], la["activation"]["negative_slope"],
                          h @ W.T + b)
        yt = torch.tensor(y) if loss_id == "cross_entropy" else torch.tensor(y, dtype=torch.float64)
        per = (((h - yt) ** 2).mean(-1) if loss_id == "mse"
               else torch.nn.functional.cross_entropy(h, yt, reduction="none"))
        per.mean().backward()
        # W_n is what the forward used: stored weights reproduce the stored output and losses
        np.testing.assert_allclose(h.detach().numpy(), f, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(per.detach().numpy(), recorded, rtol=LOSS_RTOL, atol=1e-6)
        # -- the Taylor loss from the stored factors (spec §8), numpy only -----------------
        ell, dell = loss_np(loss_id, f, y)  # at V = W: T_s = f_s
        np.testing.assert_allclose(ell.mean(), recorded.astype(np.float64).mean(),
                                   rtol=LOSS_RTOL, atol=1e-6)
        for n, la, W, b in zip(names, layer_attrs, Ws, bs, strict=True):
            x = g[f"layers/{n}/input"][t].astype(np.float64)  # (S, d)
            tracked = g[f"layers/{n}/tracked"][:]
            if la["jacobian"] == "identity":
                J = np.broadcast_to(np.eye(f.shape[1])[:, tracked], (S, f.shape[1], len(tracked)))
            else:
                J = g[f"layers/{n}/jacobian"][t].astype(np.float64)  # (S, p, tracked)
            delta = np.einsum("sot,so->st", J, dell)  # J_sᵀ ∇ℓ_s, tracked neurons
            grad_w = np.einsum("st,si->ti", delta, x) / S
            grad_b = delta.mean(0)
            ref_w = W.grad.numpy()[tracked]
            ref_b = b.grad.numpy()[tracked]
            scale = np.abs(ref_w).max() + 1e-12
            np.testing.assert_allclose(grad_w, ref_w, rtol=GRAD_RTOL, atol=1e-5 * scale,
                                       err_msg=f"layer {n}, Taylor round {t}")
            np.testing.assert_allclose(grad_b, ref_b, rtol=GRAD_RTOL,
                                       atol=1e-5 * (np.abs(ref_b).max() + 1e-12))
            if la["activation"]["kind"] != "identity":  # spec §8 property 3
                pre = x @ W.detach().numpy().T + b.detach().numpy()
                states = unpack(g[f"layers/{n}/mask"][t], pre.shape[1])
                assert np.all((states == (pre > 0)) | (np.abs(pre) < 1e-5))
            checked += 1
    return checked


def test_conformance_autoencoder(ae_trace: Path) -> None:
    assert check_trace(ae_trace) == 20 * 6


def test_conformance_leaky_cross_entropy(ce_trace: Path) -> None:
    assert check_trace(ce_trace) == 20 * 3
    # the whole minibatch is recorded here, so the minibatch loss is the mean sample loss
    g = zarr.open_group(str(ce_trace), mode="r")
    at = g["loss"][:][g["taylor/round_index"][:]]
    np.testing.assert_allclose(at, g["taylor/sample_loss"][:].mean(1), rtol=1e-5)


def test_taylor_loss_is_first_order(ae_trace: Path) -> None:
    """T^n_l(V) equals the true loss at V to first order: the error shrinks like ε²."""
    g = zarr.open_group(str(ae_trace), mode="r")
    names = g.attrs["ntrace"]["layers"]
    t, layer = 5, 2
    Ws = [torch.tensor(g[f"layers/{n}/weight"][t], dtype=torch.float64) for n in names]
    bs = [torch.tensor(g[f"layers/{n}/bias"][t], dtype=torch.float64) for n in names]
    x0 = torch.tensor(g[f"layers/{names[0]}/input"][t], dtype=torch.float64)
    y = g["taylor/target"][t].astype(np.float64)
    f = g["taylor/output"][t].astype(np.float64)
    J = g[f"layers/{names[layer]}/jacobian"][t].astype(np.float64)
    x = g[f"layers/{names[layer]}/input"][t].astype(np.float64)
    D = np.random.default_rng(0).standard_normal(Ws[layer].shape)
    errors = []
    for eps in (1e-2, 1e-3):
        W2 = [w.clone() for w in Ws]
        W2[layer] = W2[layer] + eps * torch.tensor(D)
        h = x0
        for i, (W, b) in enumerate(zip(W2, bs, strict=True)):
            h = h @ W.T + b
            if i < len(names) - 1:
                h = torch.relu(h)
        true = ((h.numpy() - y) ** 2).mean()
        taylor = ((f + np.einsum("son,sn->so", J, eps * x @ D.T) - y) ** 2).mean()
        errors.append(abs(true - taylor))
    assert errors[1] < errors[0] / 30  # quadratic: 100x smaller in exact arithmetic


@pytest.mark.parametrize("fixture", ["ae_trace", "ce_trace"])
def test_minibatch_loss_recorded_every_round(fixture: str, request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue(fixture)
    g = zarr.open_group(str(path), mode="r")
    loss = g["loss"][:]
    assert loss.shape == (g.attrs["ntrace"]["commit"]["rounds"],)
    assert np.all(np.isfinite(loss))
    rounds = g["taylor/round_index"][:]
    k = g.attrs["ntrace"]["sampling"]["taylor_every"]
    assert np.array_equal(rounds, np.arange(0, len(loss), k))
