"""Training idioms under zero-code recording: autocast + GradScaler, gradient accumulation,
torch.compile, learning-rate schedulers, ``zero_grad(set_to_none=True)``,
``optimizer.step(closure)`` and PyTorch Lightning.

Each script writes what it trained on (losses, weights, inputs) to the JSON file named by its
first argument; the trace must say the same.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner
from torch import nn

from ntrace.analyze.results import open_results
from ntrace.analyze.solve import CONVERGED
from ntrace.cli import main
from ntrace.errors import LossMismatchError, UsageError
from ntrace.format.metadata import Sampling
from ntrace.format.reader import open_trace
from ntrace.format.validate import validate_trace
from ntrace.recording import record
from ntrace.recording.precision import loss_check_rtol
from ntrace.recording.wrap import WrapOptions, run_wrapped

from .graph_conformance import check_graph_trace
from .test_conformance import check_trace

EXAMPLES = Path(__file__).resolve().parents[2] / "tools" / "examples"
HAS_LIGHTNING = importlib.util.find_spec("lightning") is not None

HEADER = """\
import json, sys, torch
import torch.nn.functional as F
from torch import nn
torch.manual_seed(0)
torch.set_num_threads(1)  # in-process and plain runs sum in the same order
model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5), nn.ReLU(), nn.Linear(5, 3))
data = torch.randn(64, 6)
labels = torch.randint(0, 3, (64,))
log = {"losses": [], "weights": [], "inputs": []}
"""
FOOTER = "json.dump(log, open(sys.argv[1], 'w'))\n"


def run(tmp_path: Path, body: str, steps_taylor: int = 1) -> tuple[Path, dict]:
    script = tmp_path / "train.py"
    script.write_text(HEADER + body + FOOTER)
    out, log = tmp_path / "t.zarr", tmp_path / "log.json"
    run_wrapped(["python", str(script), str(log)],
                WrapOptions(out=str(out), sampling=Sampling(taylor_every=steps_taylor,
                                                            samples_per_round=4),
                            probe_size=0))
    return out, json.loads(log.read_text())


def weights(path: Path, layer: str = "0") -> np.ndarray:
    return zarr.open_group(str(path), mode="r")[f"layers/{layer}/weight"][:]


# -- torch.autocast + GradScaler ---------------------------------------------------------------
AMP = """\
opt = torch.optim.SGD(model.parameters(), lr=0.1)
scaler = torch.amp.GradScaler("cpu")
for i in range(5):
    x, y = data[8 * i:8 * i + 8], labels[8 * i:8 * i + 8]
    with torch.autocast("cpu", dtype=torch.{dtype}):
        out = model(x)
        loss = F.cross_entropy(out, y)
    assert out.dtype == torch.{dtype}
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if i == 2:  # an overflowed gradient: the scaler skips this step
        model[0].weight.grad[0, 0] = float("inf")
    log["weights"].append(model[0].weight.detach().tolist())
    scaler.step(opt)
    scaler.update()
    log["losses"].append(loss.item())
"""


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_autocast_and_grad_scaler_record_unscaled_losses_and_skipped_steps(
        tmp_path: Path, dtype: str) -> None:
    out, log = run(tmp_path, AMP.replace("{dtype}", dtype))
    tr = open_trace(out)
    # five steps attempted, one skipped by the scaler: five rounds
    assert tr.rounds == 5 and tr.taylor_rounds == 5
    np.testing.assert_allclose(zarr.open_group(str(out))["loss"][:], log["losses"], rtol=1e-6)
    w = weights(out)
    np.testing.assert_array_equal(w, np.array(log["weights"], dtype=np.float32))
    np.testing.assert_array_equal(w[3], w[2])  # the skipped step: the weights did not move
    assert not np.array_equal(w[2], w[1])
    run_attrs = tr.attrs.run
    assert run_attrs["grad_scaler"] is True
    assert run_attrs["low_precision"]["output_dtype"] == dtype
    assert run_attrs["low_precision"]["loss_check_rtol"] == 1e-4  # autocast's loss is float32
    assert validate_trace(out).ok
    assert check_trace(out) == 5 * 3  # float32 Taylor data: float32 tolerances


GRAPH_AMP = """\
torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                      nn.Dropout(0.3), nn.Linear(64, 3))
images = torch.randn(64, 1, 8, 8)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
for i in range(4):
    x, y = images[16 * i:16 * i + 16], labels[16 * i:16 * i + 16]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.cross_entropy(model(x), y)
    log["losses"].append(loss.item())
    opt.zero_grad()
    loss.backward()
    opt.step()
