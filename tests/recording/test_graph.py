"""Graph models (convolutions, pooling, residuals, dropout, norms): Jacobians by reverse and
forward mode agree with torch.func.jacrev; recorded factors give autograd's gradients."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zarr
from torch import nn

from ntrace.errors import UnsupportedModelError
from ntrace.format.bits import unpack
from ntrace.format.metadata import Sampling
from ntrace.format.reader import open_trace
from ntrace.format.validate import validate_trace
from ntrace.ops.maxpool import winners
from ntrace.recording import record
from ntrace.recording.graph_jacobian import jacobian_forward, jacobians_reverse

from .graph_conformance import check_graph_trace


class Residual(nn.Module):
    """conv → ReLU → maxpool → [conv → ReLU → conv, + skip] → BN(eval) → avgpool → linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.act0 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.conv1 = nn.Conv2d(6, 6, 3, padding=1)
        self.act1 = nn.LeakyReLU(0.1)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1, groups=2)
        self.norm = nn.BatchNorm2d(6).eval().requires_grad_(False)  # not tracked: frozen
        self.up = nn.ConvTranspose2d(6, 4, 2, stride=2)
        self.act2 = nn.ReLU6()
        self.gap = nn.AdaptiveAvgPool2d(2)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pool(self.act0(self.stem(x)))
        h = self.conv2(self.act1(self.conv1(h))) + h
        h = self.act2(self.up(self.norm(h)))
        return self.fc(self.flat(self.gap(h)))


