"""Functional ops are first-class (``F.relu``, ``torch.relu_``, ``x.relu()``, ``F.max_pool2d``,
``F.dropout``…) and smooth nonlinearities record by default (issue 12, parts 1 and 2): each
model here was refused before. Conformance (stored factors against autograd on a model rebuilt
from the stored weights) is :mod:`graph_conformance`'s, independent of ntrace's reader."""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zarr
from click.testing import CliRunner
from torch import nn

from ntrace import ops
from ntrace.cli import main
from ntrace.errors import UnsupportedModelError
from ntrace.format.bits import unpack
from ntrace.format.metadata import Activation, Sampling
from ntrace.format.reader import open_trace
from ntrace.format.validate import validate_trace
from ntrace.recording import record

from .graph_conformance import check_graph_trace

EXAMPLES = Path(__file__).resolve().parents[2] / "tools" / "examples"


def train(model: nn.Module, path: Path, rounds: int = 4, x: torch.Tensor | None = None,
          loss: str = "mse", probe: bool = True, **options: object) -> torch.Tensor:
    """Train ``model`` a few rounds on fixed data (each round the first 8 of a shuffled 16),
    every round a Taylor round; returns the data so that tests can feed recorded samples
    back."""
    torch.manual_seed(0)
    x = torch.randn(16, 6) if x is None else x
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with record(model, path, loss=loss, optimizer=opt,
                sampling=Sampling(taylor_every=1, samples_per_round=4),
                probe=x[:5] if probe else None, probe_every=2, **options) as rec:
        for _ in range(rounds):
            idx = torch.randperm(len(x))[:8]
            out = model(x[idx])
            y = (torch.randint(0, out.shape[1], (8,)) if loss != "mse"
                 else torch.zeros_like(out))
            value = F.cross_entropy(out, y) if loss == "cross_entropy" else F.mse_loss(out, y)
            rec.step(value, out, y, indices=idx)
            opt.zero_grad()
            value.backward()
            opt.step()
    return x


def conforms(path: Path, make: Callable[[], nn.Module], x: torch.Tensor) -> int:
    assert validate_trace(path).ok, validate_trace(path).reasons
    return check_graph_trace(path, make(), lambda g, t: x[g["taylor/sample_index"][t]])


# -- every call form ---------------------------------------------------------------------------
FORMS: dict[str, tuple[Callable[[torch.Tensor, nn.Module], torch.Tensor], nn.Module]] = {
    "F.relu": (lambda a, m: F.relu(a), nn.ReLU()),
    "F.relu inplace": (lambda a, m: F.relu(a, inplace=True), nn.ReLU()),
    "F.relu_": (lambda a, m: F.relu_(a), nn.ReLU()),
    "torch.relu": (lambda a, m: torch.relu(a), nn.ReLU()),
    "torch.relu_": (lambda a, m: torch.relu_(a), nn.ReLU()),
    "Tensor.relu": (lambda a, m: a.relu(), nn.ReLU()),
    "Tensor.relu_": (lambda a, m: a.relu_(), nn.ReLU()),
    "F.leaky_relu": (lambda a, m: F.leaky_relu(a, 0.2), nn.LeakyReLU(0.2)),
    "F.hardtanh": (lambda a, m: F.hardtanh(a, -0.3, 0.4), nn.Hardtanh(-0.3, 0.4)),
    "F.relu6": (lambda a, m: F.relu6(a), nn.ReLU6()),
    "F.prelu": (lambda a, m: F.prelu(a, m.slopes), nn.PReLU(5)),
    "F.gelu": (lambda a, m: F.gelu(a), nn.GELU()),
    "torch.tanh": (lambda a, m: torch.tanh(a), nn.Tanh()),
    "Tensor.sigmoid": (lambda a, m: a.sigmoid(), nn.Sigmoid()),
}


Between = Callable[[torch.Tensor, nn.Module], torch.Tensor]


class TwoLayers(nn.Module):
    """``fc2(between(fc1(x), self))``; ``slopes`` (PReLU's) and ``gate`` (a buffer) are there
    for ``between`` to use."""

    def __init__(self, between: Between, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.fc1, self.fc2 = nn.Linear(6, 5), nn.Linear(5, 3)
        self.slopes = nn.Parameter(torch.full((5,), 0.25))
        self.register_buffer("gate", torch.linspace(-1, 1, 5))
        self.between = between

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.between(self.fc1(x), self))


