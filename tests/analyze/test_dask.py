"""The Dask path: same results as in process on a 2-worker LocalCluster (real processes, one
thread each), tasks that carry descriptors and never trace data, exact combination of the
exploration parts, and the CLI flags and their errors."""

from __future__ import annotations

import pickle
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner

pytest.importorskip("distributed")

from distributed.diagnostics.plugin import SchedulerPlugin  # noqa: E402

from ntrace.analyze import AnalysisOptions, analyze_trace, open_results  # noqa: E402
from ntrace.analyze import cluster as cluster_mod  # noqa: E402
from ntrace.analyze.cluster import Cluster, task_location  # noqa: E402
from ntrace.analyze.exploration import (  # noqa: E402
    distance_rows,
    log_volume,
    log_volume_bytes,
    min_previous_distance,
    switch_counts,
)
from ntrace.analyze.graph import split_plan  # noqa: E402
from ntrace.analyze.metrics import METRICS  # noqa: E402
from ntrace.analyze.metrics.changed import changed_unit_fraction_dense  # noqa: E402
from ntrace.analyze.plan import make_plan  # noqa: E402
from ntrace.cli import main  # noqa: E402
from ntrace.errors import UsageError  # noqa: E402
from ntrace.format.bits import pack, unpack  # noqa: E402
from ntrace.format.metadata import Sampling  # noqa: E402
from ntrace.format.pack import pack_trace  # noqa: E402
from ntrace.format.reader import open_trace  # noqa: E402

from .conftest import mlp, record_run, same_results  # noqa: E402

SPEC_LIMIT = 16 << 10  # bytes: a task's pickled function and arguments stay below this


class Spy(SchedulerPlugin):
    """Records, on the scheduler, the pickled size of every task submitted (its function
    and arguments) and the size of every result."""

    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler
        self.spec: dict[str, int] = {}
        self.result: dict[str, int] = {}

    def update_graph(self, scheduler: Any, *, keys: Any, tasks: Any = (), **kw: Any) -> None:
        for k in list(tasks) or list(keys):
            ts = scheduler.tasks.get(k)
            if ts is not None and ts.run_spec is not None:
                self.spec[str(k)] = len(pickle.dumps(ts.run_spec))

    def transition(self, key: Any, start: str, finish: str, *args: Any, **kw: Any) -> None:
        if finish == "memory":
            ts = self.scheduler.tasks.get(key)
            if ts is not None:
                self.result[str(key)] = int(ts.nbytes)


@pytest.fixture(scope="module")
def cluster() -> Any:
    with Cluster(workers=2, processes=True) as cl:
        spy = Spy(cl.local.scheduler)
        cl.local.scheduler.add_plugin(spy)
        cl.spy = spy  # type: ignore[attr-defined]
        yield cl


