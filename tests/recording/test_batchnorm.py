"""BatchNorm in training mode, recorded with the batch statistics held fixed (opt-in).

References are independent of the recorder: gradients by plain autograd on copies of the
model, the fixed-statistics network built here with ``x.mean``/``x.var`` of the whole batch
detached, and the Taylor gradient from the stored factors alone (raw zarr).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zarr
from click.testing import CliRunner
from jsonschema import Draft202012Validator
from torch import nn

import ntrace
from ntrace.cli import main
from ntrace.errors import InvalidTraceError, UnsupportedModelError, UsageError
from ntrace.format.metadata import Sampling, TraceAttrs
from ntrace.format.reader import open_trace
from ntrace.format.validate import validate_trace

from .graph_conformance import _functional

EXAMPLES = Path(__file__).resolve().parents[2] / "tools" / "examples"
SPEC = Path(__file__).resolve().parents[2] / "spec"
B, S = 16, 4  # minibatch, recorded samples


class Net(nn.Module):
    """conv → BN → ReLU(inplace) → conv → BN, residual add, ReLU → pool → linear → ReLU →
    dropout → linear: every kind of extra forward (Jacobians, probe) passes the BatchNorms."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc1 = nn.Linear(16, 8)
        self.act = nn.ReLU()
        self.drop = nn.Dropout(0.25)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(h))
        out += h
        out = self.pool(self.relu(out)).flatten(1)
        return self.fc2(self.drop(self.act(self.fc1(out))))


def _data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 3, 6, 6, generator=g) + 0.5, torch.randint(0, 3, (B,), generator=g)