@pytest.mark.parametrize("form", list(FORMS))
def test_every_call_form_is_recorded_as_its_module_form(tmp_path: Path, form: str) -> None:
    """The activation a functional call gives a layer is the one its module form gives (the
    same op describes both), with its states; the trace conforms."""
    def make() -> nn.Module:
        return TwoLayers(FORMS[form][0], 1)

    model = make()
    x = train(model, tmp_path / "t.zarr", probe=False)
    module = FORMS[form][1]
    tr = open_trace(tmp_path / "t.zarr")
    assert tr.layers["fc1"].activation == ops.recognise(module).describe(module)
    assert not tr.attrs.modules
    g = zarr.open_group(str(tmp_path / "t.zarr"), mode="r")
    assert ("layers/fc1/mask" in g) == tr.layers["fc1"].activation.has_mask
    if form == "F.prelu":  # the slopes of the caller's parameter, as they were trained
        assert g["layers/fc1/slope"].shape == (4, 5)
        assert not np.allclose(g["layers/fc1/slope"][0], g["layers/fc1/slope"][-1])
        np.testing.assert_allclose(g["layers/fc1/slope"][-1], model.slopes.detach().numpy(),
                                   atol=0.05)  # a step old
        assert validate_trace(tmp_path / "t.zarr").ok  # (the rebuilt model lacks the slopes)
    else:
        assert conforms(tmp_path / "t.zarr", make, x) == 4 * 2


