"""Resume: a run killed or stopped mid-way continues from its last checkpoint and yields the
same trace as an uninterrupted run with the same seed (CPU, exact)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from torch import nn

from ntrace.errors import InvalidTraceError, UsageError
from ntrace.format.metadata import Sampling
from ntrace.format.reader import open_trace
from ntrace.format.validate import validate_trace
from ntrace.progress import Progress
from ntrace.recording import Recorder
from ntrace.tasks import get_task
from ntrace.tasks.runner import RunOptions, run_task

SAMPLING = Sampling(taylor_every=3, samples_per_round=4)


def options(out: Path, **kw: object) -> RunOptions:
    kw.setdefault("checkpoint_every", 28)  # every epoch of the digits task
    return RunOptions(out=str(out), steps=90, optimizer="adam", sampling=SAMPLING, probe_size=40,
                      **kw)  # type: ignore[arg-type]


def assert_same_trace(a_path: Path, b_path: Path) -> None:
    a, b = open_trace(a_path), open_trace(b_path)
    assert a.attrs.commit == b.attrs.commit and b.attrs.status == "complete"
    for p in a.layouts:
        np.testing.assert_array_equal(a.read(p), b.read(p), err_msg=p)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("full") / "full.zarr"
    run_task(get_task("digits-autoencoder"), options(out))
    return out


def test_resume_after_an_exception_equals_an_uninterrupted_run(tmp_path: Path,
                                                              uninterrupted: Path) -> None:
    out = tmp_path / "part.zarr"

    class Stop(Exception):
        pass

    def stop_at_70(p: Progress) -> None:
        if p.done == 70:
            raise Stop

    with pytest.raises(Stop):
        run_task(get_task("digits-autoencoder"), options(out), stop_at_70)
    tr = open_trace(out)
    assert tr.attrs.status == "aborted" and tr.rounds == 70
    assert tr.attrs.checkpoint == {"slot": "b", "round": 56}  # epochs of 28 rounds
    run_task(get_task("digits-autoencoder"), options(out, resume=True))
    assert_same_trace(uninterrupted, out)
    assert validate_trace(out).ok


def test_resume_after_sigkill_equals_an_uninterrupted_run(tmp_path: Path,
                                                         uninterrupted: Path) -> None:
    out = tmp_path / "killed.zarr"
    code = (f"from ntrace.cli import main; main(['record', '--out', {str(out)!r}, '--steps', "
            "'90', '--optimizer', 'adam', '--taylor-every', '3', '--samples-per-round', '4', "
            "'--probe-size', '40', '--checkpoint-every', '28'])")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # kill once a checkpoint exists
        try:
            doc = json.loads((out / "zarr.json").read_text())["attributes"]["ntrace"]
            if doc.get("checkpoint"):
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert open_trace(out).attrs.status == "running"  # killed: never closed
    run_task(get_task("digits-autoencoder"), options(out, resume=True))
    assert_same_trace(uninterrupted, out)


def test_a_finished_run_can_be_extended(tmp_path: Path) -> None:
    out = tmp_path / "ext.zarr"
    run_task(get_task("digits-autoencoder"),
             RunOptions(out=str(out), steps=40, sampling=SAMPLING, probe_size=40))
    run_task(get_task("digits-autoencoder"), RunOptions(out=str(out), steps=70,
                                                        probe_size=40, resume=True))
    tr = open_trace(out)
    assert tr.rounds == 70 and validate_trace(out).ok


def test_checkpoints_hold_numbers_only(uninterrupted: Path) -> None:
    g = zarr.open_group(str(uninterrupted), mode="r", use_consolidated=False)
    slot = g.attrs["ntrace"]["checkpoint"]["slot"]
    ck = g[f"checkpoints/{slot}"]
    kinds = {np.dtype(a.dtype).kind for _, a in ck.arrays()}
    assert kinds <= {"f", "i", "u", "b"}  # no object arrays: loading runs no code
    names = {name for name, _ in ck.arrays()}
    assert {"model.fc1.weight", "rng.torch", "user.data.order"} <= names
    assert any(n.startswith("optim.") for n in names)


def test_resume_refuses_a_different_model_or_a_trace_without_checkpoint(
        tmp_path: Path, uninterrupted: Path) -> None:
    with pytest.raises(InvalidTraceError, match="resume with the same model"):
        Recorder(nn.Sequential(nn.Linear(64, 3)), uninterrupted, resume=True)
    out = tmp_path / "nock.zarr"
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    with Recorder(model, out) as rec:
        x = torch.randn(8, 4)
        y = model(x)
        rec.step(torch.nn.functional.mse_loss(y, torch.zeros(8, 2)), y, torch.zeros(8, 2))
    with pytest.raises(UsageError, match="holds no checkpoint"):
        Recorder(model, out, resume=True)


def test_a_default_run_with_huge_steps_killed_early_opens_and_resumes(tmp_path: Path) -> None:
    """Issue 18, items 7 and 8: `ntrace record --steps 1000000000` (default options, no
    --checkpoint-every) killed after two epochs. Its arrays were declared for 1e9 rounds
    (10.2 TB of Jacobians, over the reader's limit) and its first checkpoint was a minute
    away, so the trace neither opened nor resumed. Now the arrays hold about what was
    written and the first epoch ends with a checkpoint."""
    from click.testing import CliRunner

    from ntrace.cli import main

    out = tmp_path / "long.zarr"
    code = (f"from ntrace.cli import main; main(['record', '--out', {str(out)!r}, "
            "'--steps', '1000000000'])")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    rounds = 0
    while time.monotonic() < deadline and rounds < 70:  # two epochs of 28 rounds committed
        try:
            doc = json.loads((out / "zarr.json").read_text())["attributes"]["ntrace"]
            rounds = doc["commit"]["rounds"]
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert rounds >= 70, "the recording did not get going"
    info = CliRunner().invoke(main, ["info", str(out)])
    assert info.exit_code == 0, info.output
    report = validate_trace(out)
    assert report.ok, report.reasons
    assert report.attrs is not None and report.attrs.status == "running"
    ck = report.attrs.checkpoint
    assert ck is not None and ck["round"] > 0  # end of epoch 1 (28), or after 5 s if sooner
    steps = ck["round"] + 30
    result = CliRunner().invoke(main, ["record", "--resume", str(out), "--steps", str(steps)])
    assert result.exit_code == 0, result.output
    tr = open_trace(out)
    assert tr.attrs.status == "complete" and tr.rounds == steps
    assert validate_trace(out).ok


# -- hostile run metadata and checkpoints: one line naming the field, nothing written --------------
def _edit_run(path: Path, **fields: object) -> None:
    doc = json.loads((path / "zarr.json").read_text())
    doc["attributes"]["ntrace"]["run"].update(fields)
    doc.pop("consolidated_metadata", None)
    (path / "zarr.json").write_text(json.dumps(doc))


def _checkpoint_array(path: Path, name: str, value: np.ndarray) -> None:
    from zarr.codecs import BloscCodec

    g = zarr.open_group(str(path), mode="r+", use_consolidated=False)
    slot = g.attrs["ntrace"]["checkpoint"]["slot"]
    g[f"checkpoints/{slot}"].create_array(
        name, shape=value.shape, dtype=value.dtype, chunks=value.shape, overwrite=True,
        compressors=[BloscCodec(cname="zstd")],
        dimension_names=tuple(f"{name}:{i}" for i in range(value.ndim)))[...] = value
    _edit_run(path)  # drop the consolidated metadata the new array disagrees with


HOSTILE = {
    "nan-seed": (lambda p: _edit_run(p, seed=float("nan")),
                 "run.seed: expected an integer, found float"),
    "dataset-as-string": (lambda p: _edit_run(p, dataset="digits"),
                          "run.dataset: expected an object, found str"),
    "lr-fast": (lambda p: _edit_run(p, learning_rate="fast"),
                "run.learning_rate: expected a finite number, found 'fast'"),
    "negative-lr": (lambda p: _edit_run(p, learning_rate=-1.0),
                    "run.learning_rate: expected a positive number, found -1.0"),
    "huge-seed": (lambda p: _edit_run(p, seed=2**64), "run.seed: expected an integer below 2^63"),
    "unknown-optimizer": (lambda p: _edit_run(p, optimizer_choice="lbfgs"),
                          "run.optimizer_choice: expected one of sgd, momentum"),
    "order-out-of-range": (
        lambda p: _checkpoint_array(p, "user.data.order", np.arange(1797, dtype=np.int64) * 1000),
        "checkpoint array user.data.order: expected an order of the 1797 samples (each index "
        "once), found int64 of shape (1797,), values 0 to 1796000"),
    "rng-garbage": (lambda p: _checkpoint_array(p, "user.data.rng", np.ones(5056, np.uint8)),
                    "checkpoint array user.data.rng: not the state of a torch generator"),
    "weight-shape": (
        lambda p: _checkpoint_array(p, "model.fc1.weight", np.zeros((50, 63), np.float32)),
        "checkpoint array model.fc1.weight is float32 of shape (50, 63), but the model's "
        "fc1.weight is (50, 64); resume with the same model"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_resume_refuses_hostile_metadata_in_one_line(tmp_path: Path, uninterrupted: Path,
                                                     case: str) -> None:
    from click.testing import CliRunner

    from ntrace.cli import main

    mutate, needle = HOSTILE[case]
    out = tmp_path / "copy.zarr"
    shutil.copytree(uninterrupted, out)
    mutate(out)
    before = (out / "zarr.json").read_bytes()
    result = CliRunner().invoke(main, ["record", "--resume", str(out), "--steps", "100"])
    assert result.exit_code == InvalidTraceError.exit_code, result.output
    assert "Traceback" not in result.output and result.output.count("\n") == 1
    assert result.output.startswith("error: ") and needle in result.output
    if case != "weight-shape":  # refused from the metadata alone: nothing was written
        assert (out / "zarr.json").read_bytes() == before