def _train(path: Path | None, steps: int = 6, keep: list | None = None,
           **options: object) -> nn.Module:
    """SGD with momentum on a fixed batch; with ``path`` recorded (every round a Taylor
    round, a probe set), ``keep`` collecting (model state, RNG state) before each step."""
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = _data()
    rec = None
    if path is not None:
        rec = ntrace.record(model, path, loss="cross_entropy", optimizer=opt,
                            sampling=Sampling(taylor_every=1, samples_per_round=S),
                            probe=x[:5], probe_every=2, **options)
    for _ in range(steps):
        if keep is not None:
            keep.append(({k: v.clone() for k, v in model.state_dict().items()},
                         torch.get_rng_state()))
        out = model(x)
        loss = F.cross_entropy(out, y)
        if rec is not None:
            rec.step(loss, out, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    if rec is not None:
        rec.close()
    return model


def test_training_batchnorm_is_refused_naming_the_opt_in(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedModelError, match=r"bn1 \(BatchNorm2d\) is in training "
                       r"mode.*--batchnorm fixed-stats.*batchnorm='fixed_stats'.*"
                       r"model\.bn1\.eval\(\)"):
        _train(tmp_path / "t.zarr", steps=1)
    with pytest.raises(UsageError, match="batchnorm='exact'; use 'fixed_stats'"):
        _train(tmp_path / "u.zarr", steps=1, batchnorm="exact")


@pytest.mark.parametrize("mode", ["reverse", "forward"])
def test_recording_leaves_training_bitwise_unchanged(tmp_path: Path, mode: str) -> None:
    """Jacobian, probe and gradient-error forwards touch no running statistic, no RNG."""
    plain = _train(None)
    recorded = _train(tmp_path / "r.zarr", batchnorm="fixed_stats", jacobian_mode=mode)
    a, b = plain.state_dict(), recorded.state_dict()
    assert list(a) == list(b) and "bn1.num_batches_tracked" in a
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert int(b["bn1.num_batches_tracked"]) == 6
    report = validate_trace(tmp_path / "r.zarr")
    assert report.ok, report.reasons
    tr = open_trace(tmp_path / "r.zarr")
    assert tr.attrs.format_version == "1.3" and tr.snapshots == 3
    assert tr.attrs.batchnorm is not None and tr.attrs.batchnorm.modules == ("bn1", "bn2")
    root = tr.attrs.to_dict()
    assert list(_schema("trace").iter_errors(root)) == []
    assert TraceAttrs.from_dict(root) == tr.attrs
    bad = {**root, "batchnorm": {"approximation": "exact", "modules": ["bn1"]}}
    assert list(_schema("trace").iter_errors(bad))
    with pytest.raises(InvalidTraceError, match=r"batchnorm.approximation: expected one of "
                       "fixed_stats"):
        TraceAttrs.from_dict(bad)


def _schema(kind: str) -> Draft202012Validator:
    return Draft202012Validator(json.loads((SPEC / "schema" / f"{kind}.json").read_text()))


def _fixed_stats_bn(model: nn.Module) -> list:
    """Hooks making each BatchNorm of ``model`` normalise with its batch's mean and biased
    variance detached (the statistics held fixed), computed with plain tensor ops."""
    def hook(m: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        x = args[0]
        dims = (0, 2, 3)
        mean = x.mean(dims, keepdim=True).detach()
        var = x.var(dims, unbiased=False, keepdim=True).detach()
        return (x - mean) / torch.sqrt(var + m.eps) * m.weight.view(1, -1, 1, 1) + \
            m.bias.view(1, -1, 1, 1)

    return [m.register_forward_hook(hook) for m in model.modules()
            if isinstance(m, nn.BatchNorm2d)]


def _copy(state: dict) -> nn.Module:
    m = Net()
    m.load_state_dict(state)
    return m


def _grads(state: dict, x: torch.Tensor, y: torch.Tensor, rng: torch.Tensor,
           layers: list[str], fixed: bool) -> dict[str, torch.Tensor]:
    """∇ (weight, bias) per layer of the mean loss of the first S samples, the whole
    minibatch in the forward (the training call's dropout mask: same RNG state)."""
    m = _copy(state)
    hooks = _fixed_stats_bn(m) if fixed else []
    torch.set_rng_state(rng)
    loss = F.cross_entropy(m(x)[:S], y[:S])
    for h in hooks:
        h.remove()
    mods = dict(m.named_modules())
    out = {}
    for n in layers:
        ps = [p for p in (mods[n].weight, mods[n].bias) if p is not None]
        out[n] = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, ps,
                                                                        retain_graph=True)])
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).double().norm() / b.double().norm())


def test_stored_gradient_error_matches_independent_autograd(tmp_path: Path) -> None:
    keep: list = []
    path = tmp_path / "e.zarr"
    _train(path, keep=keep, batchnorm="fixed_stats")
    x, y = _data()
    g = zarr.open_group(str(path), mode="r")
    layers = g.attrs["ntrace"]["layers"]
    assert layers == ["conv1", "conv2", "fc1", "fc2"]
    errors = {n: g[f"layers/{n}/gradient_error"][:] for n in layers}
    for t, (state, rng) in enumerate(keep):
        true = _grads(state, x, y, rng, layers, fixed=False)
        fixed = _grads(state, x, y, rng, layers, fixed=True)
        for n in layers:
            want = _rel(fixed[n], true[n])
            assert errors[n][t] == pytest.approx(want, rel=1e-3, abs=1e-5), (n, t)
        # the layers before a BatchNorm pay for the approximation, the ones after do not
        assert min(errors["conv1"][t], errors["conv2"][t]) > 1e-3
        assert max(errors["fc1"][t], errors["fc2"][t]) < 1e-5