# -- the official MNIST example, unmodified -----------------------------------------------------
def test_mnist_example_records_conforms_and_analyses(tmp_path: Path) -> None:
    """F.relu after conv1/conv2/fc1 → their masks; F.max_pool2d → a maxpool module;
    nn.Dropout → replayed; F.log_softmax → fc2's smooth activation; F.nll_loss; Adadelta,
    StepLR and an eval pass between epochs."""
    out = tmp_path / "mnist.zarr"
    result = CliRunner().invoke(main, [
        "record", "--out", str(out), "--taylor-every", "3", "--samples-per-round", "4",
        "--probe-size", "16", "--probe-every", "2", "--",
        "python", str(EXAMPLES / "mnist_functional.py"), "--epochs", "2", "--samples", "120",
        "--batch-size", "16", "--image-size", "10", "--channels", "3", "--hidden", "8"])
    assert result.exit_code == 0, result.output
    tr = open_trace(out)
    assert tr.attrs.loss.id == "nll" and tr.attrs.structure == "graph"
    assert {n: la.activation.kind for n, la in tr.layers.items()} == {
        "conv1": "relu", "conv2": "relu", "fc1": "relu", "fc2": "smooth"}
    assert tr.layers["fc2"].activation.function == "log_softmax"
    assert {n: m.kind for n, m in tr.modules.items()} == {
        "max_pool2d()": "maxpool", "dropout1": "dropout", "dropout2": "dropout"}
    assert tr.probe_units.layers == ("conv1", "conv2", "fc1")
    assert validate_trace(out).ok
    spec = importlib.util.spec_from_file_location("mnist_functional",
                                                  EXAMPLES / "mnist_functional.py")
    example = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(example)  # type: ignore[union-attr]
    checked = check_graph_trace(out, example.Net(10, 3, 8),
                                lambda g, t: torch.tensor(g["layers/conv1/input"][t]))
    assert checked == tr.taylor_rounds * 4
    result = CliRunner().invoke(main, ["analyze", str(out), "--out", str(tmp_path / "a"),
                                       "--checkpoints", "2", "--scale", "neuron",
                                       "--max-iter", "200"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "a" / "results.zarr").exists()


# -- residual MLP: torch.relu between modules, activations after residual additions -------------
class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(5, 5), nn.Linear(5, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.fc2(torch.relu(self.fc1(x))))  # the second: after an addition


class ResidualMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp, self.out = nn.Linear(6, 5), nn.Linear(5, 3)
        self.blocks = nn.Sequential(Block(), Block())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(torch.relu(self.inp(x)))
        return self.out(F.dropout(h, 0.3, self.training))


def test_residual_mlp_with_functional_relu_and_dropout(tmp_path: Path) -> None:
    def make() -> nn.Module:
        torch.manual_seed(2)
        return ResidualMLP()

    x = train(make(), tmp_path / "r.zarr")
    tr = open_trace(tmp_path / "r.zarr")
    assert [la.activation.kind for la in tr.layers.values()] == ["relu", "relu", "identity",
                                                                 "relu", "identity", "identity"]
    # the first relu() of each block is blocks.k.fc1's mask: the second call is @1
    assert tr.attrs.modules == ("blocks.0.relu()@1", "blocks.1.relu()@1", "dropout()")
    assert tr.modules["blocks.0.relu()@1"].activation == Activation("relu")
    assert tr.probe_units.layers == ("inp", "blocks.0.fc1", "blocks.0.relu()@1", "blocks.1.fc1",
                                     "blocks.1.relu()@1")
    assert conforms(tmp_path / "r.zarr", make, x) == 4 * 6  # dropout replayed by name
    # the module states are the signs of the block outputs before their ReLU
    g = zarr.open_group(str(tmp_path / "r.zarr"), mode="r")
    model = make()
    pre: list[torch.Tensor] = []
    for t in range(4):
        for n in tr.attrs.layers:
            mod = model.get_submodule(n)
            mod.weight.data = torch.tensor(g[f"layers/{n}/weight"][t])
            mod.bias.data = torch.tensor(g[f"layers/{n}/bias"][t])
        xs = x[g["taylor/sample_index"][t]]
        with torch.no_grad():
            h = torch.relu(model.inp(xs))
            for b in model.blocks:
                a = h + b.fc2(torch.relu(b.fc1(h)))
                pre.append(a)
                h = F.relu(a)
        for k, name in enumerate(("blocks.0.relu()@1", "blocks.1.relu()@1")):
            state = unpack(g[f"modules/{name}/state"][t], 5)
            np.testing.assert_array_equal(state, (pre[2 * t + k] > 0).numpy())


def test_non_captured_forwards_carry_no_function_mode(tmp_path: Path) -> None:
    """The function mode is pushed for Taylor-round forwards only (and probe snapshots): the
    other rounds' forwards run as without ntrace."""
    seen: list[tuple[int, int]] = []

    class Spy(ResidualMLP):
        tag = -1

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append((self.tag, torch._C._len_torch_function_stack()))
            return super().forward(x)

    model = Spy()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with record(model, tmp_path / "s.zarr", sampling=Sampling(taylor_every=3,
                                                              samples_per_round=2)) as rec:
        for n in range(6):
            model.tag = n
            x = torch.randn(4, 6)
            out = model(x)
            model.tag = -1  # the recorder's extra forwards
            loss = F.mse_loss(out, torch.zeros_like(out))
            rec.step(loss, out, torch.zeros_like(out))
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert [d for n, d in seen if n >= 0] == [1, 0, 0, 1, 0, 0]


# -- smooth models: no states, record and analyse by default ------------------------------------
class Smooth(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)
        self.act, self.norm = nn.GELU(), nn.LayerNorm(8, elementwise_affine=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.fc2(self.act(self.fc1(x))))
        return self.fc3(F.silu(self.norm(h)))


def test_smooth_model_records_without_states_and_analyses(tmp_path: Path) -> None:
    def make() -> nn.Module:
        torch.manual_seed(3)
        return Smooth()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        x = train(make(), tmp_path / "s.zarr", loss="cross_entropy")
    assert any("no units with activation states" in str(w.message) for w in caught)
    tr = open_trace(tmp_path / "s.zarr")
    assert [la.activation for la in tr.layers.values()] == [
        Activation("smooth", function="gelu"), Activation("smooth", function="tanh"),
        Activation("identity")]
    assert tr.probe_units is None and tr.attrs.sampling.probe_size == 0
    assert conforms(tmp_path / "s.zarr", make, x) == 4 * 3
    result = CliRunner().invoke(main, ["analyze", str(tmp_path / "s.zarr"), "--out",
                                       str(tmp_path / "a"), "--checkpoints", "2",
                                       "--max-iter", "200"])
    assert result.exit_code == 0, result.output
    assert "no exploration" in result.output


class Attention(nn.Module):
    def __init__(self, dropout_p: float = 0.0) -> None:
        super().__init__()
        self.qkv, self.out = nn.Linear(6, 12), nn.Linear(8, 3)
        # its parameters are not tracked (frozen here, so that the conformance check's model,
        # rebuilt from the tracked weights, is the trained one)
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True).requires_grad_(False)
        self.dropout_p = dropout_p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).reshape(-1, 3, 2, 2).unbind(1)  # (batch, 2 tokens, 2 features)
        h = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None],
                                           dropout_p=self.dropout_p)
        h, _ = self.attn(h.reshape(-1, 1, 4), h.reshape(-1, 1, 4), h.reshape(-1, 1, 4))
        return self.out(torch.cat([h.flatten(1), x[:, :4]], 1))


