"""Bad input through the command line: one `error:` line, the class's exit code, no traceback."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result

from ntrace.cli import main
from ntrace.errors import (
    DatasetError,
    InvalidTraceError,
    NonFiniteLossError,
    TraceExistsError,
    TraceNotFoundError,
    UsageError,
    WriterError,
)
from ntrace.format.reader import open_trace

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "spec" / "examples"
TINY = ["--steps", "3", "--probe-size", "0"]  # the smallest useful recording of the default task


def ntrace_command() -> list[str]:
    """The installed console script next to this interpreter, or the same entry point."""
    script = Path(sys.executable).parent / "ntrace"
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "from ntrace.cli import main; main()"]


def invoke(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def error_line(stderr: str, stdout: str, exit_code: int, code: int) -> str:
    """Assert the CLI failed like a CLI should, and return its one error line."""
    assert exit_code == code, (exit_code, stdout, stderr)
    assert "Traceback" not in stdout + stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    assert stderr.rstrip().splitlines()[-1] == errors[0]  # the last thing said
    return errors[0]


def check(result: Result, code: int) -> str:
    assert result.exception is None or isinstance(result.exception, SystemExit), \
        repr(result.exception)
    return error_line(result.stderr, result.stdout, result.exit_code, code)


# -- record: options -------------------------------------------------------------------------------
def test_unknown_task(tmp_path: Path) -> None:
    line = check(invoke("record", "--task", "cifar-resnet", "--out", str(tmp_path / "t.zarr")),
                 UsageError.exit_code)
    assert "unknown task 'cifar-resnet'" in line and "digits-autoencoder" in line
    assert not (tmp_path / "t.zarr").exists()


def test_unknown_optimizer(tmp_path: Path) -> None:
    line = check(invoke("record", "--optimizer", "lbfgs", "--out", str(tmp_path / "t.zarr"),
                        *TINY), UsageError.exit_code)
    assert "'lbfgs' is not one of 'sgd', 'momentum', 'rmsprop', 'adam', 'adagrad'" in line
    assert not (tmp_path / "t.zarr").exists()


@pytest.mark.parametrize(("args", "needle"), [  # what only the task decides (ranges: test_options)
    (["--samples-per-round", "65"], "--samples-per-round 65 exceeds the batch size 64"),
    (["--epochs", "1"], "give --epochs or --steps, not both"),
])
def test_bad_option_values(tmp_path: Path, args: list[str], needle: str) -> None:
    line = check(invoke("record", "--out", str(tmp_path / "t.zarr"), *TINY, *args),
                 UsageError.exit_code)
    assert needle in line
    assert not (tmp_path / "t.zarr").exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="CUDA is available here")
def test_cuda_requested_without_cuda(tmp_path: Path) -> None:
    line = check(invoke("record", "--device", "cuda", "--out", str(tmp_path / "t.zarr"), *TINY),
                 UsageError.exit_code)
    assert "CUDA is not available" in line and "--device cpu" in line


# -- record: data ----------------------------------------------------------------------------------
def test_mnist_without_data_dir(tmp_path: Path) -> None:
    line = check(invoke("record", "--task", "mnist-autoencoder", "--out",
                        str(tmp_path / "m.zarr"), *TINY), DatasetError.exit_code)
    assert "--data-dir" in line and "t10k-images-idx3-ubyte" in line


def _idx(data: np.ndarray) -> bytes:
    head = bytes([0, 0, 8, data.ndim]) + b"".join(n.to_bytes(4, "big") for n in data.shape)
    return head + data.astype(np.uint8).tobytes()


@pytest.mark.parametrize(("damage", "needle"), [
    ("bad-magic", "is not an IDX file (bad magic number)"),
    ("truncated", "IDX header promises shape (70, 28, 28)"),
    ("not-gzip", "named .gz but is not gzip-compressed"),
    ("corrupt-gzip", "gzip stream is corrupt or truncated"),
])
def test_malformed_idx_files(tmp_path: Path, damage: str, needle: str) -> None:
    data = tmp_path / "mnist"
    data.mkdir()
    images = _idx(np.zeros((70, 28, 28)))
    labels = _idx(np.zeros(70))
    if damage == "bad-magic":
        images = b"\x08\x03" + images[2:]
    elif damage == "truncated":
        images = images[:-1000]
    if damage == "not-gzip":
        (data / "t10k-images-idx3-ubyte.gz").write_bytes(images)
    elif damage == "corrupt-gzip":
        gz = gzip.compress(images, mtime=0)
        (data / "t10k-images-idx3-ubyte.gz").write_bytes(gz[:10] + b"\xff" + gz[11:])
    else:
        (data / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(images, mtime=0))
    (data / "t10k-labels-idx1-ubyte").write_bytes(labels)
    line = check(invoke("record", "--task", "mnist-autoencoder", "--data-dir", str(data),
                        "--out", str(tmp_path / "m.zarr"), *TINY), DatasetError.exit_code)
    assert needle in line and "t10k-images-idx3-ubyte.gz" in line
    assert not (tmp_path / "m.zarr").exists()


# -- record: the output path -----------------------------------------------------------------------
def test_output_under_a_regular_file(tmp_path: Path) -> None:
    blocker = tmp_path / "somefile"
    blocker.write_text("not a directory")
    line = check(invoke("record", "--out", str(blocker / "x.zarr"), *TINY), UsageError.exit_code)
    assert f"cannot write trace {blocker / 'x.zarr'}" in line
    assert blocker.read_text() == "not a directory"


def test_output_under_a_regular_file_names_the_problem(tmp_path: Path) -> None:
    blocker = tmp_path / "somefile"
    blocker.write_text("")
    line = check(invoke("record", "--out", str(blocker / "x.zarr"), *TINY), UsageError.exit_code)
    assert "is not a directory" in line


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_output_in_an_unwritable_filesystem() -> None:
    # root passes os.access on /proc, so the failure surfaces when the store is created
    line = check(invoke("record", "--out", "/proc/ntrace-test.zarr", *TINY), WriterError.exit_code)
    assert "cannot create trace /proc/ntrace-test.zarr" in line


def test_output_under_a_missing_directory(tmp_path: Path) -> None:
    line = check(invoke("record", "--out", str(tmp_path / "no" / "t.zarr"), *TINY),
                 UsageError.exit_code)
    assert "does not exist" in line


def test_existing_output_without_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "t.zarr"
    out.mkdir()
    (out / "keep").write_text("mine")
    line = check(invoke("record", "--out", str(out), *TINY), TraceExistsError.exit_code)
    assert "already exists" in line and "--overwrite" in line
    assert (out / "keep").read_text() == "mine" and len(list(out.iterdir())) == 1


@pytest.mark.parametrize("kind", ["directory", "file"])
def test_overwrite_refuses_what_is_not_a_trace(tmp_path: Path, kind: str) -> None:
    out = tmp_path / "precious"
    if kind == "directory":
        out.mkdir()
        (out / "thesis.tex").write_text("years of work")
        (out / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group",
                                                   "attributes": {}}))
    else:
        out.write_text("years of work")
    before = sorted(p.name for p in out.iterdir()) if kind == "directory" else None
    line = check(invoke("record", "--out", str(out), "--overwrite", *TINY), UsageError.exit_code)
    assert "refusing to overwrite" in line and "not an ntrace trace" in line
    if kind == "directory":
        assert sorted(p.name for p in out.iterdir()) == before
        assert (out / "thesis.tex").read_text() == "years of work"
    else:
        assert out.read_text() == "years of work"


def test_overwrite_replaces_a_trace(tmp_path: Path) -> None:
    out = tmp_path / "t.zarr"
    assert invoke("record", "--out", str(out), *TINY).exit_code == 0
    (out / "stale-file").write_text("")
    result = invoke("record", "--out", str(out), "--overwrite", *TINY, "--seed", "1")
    assert result.exit_code == 0, result.output
    assert not (out / "stale-file").exists()
    assert open_trace(out).attrs.run["seed"] == 1


# -- a diverging run: a real process ---------------------------------------------------------------
@pytest.fixture(scope="module")
def diverged(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("nan") / "diverged.zarr"
    proc = subprocess.run([*ntrace_command(), "record", "--lr", "1e6", "--steps", "200",
                           "--optimizer", "sgd", "--probe-size", "50", "--out", str(out)],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "100"})
    return out, proc


def test_nan_loss_stops_the_run_with_one_line(diverged: tuple[Path, subprocess.CompletedProcess]
                                              ) -> None:
    out, proc = diverged
    line = error_line(proc.stderr, proc.stdout, proc.returncode, NonFiniteLossError.exit_code)
    assert line.startswith("error: loss is ") and "(status 'aborted')" in line
    tr = open_trace(out)
    assert tr.attrs.status == "aborted"
    assert tr.attrs.status_reason is not None and tr.attrs.status_reason.startswith("loss is ")
    assert 0 < tr.rounds < 200  # it did diverge, and the rounds before it were kept
    assert np.isfinite(tr.read("loss")).all()


def test_validate_names_the_abort(diverged: tuple[Path, subprocess.CompletedProcess]) -> None:
    out, _ = diverged
    result = invoke("validate", str(out))
    assert result.exit_code == 1 and "Traceback" not in result.output
    listed = [line for line in result.stderr.splitlines() if line.startswith("  - ")]
    assert len(listed) == 1 and listed[0].startswith("  - run aborted: loss is ")


def test_info_still_works_after_the_abort(diverged: tuple[Path, subprocess.CompletedProcess]
                                          ) -> None:
    out, _ = diverged
    result = invoke("info", str(out))
    assert result.exit_code == 0, result.output
    assert "status aborted (loss is " in result.stdout and "6 tracked layers" in result.stdout


# -- info and validate on bad traces ---------------------------------------------------------------
def test_info_on_missing_and_non_trace_paths(tmp_path: Path) -> None:
    line = check(invoke("info", str(tmp_path / "nope.zarr")), TraceNotFoundError.exit_code)
    assert "does not exist" in line
    line = check(invoke("info", str(tmp_path)), TraceNotFoundError.exit_code)
    assert "holds no zarr.json" in line


@pytest.mark.parametrize(("name", "needle"), [
    ("wrong-dims", "is not a valid trace: layers/fc1/input: dimension_names"),
    ("unknown-major-version", "needs a newer ntrace (this is 0.1.0, which reads format 1.x): "
                              "pip install -U ntrace"),
])
def test_info_refuses_invalid_traces(name: str, needle: str) -> None:
    line = check(invoke("info", str(EXAMPLES / "invalid" / f"{name}.zarr")),
                 InvalidTraceError.exit_code)
    assert needle in line


def test_info_on_a_garbled_root_document(tmp_path: Path) -> None:
    bad = tmp_path / "bad.zarr"
    bad.mkdir()
    (bad / "zarr.json").write_text("{ not json")
    check(invoke("info", str(bad)), InvalidTraceError.exit_code)
    result = invoke("validate", str(bad))
    assert result.exit_code in (1, InvalidTraceError.exit_code)
    assert "Traceback" not in result.output