"""


def test_a_graph_model_with_dropout_under_autocast_conforms_in_float32(tmp_path: Path) -> None:
    """The float32 forward of a Taylor round replays the training call's dropout mask: the
    stored weights reproduce the stored output, and the Taylor gradient is autograd's."""
    out, log = run(tmp_path, GRAPH_AMP)
    tr = open_trace(out)
    assert tr.rounds == 4 and tr.attrs.structure == "graph"
    np.testing.assert_allclose(zarr.open_group(str(out))["loss"][:], log["losses"], rtol=1e-6)
    assert validate_trace(out).ok
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                        nn.Dropout(0.3), nn.Linear(64, 3))
    checked = check_graph_trace(out, net, lambda g, t: torch.tensor(g["layers/0/input"][t]))
    assert checked == 4 * 2


BN_AMP = """\
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
for i in range(4):
    x, y = data[16 * i:16 * i + 16], labels[16 * i:16 * i + 16]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.cross_entropy(model(x), y)
    log["losses"].append(loss.item())
    log["running_mean"] = model[1].running_mean.tolist()
    opt.zero_grad()
    loss.backward()
    opt.step()
"""


def test_training_batchnorm_under_autocast_records_with_float32_statistics(
        tmp_path: Path) -> None:
    """The float32 forward of a Taylor round normalises with its own batch statistics and
    leaves the running statistics alone; the approximation's gradient error it measures is
    the one a float32 run measures (round 0: the same weights)."""
    errors = {}
    f32 = BN_AMP.replace('torch.autocast("cpu", dtype=torch.bfloat16)',
                         'torch.autocast("cpu", enabled=False)')
    for name, body in [("bf16", BN_AMP), ("f32", f32)]:
        d = tmp_path / name
        d.mkdir()
        script = d / "train.py"
        script.write_text(HEADER + body + FOOTER)
        run_wrapped(["python", str(script), str(d / "log.json")],
                    WrapOptions(out=str(d / "t.zarr"), probe_size=0, batchnorm="fixed_stats",
                                sampling=Sampling(taylor_every=1, samples_per_round=4)))
        assert open_trace(d / "t.zarr").rounds == 4 and validate_trace(d / "t.zarr").ok
        errors[name] = zarr.open_group(str(d / "t.zarr"))["layers/0/gradient_error"][:]
        plain = d / "plain.json"  # the same script without ntrace
        subprocess.run([sys.executable, str(script), str(plain)], check=True)
        # the same losses, the same running statistics
        assert json.loads((d / "log.json").read_text()) == json.loads(plain.read_text())
    assert np.isfinite(errors["bf16"]).all()
    np.testing.assert_allclose(errors["bf16"][0], errors["f32"][0], rtol=1e-5)


def test_the_loss_check_tolerance_follows_the_loss_dtype() -> None:
    assert loss_check_rtol(torch.float32) == 1e-4
    assert loss_check_rtol(torch.float16) == pytest.approx(4 * 2 ** -10)
    assert loss_check_rtol(torch.bfloat16) == pytest.approx(4 * 2 ** -7)