def _taylor_gradient(g: zarr.Group, n: str, t: int) -> torch.Tensor:
    """∇_V of the Taylor loss TL at V = W from the stored factors alone (spec section 8)."""
    la = g[f"layers/{n}"].attrs["ntrace"]
    f = torch.tensor(g["taylor/output"][t], requires_grad=True)
    F.cross_entropy(f, torch.tensor(g["taylor/target"][t])).backward()
    dl = f.grad
    tracked = torch.tensor(g[f"layers/{n}/tracked"][:])
    if la["jacobian"] == "identity":
        J = torch.eye(dl.shape[1])[:, tracked].expand(len(dl), -1, -1)
    else:
        J = torch.tensor(g[f"layers/{n}/jacobian"][t])
    V = torch.tensor(g[f"layers/{n}/weight"][t], requires_grad=True)
    a = _functional(la["kind"], la.get("geometry", {}), torch.tensor(g[f"layers/{n}/input"][t]),
                    V)
    (a.index_select(1, tracked) * torch.einsum("so...,so->s...", J, dl)).sum().backward()
    return V.grad.reshape(-1)


def test_taylor_gradient_is_the_fixed_statistics_gradient(tmp_path: Path) -> None:
    """Raw-zarr conformance: TL's gradient from stored factors = autograd's with the batch
    statistics fixed, and within the stored error of the true gradient."""
    keep: list = []
    path = tmp_path / "c.zarr"
    _train(path, steps=3, keep=keep, batchnorm="fixed_stats")
    x, y = _data()
    g = zarr.open_group(str(path), mode="r")
    for t, (state, rng) in enumerate(keep):
        np.testing.assert_allclose(g["taylor/output"][t], _forward_first(state, x, rng),
                                   rtol=1e-4, atol=1e-5)
        true = _grads(state, x, y, rng, ["conv1"], fixed=False)["conv1"]
        fixed = _grads(state, x, y, rng, ["conv1"], fixed=True)["conv1"]
        got = _taylor_gradient(g, "conv1", t)  # conv1 has no bias: the weight is all
        torch.testing.assert_close(got, fixed, rtol=1e-4, atol=1e-6)
        stored = float(g["layers/conv1/gradient_error"][t])
        assert _rel(got, true) == pytest.approx(stored, rel=1e-3)


def _forward_first(state: dict, x: torch.Tensor, rng: torch.Tensor) -> np.ndarray:
    m = _copy(state)
    torch.set_rng_state(rng)
    with torch.no_grad():
        return m(x)[:S].numpy()


def test_validate_refuses_a_negative_gradient_error(tmp_path: Path) -> None:
    path = tmp_path / "v.zarr"
    _train(path, steps=2, batchnorm="fixed_stats")
    arr = zarr.open_array(str(path / "layers" / "conv2" / "gradient_error"), mode="r+")
    arr[1] = -0.5
    report = validate_trace(path)
    assert any("layers/conv2/gradient_error: -0.5 in Taylor round 1" in r
               for r in report.reasons), report.reasons