def reference_jacobian(model: nn.Module, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """∂f/∂a_l per sample by torch.func.jacrev on a perturbation at the layer output."""
    import torch.func as tf

    with torch.no_grad():
        shape = None

        def grab(m: nn.Module, a: object, out: torch.Tensor) -> None:
            nonlocal shape
            shape = out.shape[1:]

        h = layer.register_forward_hook(grab)
        model(x[:1])
        h.remove()
    rows = []
    for b in range(len(x)):
        def f(d: torch.Tensor, b: int = b) -> torch.Tensor:
            hook = layer.register_forward_hook(lambda m, a, out: out + d)
            try:
                return model(x[b:b + 1])[0]
            finally:
                hook.remove()

        zero = torch.zeros(1, *shape, dtype=next(model.parameters()).dtype)
        rows.append(tf.jacrev(f)(zero)[:, 0])  # (p, *out)
    return torch.stack(rows)


@pytest.fixture
def net() -> Residual:
    torch.manual_seed(0)
    return Residual().double()


def test_reverse_forward_and_jacrev_agree(net: Residual) -> None:
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    layers = {"stem": net.stem, "conv1": net.conv1, "conv2": net.conv2, "up": net.up,
              "fc": net.fc}
    tracked = {"stem": torch.tensor([0, 2, 5]), "conv1": torch.arange(6),
               "conv2": torch.tensor([1]), "up": torch.tensor([0, 3]), "fc": torch.arange(5)}
    rev = jacobians_reverse(lambda: net(x), layers, tracked, max_bytes=1 << 12)  # tiny chunks
    for name, layer in layers.items():
        ref = reference_jacobian(net, layer, x)[:, :, tracked[name]]
        torch.testing.assert_close(rev[name], ref, rtol=1e-9, atol=1e-12)
        out_shape = ref.shape[3:]
        n = {"stem": 6, "conv1": 6, "conv2": 6, "up": 4, "fc": 5}[name]
        fwd = jacobian_forward(lambda: net(x), layer, tracked[name].to(torch.int64), 3,
                               (n, *out_shape), max_bytes=1 << 14)
        torch.testing.assert_close(fwd.double(), ref, rtol=1e-9, atol=1e-12)


class Cube(torch.autograd.Function):
    """x³ with forward- and reverse-mode derivatives but no vmap rule."""

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return x ** 3

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
        ctx.save_for_backward(inputs[0])
        ctx.save_for_forward(inputs[0])

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:  # type: ignore[no-untyped-def]
        (x,) = ctx.saved_tensors
        return 3 * x * x * g

    @staticmethod
    def jvp(ctx, t: torch.Tensor) -> torch.Tensor:  # type: ignore[no-untyped-def]
        (x,) = ctx.saved_tensors
        return 3 * x * x * t


def test_both_modes_work_through_an_op_without_a_batching_rule() -> None:
    """Forward mode falls back to one unit at a time where vmap cannot batch an op (an
    unsupported module skipped by the policy), like reverse mode; both agree."""
    torch.manual_seed(0)
    lin1, lin2 = nn.Linear(4, 5).double(), nn.Linear(5, 3).double()
    x = torch.randn(2, 4, dtype=torch.float64)

    def run() -> torch.Tensor:
        return lin2(Cube.apply(lin1(x)))

    tracked = torch.tensor([0, 3])
    rev = jacobians_reverse(run, {"l1": lin1}, {"l1": tracked}, max_bytes=1 << 20)["l1"]
    fwd = jacobian_forward(run, lin1, tracked, 2, (5,), max_bytes=1 << 20)
    torch.testing.assert_close(fwd, rev, rtol=1e-12, atol=1e-14)
    expect = lin2.weight[None] * (3 * lin1(x) ** 2)[:, None, :]  # W₂ diag(3 a²)
    torch.testing.assert_close(rev, expect[:, :, tracked].detach(), rtol=1e-12, atol=1e-14)


def test_maxpool_winners_match_the_maxima() -> None:
    x = torch.randn(2, 3, 6, 6)  # continuous values: no ties
    win = winners(nn.MaxPool2d(2), x)
    pooled = F.max_pool2d(x, 2)
    upsampled = pooled.repeat_interleave(2, 2).repeat_interleave(2, 3)
    assert torch.equal(win, x == upsampled)
    assert int(win.sum()) == pooled.numel()


def conv_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(96, 3, 8, 8, generator=g), torch.randint(0, 5, (96,), generator=g)


def record_graph(path: Path, model: nn.Module, rounds: int = 8,
                 data: tuple[torch.Tensor, torch.Tensor] | None = None, batch: int = 12,
                 lr: float = 0.05, **options: object) -> None:
    """Train ``model`` with SGD on ``data`` (default :func:`conv_data`) while recording."""
    x, y = data if data is not None else conv_data()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    options.setdefault("probe", x[:10])
    options.setdefault("probe_index", range(10))
    options.setdefault("probe_every", 3)
    with record(model, path, loss="cross_entropy", optimizer=opt,
                sampling=Sampling(taylor_every=2, samples_per_round=4, neurons=4),
                expected_rounds=rounds, **options) as rec:  # type: ignore[arg-type]
        for n in range(rounds):
            idx = torch.arange(n * batch, n * batch + batch)
            out = model(x[idx])
            loss = F.cross_entropy(out, y[idx])
            rec.step(loss, out, y[idx], indices=idx)
            opt.zero_grad()
            loss.backward()
            opt.step()


def test_graph_trace_conformance(tmp_path: Path) -> None:
    """Stored weights reproduce the stored output from the data set's inputs; the Taylor
    gradient from the stored factors equals autograd's (tests/recording/graph_conformance.py)."""
    torch.manual_seed(1)
    model = Residual()
    path = tmp_path / "res.zarr"
    record_graph(path, model)
    assert validate_trace(path).ok
    assert open_trace(path).attrs.structure == "graph"
    x_all, _ = conv_data()
    ref = Residual()
    checked = check_graph_trace(path, ref, lambda g, t: x_all[g["taylor/sample_index"][t]])
    assert checked == 4 * 5


def test_dropout_masks_are_recorded_and_replayed(tmp_path: Path) -> None:
    torch.manual_seed(2)
    model = nn.Sequential(nn.Flatten(), nn.Linear(192, 20), nn.ReLU(), nn.Dropout(0.5),
                          nn.Linear(20, 5))
    path = tmp_path / "drop.zarr"
    record_graph(path, model)
    tr = open_trace(path)
    assert tr.attrs.modules == ("3",) and tr.modules["3"].kind == "dropout"
    g = zarr.open_group(str(path), mode="r")
    kept = unpack(g["modules/3/state"][0], 20)
    assert 0 < kept.mean() < 1  # a real mask was recorded
    # J of layer 1 equals W₂ diag(kept·2) diag(relu') for each sample: dropout replayed
    W2 = torch.tensor(g["layers/4/weight"][0])
    mask1 = unpack(g["layers/1/mask"][0], 20)
    J = g["layers/1/jacobian"][0]
    tracked = g["layers/1/tracked"][:]
    expect = W2.numpy()[None] * (kept * 2.0 * mask1)[:, None, :]
    np.testing.assert_allclose(J, expect[:, :, tracked], rtol=1e-5, atol=1e-7)


def test_prelu_and_hardtanh_states_and_slopes(tmp_path: Path) -> None:
    torch.manual_seed(4)
    model = nn.Sequential(nn.Flatten(), nn.Linear(192, 12), nn.PReLU(12), nn.Linear(12, 9),
                          nn.Hardtanh(-0.5, 0.5), nn.Linear(9, 5))
    path = tmp_path / "pw.zarr"
    record_graph(path, model)
    report = validate_trace(path)  # checks mask and mask_high against W x + b
    assert report.ok, report.reasons
    g = zarr.open_group(str(path), mode="r")
    assert g["layers/1/slope"].shape[1:] == (12,)  # PReLU(12) follows layer 1
    np.testing.assert_allclose(g["layers/1/slope"][-1], model[2].weight.detach().numpy(),
                               atol=0.05)  # the last recorded slopes, a step old
    assert g["layers/3/mask_high"].shape == g["layers/3/mask"].shape
    assert tuple(open_trace(path).tracked) == ("1", "3", "5")


def test_unsupported_module_policy(tmp_path: Path) -> None:
    def make() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Flatten(), nn.Linear(192, 8), nn.ReLU(), nn.Linear(8, 8),
                             nn.Hardshrink(), nn.Linear(8, 5))

    with pytest.raises(UnsupportedModelError, match=r"module 4 \(Hardshrink\).*--unsupported"):
        record_graph(tmp_path / "a.zarr", make())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        record_graph(tmp_path / "b.zarr", make(), unsupported="warn")
    assert any("Hardshrink" in str(w.message) for w in caught)
    record_graph(tmp_path / "c.zarr", make(), unsupported="skip")
    tr = open_trace(tmp_path / "c.zarr")
    assert tr.attrs.structure == "graph" and validate_trace(tmp_path / "c.zarr").ok