@pytest.fixture(scope="module")
def wide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6-24-16-3 regression, MSE, every neuron tracked, 30 Taylor rounds of 16 samples and
    30 probe snapshots of 40 points: each hidden layer's Jacobians alone outweigh any task,
    and the layer data (which grows with the samples) all results."""
    torch.manual_seed(7)
    X = torch.randn(160, 6)
    Y = torch.tanh(X[:, :3] * 2 + X[:, 3:])
    return record_run(mlp((6, 24, 16, 3), leaky=True), tmp_path_factory.mktemp("dask") /
                      "wide.zarr", "mse", X, Y, 60, 16,
                      Sampling(taylor_every=2, samples_per_round=16), lr=0.1, probe=X[:40],
                      probe_every=2)


@pytest.fixture
def one_thread() -> Any:
    """Torch on one thread here, as in the worker processes (distributed sets
    OMP_NUM_THREADS=1 there): the same BLAS reductions, so the same bits."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_cluster_matches_in_process_and_ships_no_trace_data(
        cluster: Any, wide: Path, monkeypatch: pytest.MonkeyPatch, one_thread: Any) -> None:
    monkeypatch.setattr(cluster_mod, "TASKS_PER_WORKER", 6)  # several blocks per layer
    # small blocks: several blocks of rounds, of snapshots and of units, cut into parts
    opts = AnalysisOptions(checkpoints=8, dynamic=True, block_bytes=1 << 16)
    ref = analyze_trace(wide, opts)
    spy = cluster.spy
    spy.spec.clear()
    spy.result.clear()
    got = analyze_trace(wide, replace(opts, workers=2), cluster=cluster)
    # network, layers and exploration bit for bit; neurons solved in smaller batches than in
    # process differ by an ulp where batched BLAS kernels reassociate
    same_results(ref, got, close="neuron_")
    assert {"network_optimum", "layer_optimum", "neuron_optimum", "neuron_best_response",
            "log_volume"} <= set(got.data_vars)
    # the work was cut: network, each layer, blocks of neurons, exploration parts
    keys = list(spy.spec)
    assert any("-network" in k for k in keys)
    assert sum("neurons-" in k for k in keys) > len(got.attrs["ntrace"]["layer_names"])
    for kernel in ("-distance-", "-switch-", "-volume-"):
        assert sum(kernel in k for k in keys) > 1, kernel
    # tasks carry descriptors only: each is smaller than one layer's Jacobians, and the
    # results are small too
    tr = open_trace(wide)
    jac = tr.read(f"layers/{list(tr.layers)[0]}/jacobian").nbytes
    assert jac > 2 * SPEC_LIMIT
    assert max(spy.spec.values()) < SPEC_LIMIT, max(spy.spec.items(), key=lambda kv: kv[1])
    data = sum(tr.zarr_array(p).nbytes for p in tr.layouts if p.startswith("layers/"))
    assert set(spy.result) == set(spy.spec)
    assert 0 < sum(spy.result.values()) < data / 2


def test_cross_entropy_box_a_file_url_and_a_zip(cluster: Any, mlp_ce: Path, tmp_path: Path,
                                               one_thread: Any) -> None:
    """Cross-entropy, tracked subsets, the box domain, read through a file:// URL and from
    a packed .zip."""
    opts = AnalysisOptions(domain="box", checkpoints=5)
    ref = analyze_trace(mlp_ce, opts)
    got = analyze_trace(mlp_ce.resolve().as_uri(), replace(opts, workers=2), cluster=cluster)
    same_results(ref, got)
    pack_trace(mlp_ce, tmp_path / "ce.zip")
    got = analyze_trace(tmp_path / "ce.zip", replace(opts, workers=2), cluster=cluster)
    same_results(ref, got)


def test_a_callers_client_runs_every_metric(cluster: Any, wide: Path,
                                            one_thread: Any) -> None:
    """A ``distributed.Client`` passed as it is: the same results, each exploration metric
    cut into parts (the one added as a plugin too, against its dense reference), and the
    client left open."""
    opts = AnalysisOptions(scales=("network",), checkpoints=2, block_bytes=1 << 16)
    ref = analyze_trace(wide, opts)
    cluster.spy.spec.clear()
    got = analyze_trace(wide, opts, cluster=cluster.client)
    same_results(ref, got)
    tr = open_trace(wide)
    A = unpack(tr.read("probe/config"), tr.probe_units.total)
    np.testing.assert_array_equal(got.changed_unit_fraction.values,
                                  changed_unit_fraction_dense(A))
    for metric in METRICS:
        assert sum(f"-{metric.name}-" in k for k in cluster.spy.spec) > 1, metric.name
    assert cluster.client.status == "running"


