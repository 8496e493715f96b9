"""Layer kinds other than linear (conv 1/2-d, conv_transpose, embedding) and the losses
bce_with_logits and nll, against references computed another way: least squares on features
built with ``F.unfold``, scipy on the true loss of a model linear in the analysed weights,
the recorded sample losses, autograd through models rebuilt from the recorded weights, and
the closed form of a linear objective over a ball."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from scipy.optimize import minimize

from ntrace.analyze import (
    AnalysisOptions,
    analyze_trace,
    neuron_taylor_loss,
    open_results,
    taylor_loss,
)
from ntrace.analyze.hindsight import Accumulators
from ntrace.analyze.plan import make_plan
from ntrace.analyze.solve import CONVERGED, UNBOUNDED
from ntrace.analyze.source import TaylorSource
from ntrace.cli import main
from ntrace.cli.analyze import analyze
from ntrace.errors import UsageError
from ntrace.format.metadata import Activation
from ntrace.format.reader import open_trace
from ntrace.plot import make_figures

from .kinds_data import (
    LOSSES,
    MODELS,
    conv_only,
    conv_output_trace,
    convs_1d,
    convs_2d,
    convs_3d,
    embedding_trace,
    nll_model,
    padded_only,
    positions_only,
    record_trace,
    rrelu_model,
    sequence,
    tracked_mask,
)

ROOT = Path(__file__).resolve().parents[2]
CIFAR = ROOT.parent / "shared" / "data" / "cifar10"


@pytest.fixture(scope="module")
def conv_mse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(10)
    X = torch.randn(64, 2, 4, 4)
    Y = torch.stack([X[:, 0].mean((1, 2)), X[:, 1, :2].sum((1, 2))], 1)
    Y = Y + 0.3 * torch.randn(64, 2)
    return record_trace(conv_only(), tmp_path_factory.mktemp("conv") / "c.zarr", "mse", X, Y)


@pytest.fixture(scope="module")
def traces(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One small trace per model: 1-d conv and conv_transpose with groups and dilation
    (cross-entropy, 3 tracked neurons per layer), 2-d ones with a max-pool and 3-d ones
    (MSE), an embedding (bce_with_logits, soft targets), a log-softmax classifier (nll), a
    conv layer that is the output (identity Jacobian) and a conv layer with an RReLU in eval
    mode (MSE)."""
    d = tmp_path_factory.mktemp("kinds")
    torch.manual_seed(11)
    X1 = torch.randn(48, 2, 5)
    out = {"convs_1d": record_trace(convs_1d(), d / "c1.zarr", "cross_entropy", X1,
                                    (X1[:, 0, 0] > 0).long() + (X1[:, 1, 1] > 0.5).long(),
                                    neurons=3, lr=0.2)}
    X2 = torch.randn(48, 1, 8, 8)
    out["convs_2d"] = record_trace(convs_2d(), d / "c2.zarr", "mse", X2,
                                   torch.stack([X2.mean((1, 2, 3)), X2[:, 0, 0].sum(1)], 1))
    X3 = torch.randn(48, 1, 3, 4, 5)
    out["convs_3d"] = record_trace(convs_3d(), d / "c3.zarr", "mse", X3,
                                   torch.stack([X3.mean((1, 2, 3, 4)), X3[:, 0, 0, 0, 0]], 1),
                                   rounds=6)
    out["embedding"] = embedding_trace(d / "e.zarr")
    out["conv_out"] = conv_output_trace(d / "o.zarr")
    Xn = torch.randn(48, 1, 5)
    out["nll"] = record_trace(nll_model(), d / "n.zarr", "nll", Xn,
                              (Xn[:, 0, :2].sum(1) > 0).long() + (Xn[:, 0, 4] > 1).long(),
                              lr=0.2)
    Xs = torch.randint(0, 9, (48, 6))
    Xs[Xs > 6] = 1  # padding (index 1) at a third of the positions
    out["sequence"] = record_trace(sequence(), d / "s.zarr", "cross_entropy", Xs,
                                   ((Xs == 3).sum(1) > (Xs == 4).sum(1)).long(), lr=0.2)
    Xr = torch.randn(48, 2, 5)
    out["rrelu"] = record_trace(rrelu_model(), d / "r.zarr", "mse", Xr,
                                torch.stack([Xr[:, 0].mean(1), Xr[:, 1, 2] - Xr[:, 0, 4]], 1))
    return out


