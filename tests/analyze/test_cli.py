"""``ntrace analyze`` and ``ntrace compare`` through click's runner: results, figures, and
bad input as one `error:` line with the class's exit code and no traceback."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result

from ntrace.analyze import open_results
from ntrace.cli.analyze import analyze, compare
from ntrace.errors import EmptyTraceError
from ntrace.format.metadata import Sampling

from .conftest import mlp, record_run


def run(cmd, *args: str) -> Result:
    return CliRunner().invoke(cmd, [str(a) for a in args])


def error(result: Result, code: int) -> str:
    out = result.stdout + result.stderr
    assert result.exit_code == code, out
    assert "Traceback" not in out
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_analyze_writes_results_and_figures(mlp_mse, tmp_path: Path) -> None:
    out = tmp_path / "an"
    res = run(analyze, mlp_mse, "--out", out, "--checkpoints", "4", "--dynamic")
    assert res.exit_code == 0, res.stdout + res.stderr
    ds = open_results(out / "results.zarr")
    a = ds.attrs["ntrace"]
    assert a["domain"] == "ball" and a["tolerance"] == 1e-6 and a["dynamic"]
    assert a["checkpoints"] == [int(c) for c in ds.checkpoint.values]
    assert a["ntrace_version"] and "taylor/sample_loss" in a["comparison"]
    for name in ("fig3_regret", "fig5_exploration"):
        for fmt in ("png", "svg"):
            assert (out / "figures" / f"{name}.{fmt}").stat().st_size > 1000
    assert "cumulative loss" in res.stdout and "network" in res.stdout and "neurons" in res.stdout
    again = run(analyze, mlp_mse, "--out", out, "--checkpoints", "2", "--no-figures", "-q")
    assert again.exit_code == 0, again.stderr  # an earlier results store is replaced
    assert len(open_results(out / "results.zarr").checkpoint) == 2


def test_compare_overlays_traces_and_reuses_results(mlp_mse, tmp_path: Path) -> None:
    torch.manual_seed(1)
    X = torch.randn(128, 6)
    other = record_run(mlp((6, 5, 4, 3), leaky=True), tmp_path / "adam.zarr", "mse", X,
                       torch.tanh(X[:, :3]), 40, 8,
                       Sampling(taylor_every=2, samples_per_round=6), lr=0.01,
                       probe=X[:32], probe_every=2, optimizer="adam")
    first = tmp_path / "first"
    assert run(analyze, mlp_mse, "--out", first, "--checkpoints", "3", "--no-figures",
               "-q").exit_code == 0
    out = tmp_path / "cmp"
    res = run(compare, first / "results.zarr", other, mlp_mse, "--out", out,
              "--checkpoints", "3")
    assert res.exit_code == 0, res.stdout + res.stderr
    for name in ("fig3_regret", "fig4_optimizers", "fig5_exploration"):
        assert (out / "figures" / f"{name}.png").is_file()
    assert "adam" in res.stdout and "sgd (2)" in res.stdout
    line = error(run(compare, mlp_mse, "--out", out), 2)
    assert "at least two traces" in line


def test_missing_path_and_non_trace_directory(tmp_path: Path) -> None:
    line = error(run(analyze, tmp_path / "nothing.zarr"), 3)
    assert "no trace at" in line and "does not exist" in line
    (tmp_path / "plain").mkdir()
    assert "no trace at" in error(run(analyze, tmp_path / "plain"), 3)


def test_invalid_trace(mlp_mse, tmp_path: Path) -> None:
    bad = Path(shutil.copytree(mlp_mse, tmp_path / "bad.zarr"))
    shutil.rmtree(bad / "layers" / "0" / "weight")
    line = error(run(analyze, bad), 5)
    assert "layers/0/weight" in line


def test_newer_major_format_version(mlp_mse, tmp_path: Path) -> None:
    new = Path(shutil.copytree(mlp_mse, tmp_path / "new.zarr"))
    meta = new / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"]["ntrace"]["format_version"] = "2.0"
    meta.write_text(json.dumps(doc))
    line = error(run(analyze, new), 5)
    assert "2.0" in line and "newer ntrace" in line


def test_empty_trace(tmp_path: Path) -> None:
    X = torch.randn(32, 6)
    empty = record_run(mlp((6, 5, 3)), tmp_path / "empty.zarr", "mse", X, X[:, :3], 5, 8,
                       Sampling(taylor_every=100, taylor_offset=50, samples_per_round=4),
                       probe=X[:8], probe_every=1)
    line = error(run(analyze, empty), EmptyTraceError.exit_code)
    assert "0 committed Taylor rounds" in line and "nothing to analyse" in line


def test_layer_and_neuron_that_do_not_exist(mlp_mse, mlp_ce) -> None:
    line = error(run(analyze, mlp_mse, "--layer", "nope"), 2)
    assert "'nope' does not exist" in line and "0, 2, 4" in line
    line = error(run(analyze, mlp_mse, "--layer", "2", "--neuron", "99"), 2)
    assert "neuron 99 does not exist in layer '2'" in line and "0..3" in line
    line = error(run(analyze, mlp_mse, "--neuron", "1"), 2)
    assert "exactly one --layer" in line
    from ntrace.format.reader import open_trace

    tracked = set(open_trace(mlp_ce).tracked["0"].tolist())
    untracked = min(set(range(5)) - tracked)
    line = error(run(analyze, mlp_ce, "--layer", "0", "--neuron", untracked), 2)
    assert "was not tracked" in line


def test_bad_options(mlp_mse, tmp_path: Path) -> None:
    assert "--checkpoints" in error(run(analyze, mlp_mse, "--checkpoints", "abc"), 2)
    assert "exceeds" in error(run(analyze, mlp_mse, "--checkpoints", "5,500"), 2)
    assert "tol" in error(run(analyze, mlp_mse, "--tol", "-1"), 2)
    assert "unknown scale" in error(run(analyze, mlp_mse, "--scale", "galaxy"), 2)
    line = error(run(analyze, mlp_mse, "--out", Path(mlp_mse) / "inside"), 2)
    assert "overlaps the trace" in line
    assert not (Path(mlp_mse) / "inside").exists()  # nothing was written into the trace
    if not torch.cuda.is_available():
        assert "CUDA is not available" in error(run(analyze, mlp_mse, "--device", "cuda"), 2)


@pytest.mark.parametrize("args", [("--scale", "network"),
                                  ("--scale", "layer", "--layer", "0")])
def test_scale_that_cannot_be_computed(mlp_ce, args: tuple[str, ...]) -> None:
    line = error(run(analyze, mlp_ce, *args), 2)  # only 3 neurons per layer were tracked
    assert "tracked" in line
