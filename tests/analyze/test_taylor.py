"""Taylor losses from stored factors against independent references: the recorded sample
losses, autograd through a model rebuilt from the recorded weights, and the accumulated
MSE statistics and cross-entropy objectives against direct per-round evaluation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from ntrace.analyze import neuron_taylor_loss, taylor_loss
from ntrace.analyze.hindsight import _WorkingSet
from ntrace.analyze.options import AnalysisOptions
from ntrace.analyze.plan import make_plan
from ntrace.analyze.quadratic import ChainGram, NeuronGram
from ntrace.analyze.source import TaylorSource
from ntrace.errors import UsageError
from ntrace.format.reader import open_trace

from .conftest import mlp


def _weights(tr, t: int, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    W = torch.as_tensor(tr.read(f"layers/{name}/weight", t).astype(np.float64))
    b = torch.as_tensor(tr.read(f"layers/{name}/bias", t).astype(np.float64))
    return W, b


@pytest.mark.parametrize("fixture", ["mlp_mse", "mlp_ce", "linear_ce"])
def test_taylor_loss_at_iterate_is_recorded_sample_loss(fixture: str,
                                                        request: pytest.FixtureRequest) -> None:
    tr = open_trace(request.getfixturevalue(fixture))
    for t in (0, tr.taylor_rounds // 2, tr.taylor_rounds - 1):
        want = float(tr.read("taylor/sample_loss", t).astype(np.float64).mean())
        all_layers = {n: _weights(tr, t, n) for n in tr.layers}
        assert float(taylor_loss(tr, t, all_layers)) == pytest.approx(want, rel=1e-5)
        for name in tr.layers:
            assert float(taylor_loss(tr, t, {name: _weights(tr, t, name)})) == \
                pytest.approx(want, rel=1e-5)
            W, b = _weights(tr, t, name)
            j = int(tr.tracked[name][0])
            got = neuron_taylor_loss(tr, t, name, j, W[j], b[j])
            assert float(got) == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("fixture,sizes,loss", [("mlp_mse", (6, 5, 4, 3), "mse"),
                                                ("mlp_ce", (6, 5, 4, 3), "cross_entropy")])
def test_taylor_gradient_matches_autograd_of_the_model(fixture: str, sizes: tuple[int, ...],
                                                       loss: str,
                                                       request: pytest.FixtureRequest) -> None:
    tr = open_trace(request.getfixturevalue(fixture))
    names = list(tr.layers)
    model = mlp(sizes, leaky=fixture == "mlp_mse").double()
    linears = [m for m in model if isinstance(m, nn.Linear)]
    for t in (1, tr.taylor_rounds - 1):
        with torch.no_grad():
            for lin, name in zip(linears, names, strict=True):
                W, b = _weights(tr, t, name)
                lin.weight.copy_(W)
                lin.bias.copy_(b)
        x = torch.as_tensor(tr.read(f"layers/{names[0]}/input", t).astype(np.float64))
        out = model(x)
        np.testing.assert_allclose(out.detach().numpy(), tr.read("taylor/output", t),
                                   rtol=1e-4, atol=1e-5)
        target = torch.as_tensor(tr.read("taylor/target", t))
        ref = (nn.functional.mse_loss(out, target.double()) if loss == "mse"
               else nn.functional.cross_entropy(out, target))
        grads = torch.autograd.grad(ref, [p for lin in linears for p in (lin.weight, lin.bias)])
        for k, name in enumerate(names):
            W, b = _weights(tr, t, name)
            W.requires_grad_(True)
            b.requires_grad_(True)
            gW, gb = torch.autograd.grad(taylor_loss(tr, t, {name: (W, b)}), [W, b])
            rows = torch.as_tensor(tr.tracked[name])  # untracked rows do not enter T_s
            np.testing.assert_allclose(gW[rows].numpy(), grads[2 * k][rows].numpy(),
                                       rtol=1e-4, atol=1e-6)
            np.testing.assert_allclose(gb[rows].numpy(), grads[2 * k + 1][rows].numpy(),
                                       rtol=1e-4, atol=1e-6)


def _direct_mean(tr, T: int, params_of) -> float:
    return float(np.mean([float(taylor_loss(tr, t, params_of(t))) for t in range(T)]))


def test_mse_statistics_equal_direct_taylor_losses(mlp_mse) -> None:
    tr = open_trace(mlp_mse)
    plan = make_plan(tr, AnalysisOptions())
    src = TaylorSource(tr, plan.layers, torch.device("cpu"), 1 << 16)
    T = 7
    grams = {lp.name: NeuronGram(lp, tr.attrs.output_size, src.device) for lp in plan.layers}
    chain = ChainGram(plan.layers, [lp.name for lp in plan.layers], True,
                      tr.attrs.output_size, src.device)
    for block in src.blocks(0, T):
        err = block.output - block.target
        for g in grams.values():
            g.add(block, err)
        chain.add(block, err)
    gen = torch.Generator().manual_seed(0)
    cand = {}
    for lp in plan.layers:
        W, b = _weights(tr, T - 1, lp.name)
        cand[lp.name] = (W + 0.3 * torch.randn(W.shape, generator=gen, dtype=W.dtype),
                         b + 0.3 * torch.randn(b.shape, generator=gen, dtype=b.dtype))
    u = {n: torch.cat([V, c[:, None]], 1) for n, (V, c) in cand.items()}
    for lp in plan.layers:
        q = chain.layer(lp.name)
        want = _direct_mean(tr, T, lambda t, n=lp.name: {n: cand[n]})
        assert float(q.value(u[lp.name].reshape(1, -1))) == pytest.approx(want, rel=1e-9)
        qn = grams[lp.name].quadratic()
        for c, j in enumerate(lp.neurons):
            def neuron(t: int, n: str = lp.name, j: int = int(j)) -> dict:
                W, b = _weights(tr, t, n)
                W[j], b[j] = cand[n][0][j], cand[n][1][j]
                return {n: (W, b)}

            got = float(qn.take(torch.tensor([c])).value(u[lp.name][j][None]))
            assert got == pytest.approx(_direct_mean(tr, T, neuron), rel=1e-9)
    whole = torch.cat([u[lp.name].reshape(-1) for lp in plan.layers])[None]
    assert float(chain.whole().value(whole)) == pytest.approx(
        _direct_mean(tr, T, lambda t: cand), rel=1e-9)


def test_cross_entropy_objectives_equal_direct_taylor_losses(mlp_ce) -> None:
    tr = open_trace(mlp_ce)
    plan = make_plan(tr, AnalysisOptions(scales=("neuron",)))
    src = TaylorSource(tr, plan.layers, torch.device("cpu"), 1 << 16)
    T = 5
    ws = _WorkingSet(list(plan.layers), T * src.samples, tr.attrs.output_size, src.device,
                     1 << 28)
    for block in src.blocks(0, T):
        ws.add(block)
    gen = torch.Generator().manual_seed(1)
    for lp in plan.layers:
        prob = ws.neurons(lp)
        W, b = _weights(tr, T - 1, lp.name)
        V = torch.cat([W, b[:, None]], 1)[torch.as_tensor(lp.neurons)]
        V = V + 0.5 * torch.randn(V.shape, generator=gen, dtype=V.dtype)
        V.requires_grad_(True)
        val, grad = prob.value_grad(V.detach())
        auto = torch.autograd.grad(prob.value(V).sum(), V)[0]
        np.testing.assert_allclose(grad.numpy(), auto.numpy(), rtol=1e-9, atol=1e-12)
        rows = V.detach()
        for c, j in enumerate(lp.neurons):
            def neuron(t: int, n: str = lp.name, j: int = int(j),
                       row: torch.Tensor = rows[c]) -> dict:
                W, b = _weights(tr, t, n)
                W[j], b[j] = row[:-1], row[-1]
                return {n: (W, b)}

            assert float(val[c]) == pytest.approx(_direct_mean(tr, T, neuron), rel=1e-9)
    last = plan.layers[-1]  # the output layer: every neuron tracked, identity Jacobian
    chain = ws.chain([last.name])
    W, b = _weights(tr, T - 1, last.name)
    V, c = W + 0.2, b - 0.1
    u = torch.cat([V, c[:, None]], 1).reshape(1, -1).requires_grad_(True)
    val, grad = chain.value_grad(u.detach())
    assert float(val) == pytest.approx(_direct_mean(tr, T, lambda t: {last.name: (V, c)}),
                                       rel=1e-9)
    np.testing.assert_allclose(grad.numpy(), torch.autograd.grad(chain.value(u).sum(), u)[0],
                               rtol=1e-9, atol=1e-12)
    H = chain.hessian(u.detach())[0]
    Hauto = torch.autograd.functional.hessian(lambda z: chain.value(z[None])[0],
                                              u.detach()[0])
    np.testing.assert_allclose(H.numpy(), Hauto.numpy(), rtol=1e-8, atol=1e-12)


def test_taylor_loss_refuses_bad_input(mlp_mse) -> None:
    tr = open_trace(mlp_mse)
    name = next(iter(tr.layers))
    W, b = _weights(tr, 0, name)
    with pytest.raises(UsageError, match="out of range"):
        taylor_loss(tr, 10_000, {name: (W, b)})
    with pytest.raises(UsageError, match="shape"):
        taylor_loss(tr, 0, {name: (W[:, :2], b)})
    with pytest.raises(UsageError, match="does not exist"):
        taylor_loss(tr, 0, {"nope": (W, b)})
    with pytest.raises(UsageError, match="does not exist"):
        neuron_taylor_loss(tr, 0, name, 99, W[0], b[0])
