"""``nn.RReLU``, added through the op registry alone (``ntrace/ops/rrelu.py`` and its table
entry): in eval mode a LeakyReLU of slope (lower + upper)/2, written as ``leaky_relu``; in
training mode its slopes are random and the ``unsupported`` policy decides."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from ntrace.errors import UnsupportedModelError
from ntrace.format.metadata import Activation, Sampling
from ntrace.format.reader import open_trace
from ntrace.format.validate import validate_trace
from ntrace.recording import record

from .graph_conformance import check_graph_trace
from .test_conformance import check_trace
from .test_graph import conv_data, record_graph


def rrelu_chain(training: bool = False) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(192, 16), nn.RReLU(0.1, 0.3), nn.Linear(16, 5))
    model[2].train(training)
    return model


class RReLUNet(nn.Module):
    """conv → RReLU(eval) → max-pool → conv → RReLU(eval), residual → linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.act1 = nn.RReLU(0.05, 0.25).eval()
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.act2 = nn.RReLU().eval()
        self.fc = nn.Linear(64, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pool(self.act1(self.conv1(x)))
        h = self.act2(self.conv2(h)) + h
        return self.fc(h.flatten(1))


def test_rrelu_in_eval_mode_records_a_leaky_relu_chain(tmp_path: Path) -> None:
    """A chain (fast Jacobian recursion) whose stored factors conform: the rebuilt network with
    leaky_relu(0.2) reproduces the recorded outputs, and the Taylor gradient from the stored
    factors equals autograd's (tests/recording/test_conformance.py)."""
    path = tmp_path / "rrelu.zarr"
    record_graph(path, rrelu_chain(), probe_every=2)
    tr = open_trace(path)
    assert tr.attrs.structure == "chain"
    assert tr.layers["1"].activation == Activation("leaky_relu", 0.2)
    assert tr.layers["1"].activation.to_dict() == {"kind": "leaky_relu", "negative_slope": 0.2}
    report = validate_trace(path)  # masks against W x + b, chain inputs against leaky_relu
    assert report.ok, report.reasons
    assert tr.probe_units is not None and tr.probe_units.layers == ("1",)  # probe states too
    assert check_trace(path) == 4 * 2


def test_rrelu_graph_trace_conforms(tmp_path: Path) -> None:
    torch.manual_seed(1)
    path = tmp_path / "rrelu-graph.zarr"
    record_graph(path, RReLUNet())
    assert validate_trace(path).ok
    tr = open_trace(path)
    assert tr.attrs.structure == "graph"
    assert tr.layers["conv1"].activation == Activation("leaky_relu", (0.05 + 0.25) / 2)
    assert tr.layers["conv2"].activation == Activation("leaky_relu", (1 / 8 + 1 / 3) / 2)
    x_all, _ = conv_data()
    checked = check_graph_trace(path, RReLUNet(),
                                lambda g, t: x_all[g["taylor/sample_index"][t]])
    assert checked == 4 * 3


def test_rrelu_in_training_mode_follows_the_unsupported_policy(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedModelError,
                       match=r"module 2 \(RReLU\) is in training mode.*model\.2\.eval\(\).*"
                             r"nn\.LeakyReLU.*--unsupported warn\|skip"):
        record_graph(tmp_path / "a.zarr", rrelu_chain(training=True))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        record_graph(tmp_path / "b.zarr", rrelu_chain(training=True), unsupported="warn",
                     probe=None, probe_every=0)
    assert any("RReLU" in str(w.message) and "eval()" in str(w.message) for w in caught)
    record_graph(tmp_path / "c.zarr", rrelu_chain(training=True), unsupported="skip",
                 probe=None, probe_every=0)
    tr = open_trace(tmp_path / "c.zarr")  # recorded without its states
    assert tr.layers["1"].activation == Activation("identity")
    assert tr.attrs.structure == "graph"


def test_functional_rrelu_is_refused_in_training_mode(tmp_path: Path) -> None:
    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(4, 3), nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc2(nn.functional.rrelu(self.fc1(x), training=self.training))

    model = Functional()
    with pytest.raises(UnsupportedModelError,
                       match=r"call rrelu\(\) \(RReLU\) is in training mode.*training=False"):
        with record(model, tmp_path / "f.zarr", loss="mse",
                    sampling=Sampling(taylor_every=1, samples_per_round=2)) as rec:
            x, y = torch.randn(4, 4), torch.randn(4, 2)
            out = model(x)
            rec.step(nn.functional.mse_loss(out, y), out, y)
    model.eval()  # training=False: the fixed slope, a leaky_relu as for the module
    with record(model, tmp_path / "g.zarr", loss="mse",
                sampling=Sampling(taylor_every=1, samples_per_round=2)) as rec:
        out = model(x)
        rec.step(nn.functional.mse_loss(out, y), out, y)
    assert open_trace(tmp_path / "g.zarr").layers["fc1"].activation == Activation(
        "leaky_relu", (1 / 8 + 1 / 3) / 2)