def test_cli_runs_on_a_scheduler_address(cluster: Any, wide: Path, tmp_path: Path) -> None:
    res = CliRunner().invoke(main, ["analyze", str(wide), "--out", str(tmp_path / "a"),
                                    "--scheduler", cluster.address, "--checkpoints", "6",
                                    "--scale", "layer,neuron", "--no-figures", "-q"])
    assert res.exit_code == 0, res.output
    ref = analyze_trace(wide, AnalysisOptions(checkpoints=6, scales=("layer", "neuron")))
    same_results(ref, open_results(tmp_path / "a" / "results.zarr"), close="")
    res = CliRunner().invoke(main, ["compare", str(wide), str(tmp_path / "a" / "results.zarr"),
                                    "--out", str(tmp_path / "c"), "--scheduler",
                                    cluster.address, "--checkpoints", "6", "--no-figures",
                                    "-q", "--no-exploration"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "c" / "results_0.zarr").exists()


def test_unreachable_scheduler_is_one_line(mlp_mse: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cluster_mod, "CONNECT_TIMEOUT", 1.0)
    res = CliRunner().invoke(main, ["analyze", str(mlp_mse), "--out", str(tmp_path / "a"),
                                    "--scheduler", "tcp://127.0.0.1:9", "--no-figures"])
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and "cannot reach the Dask scheduler at tcp://127.0.0.1:9" in lines[0]
    assert "Traceback" not in res.output


def test_options_and_locations() -> None:
    with pytest.raises(UsageError, match="mutually exclusive"):
        AnalysisOptions(scheduler="tcp://h:8786", workers=2)
    with pytest.raises(UsageError, match="positive number"):
        AnalysisOptions(workers=0)
    with pytest.raises(UsageError, match="address"):
        AnalysisOptions(scheduler=" ")
    assert AnalysisOptions(workers=2).distributed and not AnalysisOptions().distributed
    with pytest.raises(UsageError, match="this process only"):
        task_location("memory://run.zarr")
    assert task_location("s3://b/run.zarr") == "s3://b/run.zarr"
    assert Path(task_location("run.zarr")).is_absolute()


def test_missing_distributed_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "distributed", None)
    with pytest.raises(UsageError, match=r"pip install 'ntrace\[dask\]'"):
        Cluster(workers=1)


def test_split_plan_covers_every_neuron_once(wide: Path) -> None:
    tr = open_trace(wide)
    plan = make_plan(tr, AnalysisOptions(checkpoints=4))
    parts = split_plan(plan, 180, 12)
    for lp in plan.layers:
        got = np.concatenate([p.plan.layers[0].selected for p in parts
                              if p.plan.scales == ("neuron",) and p.plan.neuron_scale ==
                              (lp.name,)])
        np.testing.assert_array_equal(got, lp.selected)
    assert sorted(p.plan.layer_scale[0] for p in parts if p.plan.scales == ("layer",)) == \
        sorted(plan.layer_scale)
    assert sum(p.plan.scales == ("network",) for p in parts) == 1


@pytest.mark.parametrize("block", [1 << 16, 1 << 20])
def test_exploration_parts_combine_exactly(block: int) -> None:
    rng = np.random.default_rng(0)
    K, Q, M = 300, 40, 70
    A = rng.random((K, Q, M)) < 0.3
    A[1:] ^= rng.random((K - 1, Q, M)) < 0.05
    P = pack(A)

    def rows(k0: int, k1: int) -> np.ndarray:
        return P[k0:k1]

    def cols(b0: int, b1: int) -> np.ndarray:
        return P[:, :, b0:b1]

    r = distance_rows(Q * ((P.shape[2] + 7) // 8), K, block)
    cuts = list(range(0, K, r * 2)) + [K]
    whole = min_previous_distance(rows, K, block)
    parts = np.concatenate([min_previous_distance(rows, K, block, part=(a, b))
                            for a, b in zip(cuts[:-1], cuts[1:], strict=True)])
    np.testing.assert_array_equal(parts, whole)
    sw = sum(switch_counts(rows, K, block, part=p) for p in ((0, 1), (1, 97), (97, K)))
    np.testing.assert_array_equal(sw, (A[1:] != A[:-1]).sum(axis=(0, 2)))
    per = log_volume_bytes(K, Q, M, block)
    nb = P.shape[2]
    lv = log_volume(cols, K, Q, M, rank=8, block_bytes=block).value
    pieces = np.concatenate([log_volume(cols, K, Q, M, rank=8, block_bytes=block,
                                        part=(b0, min(b0 + per, nb))).value
                             for b0 in range(0, nb, per)])
    np.testing.assert_array_equal(pieces, lv)
    assert r > 1 and len(cuts) > 2
    with pytest.raises(UsageError, match="multiple"):
        min_previous_distance(rows, K, block, part=(1, K))
