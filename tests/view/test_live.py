"""The incremental analysis of a growing trace equals a fresh analysis of the same prefix."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from ntrace.analyze import AnalysisOptions, analyze_trace
from ntrace.view.live import LiveAnalysis, grid, view_checkpoints


def _bench_view():  # tools/ is no package on sys.path under plain pytest: load it by path
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "tools" / "bench_view.py"
    spec = importlib.util.spec_from_file_location("bench_view", path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


set_commit = _bench_view().set_commit


def test_grid_is_fixed_and_ends_at_the_count() -> None:
    assert grid(10) == (1, 2, 3, 4, 5, 6, 7, 8, 10)
    assert set(grid(1000)) <= set(grid(5000))
    assert view_checkpoints(9) == (1, 2, 3, 4, 5, 6, 7, 8, 9)
    assert len(grid(10 ** 5)) < 70


def _same(live, fresh, tol: float) -> None:
    assert list(live.data_vars) == list(fresh.data_vars)
    for name in fresh.data_vars:
        if name.endswith("_optimum_point"):  # an argmin need not be unique (flat directions
            continue  # of an unconstrained cross-entropy): its value is what is compared
        a, b = live[name].values, fresh[name].values
        assert a.shape == b.shape, name
        if a.dtype.kind == "f":  # optima within their certified gaps (tol); an exponent is
            # a slope through log regrets, which the gaps move by a little more
            rtol = 1e-3 if "exponent" in name else 1e-7
            n = int(fresh.checkpoint.max())  # N x optimum: N x its error
            atol = tol * n if ("total" in name or "regret" in name) else tol
            np.testing.assert_allclose(a, b, rtol=rtol, atol=atol, equal_nan=True,
                                       err_msg=name)
        elif "iterations" not in name:
            np.testing.assert_array_equal(a, b, err_msg=name)
    for c in ("checkpoint", "checkpoint_round", "round_index", "snapshot_round"):
        np.testing.assert_array_equal(live[c].values, fresh[c].values)


def test_updates_read_only_new_rows_and_equal_a_fresh_analysis(long_mse: Path,
                                                              tmp_path: Path) -> None:
    path = tmp_path / "live.zarr"
    shutil.copytree(long_mse, path)
    set_commit(path, 7)
    live = LiveAnalysis(path)
    assert live.incremental
    seen = 0
    for rounds in (7, 20, 20, 33, 64, 90):
        set_commit(path, rounds)
        changed = live.update()
        assert changed == (rounds != seen)
        seen = rounds
        T = live.taylor_rounds
        assert T == rounds  # a Taylor round every round
        assert live.rows_read == T  # each row read once, over all updates
        opts = AnalysisOptions(domain="none", checkpoints=view_checkpoints(T),
                               scales=("layer", "neuron"))
        fresh = analyze_trace(path, opts)
        assert live.dataset is not None
        assert fresh.attrs["ntrace"]["checkpoints"] == list(view_checkpoints(T))
        _same(live.dataset, fresh, tol=10 * opts.tol)
    assert live.restarts == 0


@pytest.mark.parametrize("domain", ["ball"])
def test_a_domain_built_from_every_iterate_is_recomputed(long_mse: Path, tmp_path: Path,
                                                         domain: str) -> None:
    path = tmp_path / "live.zarr"
    shutil.copytree(long_mse, path)
    live = LiveAnalysis(path, AnalysisOptions(domain=domain, scales=("network", "layer",
                                                                     "neuron")))
    assert not live.incremental
    for rounds in (20, 50):
        set_commit(path, rounds)
        live.update()
        fresh = analyze_trace(path, AnalysisOptions(domain=domain,
                                                    checkpoints=view_checkpoints(rounds)))
        assert "network_optimum" in fresh
        assert live.dataset is not None
        _same(live.dataset, fresh, tol=0.0)


def test_the_working_set_of_an_iterative_loss_grows(long_ce: Path, tmp_path: Path) -> None:
    """Cross-entropy keeps its rows: when they outgrow the room, it is rebuilt twice as
    large, and the results still equal a fresh analysis."""
    path = tmp_path / "live.zarr"
    shutil.copytree(long_ce, path)
    live = LiveAnalysis(path)
    for rounds in (5, 9, 30, 40):
        set_commit(path, rounds)
        live.update()
        opts = AnalysisOptions(domain="none", checkpoints=view_checkpoints(rounds),
                               scales=("layer", "neuron"))
        assert live.dataset is not None
        _same(live.dataset, analyze_trace(path, opts), tol=10 * opts.tol)
    assert live.restarts == 1  # 5 rounds: room for 10; 9 fit; 30 do not: room for 60
    assert live.rows_read == 5 + (9 - 5) + 30 + (40 - 30)


def test_exploration_within_a_budget(long_mse: Path, tmp_path: Path) -> None:
    """With a time budget the exploration is measured again only as often as its cost
    allows while the run runs (the hindsight still follows every commit), and once more when
    it has ended."""
    path = tmp_path / "live.zarr"
    shutil.copytree(long_mse, path)
    finished = (path / "zarr.json").read_text()
    live = LiveAnalysis(path, exploration_budget=1e-9)  # once measured, never again soon
    set_commit(path, 30)
    live.update()
    assert live.snapshots == 10 and live.dataset is not None
    assert live.dataset.sizes["snapshot"] == 10
    set_commit(path, 60)
    assert live.update()  # new Taylor rounds: new results ...
    assert live.taylor_rounds == 60 and live.snapshots == 10  # ... with the old exploration
    assert live.dataset.sizes["snapshot"] == 10
    (path / "zarr.json").write_text(finished)  # the writer finished: status complete
    assert live.update()
    assert live.snapshots == 30 and live.dataset.sizes["snapshot"] == 30
    fresh = analyze_trace(path, AnalysisOptions(domain="none", scales=("layer", "neuron"),
                                                checkpoints=view_checkpoints(90)))
    _same(live.dataset, fresh, tol=10 * AnalysisOptions().tol)