# -- (a) a model linear in a conv layer's weights: Taylor loss = loss --------------------
def _certified(got: float, gap: float, ref: float, tol: float) -> None:
    assert gap <= tol
    assert got - ref <= gap + 1e-10  # true suboptimality ≤ certificate
    assert got >= ref - 1e-8


def _unfold_design(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """G (T, S, o, j, i): how output o moves with row i of conv neuron j (filter entries
    from F.unfold of the input through the frozen linear layer, then the bias), so that
    T_s = f_s + G_s (u − w); and the row vectors w (T, j, i) of every round."""
    tr = open_trace(path)
    x = torch.as_tensor(tr.read("layers/0/input").astype(np.float64))  # (T, S, c, 4, 4)
    T, S, c = x.shape[:3]
    n = tr.layers["0"].out_features
    U = F.unfold(x.reshape(T * S, c, 4, 4), 3, padding=1)  # (k, c·9, 16)
    p = tr.attrs.output_size
    L = torch.as_tensor(tr.read("layers/2/weight").astype(np.float64)).reshape(T, p, n, 16)
    G = torch.einsum("tojq,tsiq->tsoji", L, U.reshape(T, S, -1, 16))
    G = torch.cat([G, L.sum(-1)[:, None].expand(T, S, -1, -1).unsqueeze(-1)], -1).numpy()
    W = tr.read("layers/0/weight").astype(np.float64).reshape(T, n, 9 * c)
    w = np.concatenate([W, tr.read("layers/0/bias").astype(np.float64)[..., None]], -1)
    return G, w


def _least_squares_optima(ds, tr, G: np.ndarray, w: np.ndarray, tol: float) -> None:
    """Layer- and neuron-scale optima of an MSE trace whose output is affine in one layer,
    ``T_s = f_s + G_s (u − w)`` with G (T, S, o, j, i), against ``np.linalg.lstsq``."""
    n, d = G.shape[3:]
    # least-squares targets: |T_s − y_s|²/p = |G_s u − r_s|²/p
    r = (tr.read("taylor/target").astype(np.float64) - tr.read("taylor/output")
         + np.einsum("tsoji,tji->tso", G, w))
    for k, N in enumerate(ds.checkpoint.values):
        A = G[:N].reshape(-1, n * d)  # rows (t, s, o), columns (neuron, row entry)
        b = r[:N].reshape(-1)
        u = np.linalg.lstsq(A, b, rcond=None)[0]
        ref = float(np.mean((A @ u - b) ** 2))
        _certified(float(ds.layer_optimum[k, 0]), float(ds.layer_gap[k, 0]), ref, tol)
        for j in range(n):
            Aj = G[:N, :, :, j].reshape(-1, d)
            rj = (r[:N] - np.einsum("tsoji,tji->tso", G[:N], w[:N])
                  + np.einsum("tsoi,ti->tso", G[:N, :, :, j], w[:N, j])).reshape(-1)
            v = np.linalg.lstsq(Aj, rj, rcond=None)[0]
            _certified(float(ds.neuron_optimum[k, j]), float(ds.neuron_gap[k, j]),
                       float(np.mean((Aj @ v - rj) ** 2)), tol)


def test_conv_layer_mse_optimum_equals_least_squares_on_unfolded_inputs(conv_mse) -> None:
    tol = 1e-10
    ds = analyze_trace(conv_mse, AnalysisOptions(domain="none", tol=tol, checkpoints=4,
                                                 layers=("0",), exploration=False))
    assert ds.attrs["ntrace"]["layer_scale_layers"] == ["0"]
    G, w = _unfold_design(conv_mse)
    tr = open_trace(conv_mse)
    _least_squares_optima(ds, tr, G, w, tol)
    # the optimum point, put into the model itself, has the reported loss
    model = conv_only().double()
    j = 1
    pt = ds.neuron_optimum_point.values[j, :19]
    losses = []
    for t in range(tr.taylor_rounds):
        with torch.no_grad():
            model[0].weight.copy_(torch.as_tensor(tr.read("layers/0/weight", t)))
            model[0].bias.copy_(torch.as_tensor(tr.read("layers/0/bias", t)))
            model[0].weight[j] = torch.as_tensor(pt[:18]).reshape(2, 3, 3)
            model[0].bias[j] = float(pt[18])
            model[2].weight.copy_(torch.as_tensor(tr.read("layers/2/weight", t)))
            model[2].bias.copy_(torch.as_tensor(tr.read("layers/2/bias", t)))
            out = model(torch.as_tensor(tr.read("layers/0/input", t).astype(np.float64)))
        y = torch.as_tensor(tr.read("taylor/target", t).astype(np.float64))
        losses.append(float(F.mse_loss(out, y)))
    # (the recorded outputs differ from a float64 forward by float32 rounding)
    assert float(ds.neuron_optimum[-1, j]) == pytest.approx(np.mean(losses), rel=1e-5)


@pytest.mark.parametrize("kind", ["positions", "padding"])
def test_layers_on_extra_axes_optima_equal_least_squares(tmp_path: Path, kind: str) -> None:
    """A Linear on (batch, 4, 3) and a padded Embedding(6, 2, padding_idx=0) over 4 indices,
    each → Flatten → frozen Linear(8, 2) (MSE, Taylor loss = loss): optima at layer and neuron
    scale against least squares on a design built here from the recorded inputs and the
    head's weights, summed over positions by hand; the padding entry is no column (padding
    fills a third of the inputs, so a design that kept it would reach a lower optimum)."""
    torch.manual_seed(16)
    if kind == "positions":
        X = torch.randn(64, 4, 3)
        Y = torch.stack([X[:, 0, 0] - X[:, 3, 2], X[:, 1].sum(1)], 1) + 0.3 * torch.randn(64, 2)
        model = positions_only()
    else:
        X = torch.randint(0, 6, (64, 4))
        X[X > 3] = 0  # the padding index
        Y = torch.stack([(X == 1).float().sum(1), (X[:, :2] == 2).float().sum(1) - 1], 1)
        Y = Y + 0.3 * torch.randn(64, 2)
        model = padded_only()
    path = record_trace(model, tmp_path / f"{kind}.zarr", "mse", X, Y, rounds=8, samples=6,
                        lr=0.1)
    tr = open_trace(path)
    tol = 1e-10
    ds = analyze_trace(path, AnalysisOptions(domain="none", tol=tol, checkpoints=3,
                                             layers=("0",), exploration=False))
    assert ds.attrs["ntrace"]["layer_scale_layers"] == ["0"]
    L = tr.read("layers/2/weight").astype(np.float64).reshape(-1, 2, 4, 2)  # (T, o, q, j)
    W = tr.read("layers/0/weight").astype(np.float64)
    x = tr.read("layers/0/input")
    if kind == "positions":
        assert tr.layers["0"].geometry.input_shape == (4, 3)
        G = np.einsum("toqj,tsqi->tsoji", L, x.astype(np.float64))
        G = np.concatenate([G, L.sum(2)[:, None, :, :, None].repeat(x.shape[1], 1)], -1)
        w = np.concatenate([W, tr.read("layers/0/bias").astype(np.float64)[..., None]], -1)
    else:
        assert tr.layers["0"].geometry.padding_idx == 0
        assert (W[:, 0] == 0).all()  # the padding row never moves
        onehot = (x[..., None] == np.arange(1, 6)).astype(np.float64)  # (T, S, q, 5), no pad
        G = np.einsum("toqj,tsqv->tsojv", L, onehot)
        w = W[:, 1:].transpose(0, 2, 1)  # (T, j, 5): each neuron's column without the pad
    _least_squares_optima(ds, tr, G, w, tol)
    assert ds.neuron_optimum_point.shape[-1] == G.shape[-1]


@pytest.mark.parametrize("loss", ["bce_with_logits", "cross_entropy"])
def test_conv_layer_iterative_losses_equal_scipy_on_the_true_loss(tmp_path: Path,
                                                                  loss: str) -> None:
    """Unconstrained optimum of the conv layer of a conv → frozen linear model (Taylor loss =
    loss) with soft binary targets / overlapping classes, against BFGS on the model's loss."""
    torch.manual_seed(12)
    X = torch.randn(96, 1, 4, 4)
    if loss == "cross_entropy":  # 64 samples, 20 parameters: not separable
        Y = (X[:, 0].mean((1, 2)) + 0.5 * torch.randn(96) > 0).long() + (X[:, 0, 0, 0] > 1)
    else:
        Y = torch.sigmoid(torch.stack([X[:, 0].mean((1, 2)), X[:, 0, 0].mean(1),
                                       X[:, 0, :, 0].mean(1)], 1) * 3)
    # 3 outputs, 2 bias columns: the outputs at u = 0 are not in the design's span, so the
    # certificate's tightness below tests its scaling
    path = record_trace(conv_only(1, 2, p=3), tmp_path / "c.zarr", loss, X, Y, rounds=8,
                        samples=8)
    tol = 1e-9
    ds = analyze_trace(path, AnalysisOptions(domain="none", tol=tol, checkpoints=(8,),
                                             layers=("0",), exploration=False))
    tr = open_trace(path)
    G, w = _unfold_design(path)  # (T, S, o, j, i)
    f = tr.read("taylor/output").astype(np.float64)
    y = tr.read("taylor/target")
    T, S = f.shape[:2]
    Gk = G.reshape(T * S, 3, -1)
    base = (f - np.einsum("tsoji,tji->tso", G, w)).reshape(T * S, 3)
    yk = y.reshape(T * S, *y.shape[2:])

    def fun(u: np.ndarray) -> tuple[float, np.ndarray]:
        z = torch.as_tensor(base + Gk @ u)
        z.requires_grad_(True)
        target = torch.as_tensor(yk if loss == "cross_entropy" else yk.astype(np.float64))
        val = LOSSES[loss](z, target)
        (gz,) = torch.autograd.grad(val, z)
        return float(val.detach()), np.einsum("ko,koi->i", gz.numpy(), Gk)

    res = minimize(fun, w[-1].ravel(), jac=True, method="BFGS",
                   options={"gtol": 1e-11, "maxiter": 20000})
    assert int(ds.layer_status[0, 0]) == CONVERGED
    _certified(float(ds.layer_optimum[0, 0]), float(ds.layer_gap[0, 0]), float(res.fun), tol)
    assert (ds.neuron_status.values == CONVERGED).all()
    assert (ds.neuron_optimum.values[0] >= float(res.fun) - 1e-8).all()  # fewer freedoms
    # the duality certificate is a lower bound anywhere, not only near the optimum
    plan = make_plan(tr, AnalysisOptions(layers=("0",), scales=("layer",)))
    src = TaylorSource(tr, plan.layers, torch.device("cpu"), 1 << 20)
    acc = Accumulators(list(plan.layers), [], ["0"], False, loss, T * S, 3, src.device,
                       1 << 28)
    for block in src.blocks(0, T):
        acc.add(block)
    prob = acc.layer("0")
    gen = torch.Generator().manual_seed(3)
    for scale in (0.0, 0.1, 1.0):
        u = torch.as_tensor(res.x)[None] + scale * torch.randn(1, len(res.x), generator=gen,
                                                               dtype=torch.float64)
        _, g = prob.value_grad(u)
        nu = -torch.linalg.lstsq(prob.hessian(u)[0], g[0]).solution
        dual = float(prob.dual(u, nu[None]))
        assert dual <= float(res.fun) + 1e-10
        if scale == 0:  # and tight at the optimum
            assert dual >= float(res.fun) - 1e-8


def _ball_min(fun, m: np.ndarray, R: float) -> float:
    cons = {"type": "ineq", "fun": lambda v: R * R - np.sum((v - m) ** 2),
            "jac": lambda v: -2 * (v - m)}
    res = minimize(fun, m, jac=True, method="SLSQP", constraints=[cons],
                   options={"ftol": 1e-15, "maxiter": 2000})
    assert res.status in (0, 8) and np.sum((res.x - m) ** 2) <= R * R * (1 + 1e-9)
    return float(res.fun)


@pytest.mark.parametrize("domain", ["none", "ball"])
def test_neuron_problems_in_the_row_space_of_few_samples(tmp_path: Path, domain: str) -> None:
    """With few samples (first checkpoint) the solvers work in the row space of the design
    (conv neurons: 28 parameters, 12 output rows; linear ones: 33 parameters, 6 samples);
    later checkpoints do not. Both against scipy on the model's own loss (bce_with_logits,
    soft targets: attained), unconstrained or over each neuron's ball."""
    torch.manual_seed(14)
    X = torch.randn(64, 3, 4, 4)
    Y = torch.sigmoid(torch.stack([X[:, 0].mean((1, 2)), X[:, 2, 0].mean(1)], 1) * 3)
    path = record_trace(conv_only(3, 2, frozen=False), tmp_path / "r.zarr", "bce_with_logits",
                        X, Y, rounds=4, samples=6, lr=0.3)
    tol = 1e-9
    ds = analyze_trace(path, AnalysisOptions(domain=domain, tol=tol, checkpoints=(1, 4),
                                             scales=("neuron",), exploration=False))
    tr = open_trace(path)
    G, w = _unfold_design(path)  # conv neurons: (T, S, o, j, i)
    h = tr.read("layers/2/input").astype(np.float64)
    h = np.concatenate([h, np.ones(h.shape[:2] + (1,))], -1)  # (T, S, 33)
    w2 = np.concatenate([tr.read("layers/2/weight"), tr.read("layers/2/bias")[..., None]],
                        -1).astype(np.float64)  # (T, o, 33)
    f = tr.read("taylor/output").astype(np.float64)
    y = torch.as_tensor(tr.read("taylor/target").astype(np.float64))
    for k, N in enumerate(ds.checkpoint.values):
        for c in range(len(ds.neuron)):
            lname = str(ds.neuron_layer.values[c])
            j = int(ds.neuron_index[c])
            if lname == "0":
                D, rows = G[:N, :, :, j], w[:, j]  # T = f + D (u − w_j)
            else:
                D = np.zeros(h[:N].shape[:2] + (2, 33))
                D[:, :, j] = h[:N]
                rows = w2[:, j]
            base = torch.as_tensor(f[:N] - np.einsum("tsoi,ti->tso", D, rows[:N]))
            Dt = torch.as_tensor(D)

            def fun(u: np.ndarray, base=base, Dt=Dt, N=N) -> tuple[float, np.ndarray]:
                v = torch.as_tensor(u).requires_grad_(True)
                z = base + torch.einsum("tsoi,i->tso", Dt, v)
                val = F.binary_cross_entropy_with_logits(z, y[:N])
                return float(val.detach()), torch.autograd.grad(val, v)[0].numpy()

            m = rows.mean(0)  # the ball: centre the mean iterate of all 4 rounds
            if domain == "ball":
                R = float(np.max(np.linalg.norm(rows - m, axis=1)))
                assert float(ds.neuron_domain_size[c]) == pytest.approx(R, rel=1e-9)
                ref = _ball_min(fun, m, R)
            else:
                ref = float(minimize(fun, m, jac=True, method="BFGS",
                                     options={"gtol": 1e-12, "maxiter": 20000}).fun)
            assert int(ds.neuron_status[k, c]) == CONVERGED
            _certified(float(ds.neuron_optimum[k, c]), float(ds.neuron_gap[k, c]), ref, tol)


# -- (b) Taylor loss at the iterate and its gradient ------------------------------------
@pytest.mark.parametrize("name", list(MODELS))
def test_taylor_loss_and_gradient_at_the_iterate(traces: dict[str, Path], name: str) -> None:
    tr = open_trace(traces[name])
    kinds = {la.kind for la in tr.layers.values()}
    assert kinds & {"conv", "conv_transpose", "embedding"}
    model = MODELS[name]().double()
    loss = tr.attrs.loss.id
    first = next(iter(tr.layers))
    for t in (0, tr.taylor_rounds - 1):
        with torch.no_grad():
            for lname in tr.layers:
                mod = model.get_submodule(lname)
                mod.weight.copy_(torch.as_tensor(tr.read(f"layers/{lname}/weight", t)))
                if getattr(mod, "bias", None) is not None:
                    mod.bias.copy_(torch.as_tensor(tr.read(f"layers/{lname}/bias", t)))
        x = torch.as_tensor(tr.read(f"layers/{first}/input", t))
        out = model(x if x.dtype == torch.int64 else x.double())
        np.testing.assert_allclose(out.detach().numpy(), tr.read("taylor/output", t),
                                   rtol=1e-4, atol=1e-5)
        target = torch.as_tensor(tr.read("taylor/target", t))
        ref = LOSSES[loss](out, target if target.dtype == torch.int64 else target.double())
        want = float(tr.read("taylor/sample_loss", t).astype(np.float64).mean())
        assert float(ref.detach()) == pytest.approx(want, rel=1e-5)
        params = [p for lname in tr.layers for p in model.get_submodule(lname).parameters()]
        grads = dict(zip([id(p) for p in params], torch.autograd.grad(ref, params),
                         strict=True))
        for lname, la in tr.layers.items():
            mod = model.get_submodule(lname)
            W = mod.weight.detach().clone().requires_grad_(True)
            bias = getattr(mod, "bias", None)
            b = None if bias is None else bias.detach().clone().requires_grad_(True)
            tl = taylor_loss(tr, t, {lname: (W, b)})
            assert float(tl.detach()) == pytest.approx(want, rel=1e-5)
            got = torch.autograd.grad(tl, [W] if b is None else [W, b])
            tracked = tr.tracked[lname]
            mask = tracked_mask(la, tuple(W.shape), tracked)
            np.testing.assert_allclose(got[0].numpy()[mask],
                                       grads[id(mod.weight)].numpy()[mask],
                                       rtol=1e-4, atol=1e-6)
            if b is not None:
                np.testing.assert_allclose(got[1].numpy()[tracked],
                                           grads[id(mod.bias)].numpy()[tracked],
                                           rtol=1e-4, atol=1e-6)
            j = int(tracked[-1])
            row = W.detach()[torch.as_tensor(tracked_mask(la, tuple(W.shape), [j]))]
            nl = neuron_taylor_loss(tr, t, lname, j, row,
                                    None if b is None else b.detach()[j])
            assert float(nl) == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("name", list(MODELS))
def test_analysis_objectives_equal_direct_taylor_losses(traces: dict[str, Path],
                                                        name: str) -> None:
    """The statistics the solvers minimise (Gram quadratics, affine nll statistics, working
    sets built from the designs of every kind) against the mean of Taylor losses evaluated
    directly at random candidates (checked against autograd above)."""
    tr = open_trace(traces[name])
    plan = make_plan(tr, AnalysisOptions(max_dim=1 << 20))
    src = TaylorSource(tr, plan.layers, torch.device("cpu"), 1 << 16)
    T = 4
    names = [lp.name for lp in plan.layers]
    acc = Accumulators(list(plan.layers), names, plan.layer_scale, "network" in plan.scales,
                       plan.loss, T * src.samples, tr.attrs.output_size, src.device, 1 << 28)
    for block in src.blocks(0, T):
        acc.add(block)
    gen = torch.Generator().manual_seed(2)
    cand: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
    for lname, la in tr.layers.items():
        W = torch.as_tensor(tr.read(f"layers/{lname}/weight", T - 1).astype(np.float64))
        b = (torch.as_tensor(tr.read(f"layers/{lname}/bias", T - 1).astype(np.float64))
             if la.bias else None)
        cand[lname] = (W + 0.3 * torch.randn(W.shape, generator=gen, dtype=W.dtype),
                       None if b is None else b + 0.3 * torch.randn(b.shape, generator=gen,
                                                                    dtype=b.dtype))

    def rows(lname: str, neurons: np.ndarray) -> torch.Tensor:
        V, c = cand[lname]
        la = tr.layers[lname]
        out = [V[torch.as_tensor(tracked_mask(la, tuple(V.shape), [j]))] for j in neurons]
        if c is not None:
            out = [torch.cat([r, c[j:j + 1]]) for r, j in zip(out, neurons, strict=True)]
        return torch.stack(out)

    def direct(params_of) -> float:
        return float(np.mean([float(taylor_loss(tr, t, params_of(t))) for t in range(T)]))

    def recorded(lname: str, t: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        W = torch.as_tensor(tr.read(f"layers/{lname}/weight", t).astype(np.float64))
        b = (torch.as_tensor(tr.read(f"layers/{lname}/bias", t).astype(np.float64))
             if tr.layers[lname].bias else None)
        return W, b

    for lp in plan.layers:
        obj = acc.neurons(lp)
        u = rows(lp.name, lp.neurons)
        got = obj.value(u)
        for c, j in enumerate(lp.neurons):
            def one(t: int, n: str = lp.name, j: int = int(j)) -> dict:
                W, b = recorded(n, t)
                m = torch.as_tensor(tracked_mask(tr.layers[n], tuple(W.shape), [j]))
                W[m] = cand[n][0][m]
                if b is not None:
                    b[j] = cand[n][1][j]  # type: ignore[index]
                return {n: (W, b)}

            assert float(got[c]) == pytest.approx(direct(one), rel=1e-9, abs=1e-12)
        if lp.name in plan.layer_scale:
            got = acc.layer(lp.name).value(rows(lp.name, lp.tracked).reshape(1, -1))
            assert float(got[0]) == pytest.approx(direct(lambda t, n=lp.name: {n: cand[n]}),
                                                  rel=1e-9)
    if "network" in plan.scales:
        u = torch.cat([rows(n, plan.layers[i].tracked).reshape(-1)
                       for i, n in enumerate(names)])[None]
        assert float(acc.network().value(u)[0]) == pytest.approx(direct(lambda t: cand),
                                                                 rel=1e-9)
    if plan.loss in ("cross_entropy", "bce_with_logits"):  # gradients and Hessians
        for lp in plan.layers:
            prob = acc.neurons(lp)
            u = rows(lp.name, lp.neurons).requires_grad_(True)
            val, grad = prob.value_grad(u.detach())
            auto = torch.autograd.grad(prob.value(u).sum(), u)[0]
            np.testing.assert_allclose(grad.numpy(), auto.numpy(), rtol=1e-8, atol=1e-12)
            H = prob.hessian(u.detach())[0]
            rest = u.detach()[1:]
            Ha = torch.autograd.functional.hessian(
                lambda z, prob=prob, rest=rest: prob.value(torch.cat([z[None], rest]))[0],
                u.detach()[0])
            np.testing.assert_allclose(H.numpy(), Ha.numpy(), rtol=1e-7, atol=1e-12)


# -- (c) the CLI on convnet traces -------------------------------------------------------
def _cli_analysis(trace: Path, out: Path, *args: str) -> None:
    res = CliRunner().invoke(analyze, [str(trace), "--out", str(out), *args])
    assert res.exit_code == 0, res.stdout + res.stderr
    assert "unexpected" not in res.stderr
    ds = open_results(out / "results.zarr")
    assert np.isfinite(ds.neuron_optimum.values).all()
    assert (ds.neuron_status.values == CONVERGED).all()
    for fig in ("fig3_regret", "fig5_exploration"):
        assert (out / "figures" / f"{fig}.png").stat().st_size > 1000
    assert "neurons" in res.stdout and "cumulative loss" in res.stdout


@pytest.mark.skipif(not CIFAR.is_dir(), reason=f"CIFAR-10 data not present at {CIFAR}")
def test_cli_analyzes_a_cifar10_convnet_trace(tmp_path: Path) -> None:
    trace = tmp_path / "cifar.zarr"
    res = CliRunner().invoke(main, ["record", "--task", "cifar10-convnet", "--data-dir",
                                    str(CIFAR), "--steps", "6", "--taylor-every", "2",
                                    "--samples-per-round", "2", "--neurons", "3",
                                    "--probe-size", "8", "--probe-every", "2", "--out",
                                    str(trace)])
    assert res.exit_code == 0, res.stdout + res.stderr
    assert {la.kind for la in open_trace(trace).layers.values()} == {"conv", "linear"}
    _cli_analysis(trace, tmp_path / "an", "--checkpoints", "2")
    ds = open_results(tmp_path / "an" / "results.zarr")
    skipped = " ".join(ds.attrs["ntrace"]["skipped"])
    assert "layer scale of conv1: only 3 of 64 neurons were tracked" in skipped
    assert "network scale needs every neuron" in skipped


def test_cli_analyzes_the_wrapped_convnet_example(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    trace = tmp_path / "w.zarr"
    res = CliRunner().invoke(main, ["record", "--out", str(trace), "--taylor-every", "20",
                                    "--samples-per-round", "4", "--probe-size", "8", "--",
                                    "python", "tools/examples/convnet_loop.py", "--epochs", "1"])
    assert res.exit_code == 0, res.stdout + res.stderr
    tr = open_trace(trace)
    assert [la.kind for la in tr.layers.values()] == ["conv", "conv", "linear", "linear"]
    assert set(tr.modules) >= {"features.2", "classifier.3"}  # max-pool and dropout
    _cli_analysis(trace, tmp_path / "an", "--checkpoints", "2")
    ds = open_results(tmp_path / "an" / "results.zarr")
    assert (ds.layer_status.values == CONVERGED).all()  # every neuron tracked: all scales
    assert int(ds.network_status[-1]) == CONVERGED


def test_an_rrelu_in_eval_mode_is_recorded_as_leaky_relu_and_analysed(
        traces: dict[str, Path]) -> None:
    """The activation the registry's RReLU op writes (leaky_relu, slope (lower + upper)/2): its
    states are stored and the analysis runs on them (the Taylor losses and objectives of this
    trace are checked against autograd in (b))."""
    tr = open_trace(traces["rrelu"])
    assert tr.layers["0"].activation == Activation("leaky_relu", 0.15)
    assert tr.has("layers/0/mask")
    ds = analyze_trace(traces["rrelu"], AnalysisOptions(checkpoints=3))
    assert (ds.neuron_status.values == CONVERGED).all()
    assert (ds.layer_status.values == CONVERGED).all()
    assert np.isfinite(ds.neuron_regret.values).all()


# -- (d) bce_with_logits and nll ---------------------------------------------------------
def test_bce_and_conv_traces_analyse_on_every_domain(traces: dict[str, Path]) -> None:
    for name in ("embedding", "convs_1d", "convs_2d", "sequence"):
        for domain in ("ball", "box"):
            ds = analyze_trace(traces[name], AnalysisOptions(domain=domain, checkpoints=3,
                                                             exploration=False, dynamic=True))
            for scale in ("network", "layer", "neuron"):
                if f"{scale}_status" in ds:
                    st = ds[f"{scale}_status"].values
                    assert (st[np.isin(st, (0, 1))] == CONVERGED).all(), (name, domain, scale)
            assert (ds.neuron_best_response_gap.values <= 1e-6).all()
            assert (ds.neuron_dynamic_regret.values >= ds.neuron_regret.values - 1e-6).all()
    ds = analyze_trace(traces["convs_1d"], AnalysisOptions(checkpoints=2, exploration=False))
    assert "network" not in ds.attrs["ntrace"]["scales"]  # 3 tracked neurons per layer


def test_nll_is_linear_closed_form_on_a_ball_and_unbounded_without_one(
        traces: dict[str, Path], tmp_path: Path) -> None:
    path = traces["nll"]
    ds = analyze_trace(path, AnalysisOptions(domain="ball", checkpoints=(4, 10),
                                             exploration=False, dynamic=True))
    tr = open_trace(path)
    assert (ds.neuron_status.values == CONVERGED).all()
    assert (ds.neuron_gap.values == 0).all()
    # reference: the hindsight objective is linear; its gradient by autograd of the
    # per-round Taylor losses, its minimum over the ball at centre − radius · g/|g|
    for c in range(len(ds.neuron)):
        lname = str(ds.neuron_layer.values[c])
        j = int(ds.neuron_index[c])
        center = torch.as_tensor(ds.neuron_domain_center.values[c])
        center = center[torch.isfinite(center)]
        v = center.clone().requires_grad_(True)
        has_bias = tr.layers[lname].bias
        row, bias = (v[:-1], v[-1]) if has_bias else (v, None)
        vals = torch.stack([neuron_taylor_loss(tr, t, lname, j, row, bias) for t in range(10)])
        (g,) = torch.autograd.grad(vals.mean(), v)
        ref = float(vals.mean().detach()) - float(ds.neuron_domain_size[c]) * float(g.norm())
        assert float(ds.neuron_optimum[-1, c]) == pytest.approx(ref, rel=1e-9, abs=1e-12)
    assert (ds.neuron_best_response.values <= ds.taylor_loss.values[:, None] + 1e-6).all()
    none = analyze_trace(path, AnalysisOptions(domain="none", checkpoints=3,
                                               exploration=False))
    for scale in ("network", "layer", "neuron"):
        assert (none[f"{scale}_status"].values == UNBOUNDED).all()
        assert np.isnan(none[f"{scale}_optimum"].values).all()
    assert any("unbounded" in n for n in none.attrs["ntrace"]["notes"])
    paths = make_figures([none], tmp_path / "figures")  # nothing finite to draw: no crash
    assert {p.name for p in paths} >= {"fig3_regret.png", "fig3_regret.svg"}


def test_what_cannot_be_done_is_a_usage_error(traces: dict[str, Path]) -> None:
    with pytest.raises(UsageError, match=r"must hold .* KiB of Taylor data in memory \(layer "
                                         r"2: .* above max_memory 1000 B.*--max-memory"):
        analyze_trace(traces["convs_1d"], AnalysisOptions(max_memory=1000, exploration=False))
    with pytest.raises(UsageError, match="neuron scale was asked for but no selected layer"):
        analyze_trace(traces["convs_2d"], AnalysisOptions(max_dim=4, scales=("neuron",),
                                                          exploration=False))
    res = CliRunner().invoke(analyze, [str(traces["convs_1d"]), "--max-memory", "0"])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "--max-memory" in res.stderr and res.stderr.startswith("error: ")
    ds = analyze_trace(traces["convs_2d"], AnalysisOptions(max_dim=12, exploration=False,
                                                           checkpoints=2))
    skipped = " ".join(ds.attrs["ntrace"]["skipped"])
    assert "neuron scale of 0 (conv): each neuron has 10 parameters" not in skipped
    assert "neuron scale of 3 (conv_transpose): each neuron has 17 parameters, above " \
           "max_dim 12" in skipped
