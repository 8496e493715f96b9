"""Zero-code recording: ``ntrace record -- python script.py`` on unmodified example loops."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from ntrace.cli import main
from ntrace.errors import UnsupportedModelError, UsageError
from ntrace.format.metadata import Sampling
from ntrace.format.reader import open_trace
from ntrace.format.validate import validate_trace
from ntrace.record.wrap import WrapOptions, parse_command, run_wrapped

from .graph_conformance import check_graph_trace
from .test_conformance import check_trace

EXAMPLES = Path(__file__).resolve().parents[2] / "tools" / "examples"


def test_mlp_loop_is_recorded_unmodified(tmp_path: Path) -> None:
    out = tmp_path / "mlp.zarr"
    result = CliRunner().invoke(main, ["record", "--out", str(out), "--taylor-every", "5",
                                       "--", "python", str(EXAMPLES / "mlp_loop.py"),
                                       "--steps", "30"])
    assert result.exit_code == 0, result.output
    tr = open_trace(out)
    assert (tr.rounds, tr.attrs.structure, tr.attrs.loss.id) == (30, "chain", "mse")
    assert tr.attrs.run["optimizer"]["name"] == "adam"
    assert validate_trace(out).ok
    assert check_trace(out) == 6 * 3  # raw-zarr conformance: 6 Taylor rounds × 3 layers


def test_convnet_loop_with_dataloader_is_recorded_unmodified(tmp_path: Path) -> None:
    out = tmp_path / "cnn.zarr"
    result = run_wrapped(["python", str(EXAMPLES / "convnet_loop.py"), "--epochs", "1"],
                         WrapOptions(out=str(out), sampling=Sampling(taylor_every=7,
                                                                     samples_per_round=4),
                                     probe_size=16, probe_every=5))
    assert result.rounds == 1797 // 32
    tr = open_trace(out)
    assert tr.attrs.structure == "graph" and tr.attrs.loss.id == "cross_entropy"
    assert [tr.modules[m].kind for m in tr.attrs.modules] == ["maxpool", "maxpool", "dropout"]
    assert validate_trace(out).ok
    spec = importlib.util.spec_from_file_location("convnet_loop", EXAMPLES / "convnet_loop.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    net = module.Net()
    first = tr.attrs.layers[0]
    checked = check_graph_trace(out, net, lambda g, t: torch.tensor(
        g[f"layers/{first}/input"][t]))
    assert checked == tr.taylor_rounds * 4


def test_module_form_and_script_arguments(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                          ) -> None:
    pkg = tmp_path / "mytrain.py"
    pkg.write_text((EXAMPLES / "mlp_loop.py").read_text())
    monkeypatch.syspath_prepend(str(tmp_path))
    result = run_wrapped([sys.executable, "-m", "mytrain", "--steps", "12"],
                         WrapOptions(out=str(tmp_path / "m.zarr"), probe_every=4))
    assert result.rounds == 12 and open_trace(tmp_path / "m.zarr").rounds == 12


def test_unidentifiable_loss_says_what_and_points_to_the_api(tmp_path: Path) -> None:
    script = tmp_path / "custom_loss.py"
    script.write_text(
        "import torch\nfrom torch import nn\n"
        "m = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))\n"
        "opt = torch.optim.SGD(m.parameters(), lr=0.1)\n"
        "for _ in range(3):\n"
        "    x = torch.randn(8, 4)\n"
        "    loss = (m(x) - 1).abs().mean()\n"
        "    opt.zero_grad(); loss.backward(); opt.step()\n")
    with pytest.raises(UnsupportedModelError, match="could not identify the loss.*Python API"):
        run_wrapped(["python", str(script)], WrapOptions(out=str(tmp_path / "x.zarr")))
    result = CliRunner().invoke(main, ["record", "--out", str(tmp_path / "y.zarr"), "--",
                                       "python", str(script)])
    assert result.exit_code == UnsupportedModelError.exit_code
    assert result.output.startswith("error: could not identify the loss")


def test_script_without_a_trained_model(tmp_path: Path) -> None:
    script = tmp_path / "idle.py"
    script.write_text("print('nothing to train')\n")
    with pytest.raises(UnsupportedModelError, match="never called a model"):
        run_wrapped(["python", str(script)], WrapOptions(out=str(tmp_path / "x.zarr")))


def test_bad_commands_are_refused() -> None:
    with pytest.raises(UsageError, match="nothing to run"):
        parse_command([])
    with pytest.raises(UsageError, match="not found"):
        parse_command(["python", "no_such_script.py"])
    with pytest.raises(UsageError, match="-m"):
        parse_command(["python", "-m"])
    assert parse_command(["python3", "-m", "pkg.train", "--x", "1"]) == (
        "module", "pkg.train", ["--x", "1"])