def _load_example() -> object:
    spec = importlib.util.spec_from_file_location("resnet_cifar", EXAMPLES / "resnet_cifar.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def test_resnet_example_records_validates_conforms_and_analyses(tmp_path: Path) -> None:
    """``ntrace record --batchnorm fixed-stats -- python resnet_cifar.py``, unmodified, with
    the whole minibatch recorded, so that Taylor round 0 (BatchNorm weights at their
    initial 1 and 0) is checked against autograd from the trace alone."""
    out = tmp_path / "resnet.zarr"
    runner = CliRunner()
    size = ["--batch-size", "8", "--width", "4", "--depth", "1", "--stages", "2",
            "--image-size", "8", "--train-size", "32"]
    result = runner.invoke(main, ["record", "--batchnorm", "fixed-stats", "--out", str(out),
                                  "--taylor-every", "2", "--samples-per-round", "8",
                                  "--", "python",
                                  str(EXAMPLES / "resnet_cifar.py"), "--steps", "4", *size])
    assert result.exit_code == 0, result.output
    result = runner.invoke(main, ["validate", str(out)])
    assert result.exit_code == 0, result.output
    assert "BatchNorm in training mode (6 modules) with the batch statistics held fixed" in \
        result.output
    info = runner.invoke(main, ["info", str(out)])
    assert info.exit_code == 0 and "approximation" in info.output
    g = zarr.open_group(str(out), mode="r")
    attrs = g.attrs["ntrace"]
    assert attrs["batchnorm"]["approximation"] == "fixed_stats"
    assert "layers.1.0.downsample.1" in attrs["batchnorm"]["modules"]
    # the ReLUs after BatchNorm are activation modules, so the probe records their states
    units = g["probe"].attrs["ntrace"]["units"]
    assert units and all(g[f"modules/{u['layer']}"].attrs["ntrace"]["kind"] == "activation"
                         for u in units if u["layer"] not in attrs["layers"])
    assert g["probe/config"].shape[0] >= 1
    net = _load_example().resnet(1, 4, 2)  # type: ignore[attr-defined]
    mods = dict(net.named_modules())
    for n in attrs["layers"]:
        mods[n].weight.data = torch.tensor(g[f"layers/{n}/weight"][0])
        if f"layers/{n}/bias" in g:
            mods[n].bias.data = torch.tensor(g[f"layers/{n}/bias"][0])
    x = torch.tensor(g[f"layers/{attrs['layers'][0]}/input"][0])  # the whole minibatch
    f = net(x)  # training mode: batch statistics, the coupling included
    np.testing.assert_allclose(f.detach().numpy(), g["taylor/output"][0], rtol=1e-4,
                               atol=1e-5)
    loss = F.cross_entropy(f, torch.tensor(g["taylor/target"][0]))
    np.testing.assert_allclose(g["taylor/sample_loss"][0].mean(), float(loss.detach()), rtol=1e-5)
    for n in attrs["layers"]:
        true = torch.autograd.grad(loss, mods[n].weight, retain_graph=True)[0].reshape(-1)
        got = _taylor_gradient(g, n, 0)
        stored = float(g[f"layers/{n}/gradient_error"][0])
        if mods[n].bias is None:  # weight and bias were measured together
            assert _rel(got, true) == pytest.approx(stored, rel=1e-3, abs=1e-5), n
        else:
            assert _rel(got, true) < 1e-5 and stored < 1e-5, n  # fc: after every BatchNorm
    result = runner.invoke(main, ["analyze", str(out), "--out", str(tmp_path / "an"),
                                  "--no-figures"])
    assert result.exit_code == 0, result.output
    assert "the Taylor data approximates BatchNorm in training mode" in result.output


def test_resume_keeps_the_declared_approximation(tmp_path: Path) -> None:
    """A resumed recorder takes the approximation from the trace (no option needed)."""
    path = tmp_path / "res.zarr"
    x, y = _data()

    def steps(model: nn.Module, opt: torch.optim.Optimizer, rec: ntrace.Recorder, n: int
              ) -> None:
        for _ in range(n):
            out = model(x)
            loss = F.cross_entropy(out, y)
            rec.step(loss, out, y)
            opt.zero_grad()
            loss.backward()
            opt.step()

    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    rec = ntrace.record(model, path, loss="cross_entropy", optimizer=opt,
                        sampling=Sampling(taylor_every=1, samples_per_round=S),
                        batchnorm="fixed_stats")
    steps(model, opt, rec, 2)
    rec.checkpoint()
    rec.close()
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with ntrace.record(model, path, optimizer=opt, resume=True) as rec:
        steps(model, opt, rec, 2)
    tr = open_trace(path)
    assert tr.taylor_rounds == 4 and tr.attrs.batchnorm is not None
    assert tr.read("layers/conv1/gradient_error").shape == (4,)
    assert validate_trace(path).ok


def test_cli_flag_is_for_scripts() -> None:
    result = CliRunner().invoke(main, ["record", "--task", "digits-autoencoder", "--batchnorm",
                                       "fixed-stats"])
    assert result.exit_code != 0
    assert "--batchnorm applies to a recorded script" in result.output