def test_batchnorm_in_training_mode_is_refused(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(144, 5))
    with pytest.raises(UnsupportedModelError, match=r"1 \(BatchNorm2d\) is in training mode"):
        record_graph(tmp_path / "bn.zarr", model)


class Embedder(nn.Module):
    """Embedding (6 positions × 6 neurons: a transposed Jacobian has the right shape, so only
    its values can catch it) → ReLU → conv over positions → flatten → linear."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.act = nn.ReLU()
        self.conv = nn.Conv1d(6, 3, 3)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.emb(x)).transpose(1, 2)  # (s, neuron, position)
        return self.fc(self.flat(self.conv(h)))


def test_embedding_jacobians_are_neurons_first() -> None:
    """nn.Embedding returns (sample, *index, neuron); both modes must return J over
    (neuron, *index) like every other layer, equal to jacrev's moved to that layout."""
    torch.manual_seed(0)
    model = Embedder().double()
    x = torch.randint(0, 11, (3, 6))
    tracked = torch.tensor([4, 0, 2])
    ref = reference_jacobian(model, model.emb, x).movedim(-1, 2)[:, :, tracked]  # (s,p,c,q)
    rev = jacobians_reverse(lambda: model(x), {"emb": model.emb}, {"emb": tracked},
                            max_bytes=1 << 12, neuron_last=frozenset({"emb"}))["emb"]
    torch.testing.assert_close(rev, ref, rtol=1e-9, atol=1e-12)
    fwd = jacobian_forward(lambda: model(x), model.emb, tracked, 3, (6, 6), max_bytes=1 << 12,
                           neuron_last=True)
    torch.testing.assert_close(fwd, ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("mode", ["forward", "reverse"])
def test_embedding_trace_conformance(tmp_path: Path, mode: str) -> None:
    """A recorded embedding model conforms in either Jacobian mode: the Taylor gradient from
    the stored factors equals autograd's on the tracked neurons of every layer."""
    g = torch.Generator().manual_seed(5)
    x_all, y_all = torch.randint(0, 11, (64, 6), generator=g), torch.randint(0, 4, (64,),
                                                                              generator=g)
    torch.manual_seed(2)
    model = Embedder()
    path = tmp_path / f"emb-{mode}.zarr"
    record_graph(path, model, rounds=6, data=(x_all, y_all), batch=8, lr=0.1,
                 jacobian_mode=mode, probe=None, probe_every=0)
    assert validate_trace(path).ok
    checked = check_graph_trace(path, Embedder(),
                                lambda gr, t: x_all[gr["taylor/sample_index"][t]])
    assert checked == 3 * 3