def test_attention_records_and_random_attention_dropout_is_refused(tmp_path: Path) -> None:
    def make() -> nn.Module:
        torch.manual_seed(4)
        return Attention()

    x = train(make(), tmp_path / "a.zarr", probe=False)
    assert conforms(tmp_path / "a.zarr", make, x) == 4 * 2
    with pytest.raises(UnsupportedModelError,
                       match=r"call scaled_dot_product_attention\(\).*dropout_p=0.1.*"
                             r"dropout_p=0.0.*--unsupported"):
        train(Attention(0.1), tmp_path / "b.zarr", probe=False)


def test_functional_ops_on_parameters_are_not_per_sample(tmp_path: Path) -> None:
    """``F.relu`` of a tensor without the batch axis (a gate) has no per-sample state."""
    def make() -> nn.Module:
        return TwoLayers(lambda a, m: a * F.relu(m.gate), 5)

    x = train(make(), tmp_path / "g.zarr", probe=False)
    tr = open_trace(tmp_path / "g.zarr")
    assert not tr.attrs.modules and tr.layers["fc1"].activation == Activation("identity")
    assert conforms(tmp_path / "g.zarr", make, x) == 4 * 2


def test_functional_max_pool_with_indices_records_its_winners(tmp_path: Path) -> None:
    def make() -> nn.Module:
        return TwoLayers(lambda a, m: F.max_pool1d(a[:, None], 3, 1, 1, return_indices=True)
                         [0][:, 0], 6)

    x = train(make(), tmp_path / "p.zarr", probe=False)
    tr = open_trace(tmp_path / "p.zarr")
    assert {n: m.kind for n, m in tr.modules.items()} == {"max_pool1d()": "maxpool"}
    assert conforms(tmp_path / "p.zarr", make, x) == 4 * 2
    g = zarr.open_group(str(tmp_path / "p.zarr"), mode="r")
    for t in range(4):
        a = (torch.tensor(g["layers/fc1/input"][t]) @ torch.tensor(g["layers/fc1/weight"][t]).T
             + torch.tensor(g["layers/fc1/bias"][t]))
        padded = F.pad(a, (1, 1), value=-float("inf"))
        won = torch.zeros(4, 5, dtype=torch.bool)
        for j in range(5):  # each window's first maximum (torch's choice on ties)
            won[torch.arange(4), padded[:, j:j + 3].argmax(1) + j - 1] = True
        np.testing.assert_array_equal(unpack(g["modules/max_pool1d()/state"][t], 5), won.numpy())


def test_alpha_dropout_is_refused_in_training_mode_naming_the_call(tmp_path: Path) -> None:
    """Its random affine correction cannot be replayed (before: silently wrong Jacobians)."""
    with pytest.raises(UnsupportedModelError, match=r"call alpha_dropout\(\) \(AlphaDropout\) "
                                                    r"is in training mode.*training=False"):
        train(TwoLayers(lambda a, m: F.alpha_dropout(torch.relu(a), 0.2, m.training), 7),
              tmp_path / "a.zarr", probe=False)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.AlphaDropout(0.2), nn.Linear(5, 3))
    with pytest.raises(UnsupportedModelError, match=r"model.2.eval\(\)"):
        train(model, tmp_path / "b.zarr", probe=False)
    train(model.eval(), tmp_path / "c.zarr", probe=False)  # the identity: records
    assert validate_trace(tmp_path / "c.zarr").ok
