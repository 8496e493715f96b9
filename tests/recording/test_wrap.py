"""Zero-code recording: ``ntrace record -- python script.py`` on unmodified example loops."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result

from ntrace.cli import main
from ntrace.errors import (
    LossMismatchError,
    NonFiniteLossError,
    ScriptError,
    UnsupportedModelError,
    UsageError,
)
from ntrace.format.metadata import Sampling
from ntrace.format.reader import open_trace
from ntrace.format.validate import validate_trace
from ntrace.recording.wrap import WrapOptions, parse_command, run_wrapped

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


# -- what the script does to the process -----------------------------------------------------------
SCRIPT = """\
import os, sys, torch
from torch import nn
torch.manual_seed(0)
m = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
opt = torch.optim.SGD(m.parameters(), lr=0.1)
{before}
for i in range(4):
    x, y = torch.randn(8, 4), torch.zeros(8, 2)
    loss = torch.nn.functional.mse_loss(m(x), y)
    {loss}
    opt.zero_grad()
    loss.backward()
    opt.step()
{after}
"""


def script(tmp_path: Path, before: str = "", loss: str = "pass", after: str = "") -> str:
    path = tmp_path / "train.py"
    path.write_text(SCRIPT.format(before=before, loss=loss, after=after))
    return str(path)


def record_script(tmp_path: Path, path: str, out: str = "w.zarr") -> Result:
    return CliRunner().invoke(main, ["record", "--out", out, "--probe-size", "0", "--",
                                     "python", path], env={"COLUMNS": "300"})


@pytest.mark.parametrize(("after", "status", "said"), [
    ("sys.exit('training failed: bad data')", 1, "training failed: bad data"),
    ("sys.exit(3)", 3, None),  # 3 is also 'trace not found': the script's status is in the line
    ("raise ValueError('boom')", 1, "ValueError: boom"),
    ("open('/nonexistent/file')", 1, "FileNotFoundError: [Errno 2] No such file or directory"),
])
def test_a_failing_script_exits_13_with_its_status_and_its_own_message(
        tmp_path: Path, after: str, status: int, said: str | None) -> None:
    out = tmp_path / "w.zarr"
    result = record_script(tmp_path, script(tmp_path, after=after), str(out))
    assert result.exit_code == ScriptError.exit_code == 13, result.output
    last = result.stderr.rstrip().splitlines()[-1]
    what = (f"exited with status {status}" if after.startswith("sys.exit")
            else "raised " + said.split(" [")[0])  # type: ignore[union-attr]
    assert last.startswith(f"error: the script {what}")
    assert last.endswith(f"the trace keeps its 4 rounds (status 'aborted') at {out}")
    if said is not None:
        assert said in result.stderr.rstrip().splitlines()[-2]  # as Python prints it
    if after.startswith(("raise", "open")):  # the script's traceback, its frames only
        assert "Traceback (most recent call last):" in result.stderr
        assert f'File "{tmp_path / "train.py"}", line 14, in <module>' in result.stderr
        assert "runpy" not in result.stderr and "wrap.py" not in result.stderr
    tr = open_trace(out)
    assert tr.attrs.status == "aborted" and tr.rounds == 4
    assert tr.attrs.status_reason is not None
    assert tr.attrs.status_reason.startswith(f"the script {what}")


def test_the_failure_carries_the_status_in_the_api(tmp_path: Path) -> None:
    with pytest.raises(ScriptError) as info:
        run_wrapped(["python", script(tmp_path, after="sys.exit(3)")],
                    WrapOptions(out=str(tmp_path / "x.zarr"), probe_size=0))
    assert (info.value.status, info.value.detail) == (3, "")
    with pytest.raises(ScriptError) as info:
        run_wrapped(["python", script(tmp_path, before="sys.exit('no data')")],
                    WrapOptions(out=str(tmp_path / "y.zarr"), probe_size=0))
    assert (info.value.status, info.value.detail) == (1, "no data")
    assert "before ntrace found a model to record; nothing was written" in str(info.value)
    assert not (tmp_path / "y.zarr").exists()


def test_a_caught_nan_loss_still_exits_8(tmp_path: Path) -> None:
    path = script(tmp_path, loss="loss = loss * float('nan') if i == 2 else loss",
                  after="print('finished anyway')")
    path_text = Path(path).read_text().replace(
        "    opt.step()", "    try:\n        opt.step()\n    except FloatingPointError as e:\n"
                         "        print('caught', e)")
    Path(path).write_text(path_text)
    out = tmp_path / "nan.zarr"
    result = record_script(tmp_path, path, str(out))
    assert result.exit_code == NonFiniteLossError.exit_code, result.output
    assert "finished anyway" in result.stdout  # the script ran to its end
    assert result.stderr.rstrip().splitlines()[-1].startswith("error: loss is nan at round 3")
    tr = open_trace(out)
    assert tr.attrs.status == "aborted" and tr.rounds == 3


def test_a_chdir_in_the_script_does_not_move_the_trace(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path)
    path = script(tmp_path, before=f"os.chdir({str(tmp_path / 'elsewhere')!r})")
    result = record_script(tmp_path, path, "here.zarr")
    assert result.exit_code == 0, result.output
    assert result.stderr.rstrip().endswith("→ here.zarr")
    assert open_trace(tmp_path / "here.zarr").rounds == 4
    assert not (tmp_path / "elsewhere" / "here.zarr").exists()
    assert Path.cwd() == tmp_path  # and the process is back where it was


def test_a_loss_with_an_l2_term_is_refused(tmp_path: Path) -> None:
    l2 = "loss = loss + 0.01 * sum((p ** 2).sum() for p in m.parameters())"
    result = record_script(tmp_path, script(tmp_path, loss=l2), str(tmp_path / "l2.zarr"))
    assert result.exit_code == LossMismatchError.exit_code, result.output
    line = result.stderr.rstrip().splitlines()[-1]
    assert line.startswith("error: the script backpropagates a loss of ")
    assert "not the mean mse loss of the model output" in line and "weight_decay" in line


@pytest.mark.parametrize("loss", ["loss = loss / 4.0",  # a power of two: accumulation, scalers
                                  "loss = torch.nn.functional.mse_loss(m(x), y)",  # recomputed
                                  "pass"])
def test_the_same_loss_however_backpropagated_is_recorded(tmp_path: Path, loss: str) -> None:
    out = tmp_path / "ok.zarr"
    result = record_script(tmp_path, script(tmp_path, loss=loss), str(out))
    assert result.exit_code == 0, result.output
    assert open_trace(out).rounds == 4