def test_a_bfloat16_loss_is_checked_to_its_precision(tmp_path: Path) -> None:
    """A loss computed in bfloat16 (outside autocast) is within a few bfloat16 ulps of the
    float32 mean loss of the output: recorded, and the trace states the tolerance used."""
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(16, 6), torch.randn(16, 3)
    with record(model, tmp_path / "b.zarr", optimizer=opt, probe=None,
                sampling=Sampling(taylor_every=1, samples_per_round=4)) as rec:
        for _ in range(2):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(x)
            loss = ((out - y.bfloat16()) ** 2).mean()
            assert loss.dtype == torch.bfloat16
            rec.step(loss, out, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    tr = open_trace(tmp_path / "b.zarr")
    assert tr.attrs.run["low_precision"]["loss_dtype"] == "bfloat16"
    assert tr.attrs.run["low_precision"]["loss_check_rtol"] == pytest.approx(4 * 2 ** -7)
    assert validate_trace(tmp_path / "b.zarr").ok


# -- gradient accumulation ---------------------------------------------------------------------
ACCUMULATE = """\
k = 3
opt = torch.optim.SGD(model.parameters(), lr=0.1)
micro = []
for i in range(12):
    x, y = data[4 * i:4 * i + 4], labels[4 * i:4 * i + 4]
    loss = F.cross_entropy(model(x), y)
    (loss / k).backward()
    micro.append(loss.item())
    if (i + 1) % k == 0:
        log["losses"].append(sum(micro) / k)
        log["inputs"].append(x.tolist())
        opt.step()
        opt.zero_grad()
        micro = []
"""


def test_gradient_accumulation_is_one_round_per_step(tmp_path: Path) -> None:
    out, log = run(tmp_path, ACCUMULATE)
    tr = open_trace(out)
    assert tr.rounds == 4  # 12 micro-batches, 3 per step
    g = zarr.open_group(str(out))
    # the round's loss: the mean over its micro-batches
    np.testing.assert_allclose(g["loss"][:], log["losses"], rtol=1e-6)
    # the Taylor data: the last micro-batch before the step
    np.testing.assert_array_equal(g["layers/0/input"][:],
                                  np.array(log["inputs"], dtype=np.float32))
    assert tr.attrs.run["accumulation"] == {"micro_batches": 3, "round_loss": "mean",
                                            "taylor_micro_batch": "last"}
    assert validate_trace(out).ok
    assert check_trace(out) == 4 * 3


def test_accumulation_without_division_and_a_loss_times_a_weight_dependent_factor(
        tmp_path: Path) -> None:
    """Summed micro-batch gradients (no 1/k) are the same loss times a constant: recorded.
    A loss multiplied by something that depends on the weights is not: refused."""
    out, log = run(tmp_path, ACCUMULATE.replace("(loss / k).backward()", "loss.backward()"))
    assert open_trace(out).rounds == 4
    np.testing.assert_allclose(zarr.open_group(str(out))["loss"][:], log["losses"], rtol=1e-6)
    bad = ACCUMULATE.replace("(loss / k).backward()",
                             "(loss * model[0].weight.abs().sum()).backward()")
    with pytest.raises(LossMismatchError, match="backpropagates a loss of"):
        run(_fresh(tmp_path), bad)


def _fresh(tmp_path: Path) -> Path:
    d = tmp_path / "again"
    d.mkdir()
    return d


# -- torch.compile -----------------------------------------------------------------------------
COMPILE = """\
opt = torch.optim.Adam(model.parameters(), lr=0.01)
compiled = torch.compile(model)
for i in range(4):
    x, y = data[8 * i:8 * i + 8], labels[8 * i:8 * i + 8]
    loss = F.cross_entropy(compiled(x), y)
    log["losses"].append(loss.item())
    opt.zero_grad()
    loss.backward()
    opt.step()
"""


def test_a_compiled_model_is_recorded_eagerly(tmp_path: Path) -> None:
    import torch._dynamo

    out, log = run(tmp_path, COMPILE)
    tr = open_trace(out)
    assert tr.rounds == 4 and tr.attrs.run["model_class"] == "Sequential"  # the _orig_mod
    assert tr.attrs.run["torch_compile"].startswith("disabled while recording")
    np.testing.assert_allclose(zarr.open_group(str(out))["loss"][:], log["losses"], rtol=1e-6)
    assert check_trace(out) == 4 * 3
    assert torch._dynamo.config.disable is False  # restored for the rest of the process


def test_the_api_refuses_a_compiled_model_in_one_line(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    with pytest.raises(UsageError, match=r"torch\.compile.*model\._orig_mod") as info:
        record(torch.compile(model), tmp_path / "c.zarr")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "c.zarr").exists()


# -- learning-rate schedulers, zero_grad(set_to_none=True), step(closure) ----------------------
SCHEDULED = """\
opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
sched = {scheduler}
for i in range(6):
    x, y = data[8 * i:8 * i + 8], labels[8 * i:8 * i + 8]
    loss = F.cross_entropy(model(x), y)
    log["losses"].append(loss.item())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()
"""


@pytest.mark.parametrize(("name", "scheduler"), [
    ("StepLR", "torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)"),
    ("OneCycleLR", "torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.5, total_steps=6)"),
])
def test_lr_schedulers_are_named_and_change_nothing_else(tmp_path: Path, name: str,
                                                          scheduler: str) -> None:
    out, log = run(tmp_path, SCHEDULED.format(scheduler=scheduler))
    tr = open_trace(out)
    assert tr.rounds == 6 and tr.attrs.run["lr_schedulers"] == [name]
    np.testing.assert_allclose(zarr.open_group(str(out))["loss"][:], log["losses"], rtol=1e-6)
    assert check_trace(out) == 6 * 3


CLOSURE = """\
opt = {optimizer}
for i in range(4):
    x, y = data[8 * i:8 * i + 8], labels[8 * i:8 * i + 8]
    log["weights"].append(model[0].weight.detach().tolist())
    first = []

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        first.append(loss.item())
        return loss

    opt.step(closure)
    log["losses"].append(first[0])
    log["evaluations"] = log.get("evaluations", 0) + len(first)
"""


@pytest.mark.parametrize("optimizer", [
    "torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=3)",
    "torch.optim.SGD(model.parameters(), lr=0.1)",
])
def test_a_closure_step_is_one_round_at_the_weights_it_starts_from(
        tmp_path: Path, optimizer: str) -> None:
    out, log = run(tmp_path, CLOSURE.format(optimizer=optimizer))
    tr = open_trace(out)
    assert tr.rounds == 4  # LBFGS evaluates the closure several times per step: one round
    if "LBFGS" in optimizer:
        assert log["evaluations"] > 4
    np.testing.assert_allclose(zarr.open_group(str(out))["loss"][:], log["losses"], rtol=1e-6)
    np.testing.assert_array_equal(weights(out), np.array(log["weights"], dtype=np.float32))
    assert check_trace(out) == 4 * 3


# -- PyTorch Lightning -------------------------------------------------------------------------
LIGHTNING = """\
import lightning as L
from torch.utils.data import DataLoader, TensorDataset


class Module(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = model

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        log["losses"].append(loss.item())
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False,
                    accumulate_grad_batches={k}, precision="{precision}")
trainer.fit(Module(), DataLoader(TensorDataset(data, labels), batch_size=8))
"""


@pytest.mark.skipif(not HAS_LIGHTNING, reason="the 'lightning' package is not installed")
@pytest.mark.parametrize(("k", "precision"), [(1, "32-true"), (2, "bf16-mixed")])
def test_lightning_trainer_fit_is_recorded(tmp_path: Path, k: int, precision: str) -> None:
    out, log = run(tmp_path, LIGHTNING.format(k=k, precision=precision))
    tr = open_trace(out)
    assert len(log["losses"]) == 16 and tr.rounds == 16 // k
    assert tr.attrs.run["model_class"] == "Module"
    want = np.array(log["losses"]).reshape(-1, k).mean(1)
    np.testing.assert_allclose(zarr.open_group(str(out))["loss"][:], want, rtol=1e-6)
    assert validate_trace(out).ok
    assert check_trace(out) == tr.rounds * 3


# -- the examples, as a user runs them ---------------------------------------------------------
def _record_and_analyze(tmp_path: Path, script: str, *args: str) -> Path:
    out = tmp_path / "trace.zarr"
    res = CliRunner().invoke(main, ["record", "--out", str(out), "--taylor-every", "2",
                                    "--samples-per-round", "8", "--probe-size", "32",
                                    "--probe-every", "2", "--",
                                    "python", str(EXAMPLES / script), *args])
    assert res.exit_code == 0, res.output
    assert validate_trace(out).ok
    an = tmp_path / "an"
    res = CliRunner().invoke(main, ["analyze", str(out), "--out", str(an), "--checkpoints", "2"])
    assert res.exit_code == 0, res.output
    ds = open_results(an / "results.zarr")
    assert (ds.neuron_status.values == CONVERGED).all()
    assert (an / "figures" / "fig3_regret.png").stat().st_size > 1000
    return out


def test_the_amp_accumulation_example_records_validates_conforms_and_analyses(
        tmp_path: Path) -> None:
    out = _record_and_analyze(tmp_path, "amp_accumulation.py", "--epochs", "1")
    tr = open_trace(out)
    assert tr.rounds == 1792 // 32 // 4
    run_attrs = tr.attrs.run
    assert run_attrs["accumulation"]["micro_batches"] == 4
    assert run_attrs["lr_schedulers"] == ["OneCycleLR"] and run_attrs["grad_scaler"] is True
    assert run_attrs["low_precision"]["output_dtype"] == "bfloat16"
    assert check_trace(out) == tr.taylor_rounds * 3


@pytest.mark.skipif(not HAS_LIGHTNING, reason="the 'lightning' package is not installed")
def test_the_lightning_example_records_validates_conforms_and_analyses(tmp_path: Path) -> None:
    out = _record_and_analyze(tmp_path, "lightning_mlp.py", "--epochs", "1")
    tr = open_trace(out)
    assert tr.rounds == 1797 // 64 and tr.attrs.run["lr_schedulers"] == ["StepLR"]
    assert check_trace(out) == tr.taylor_rounds * 3
