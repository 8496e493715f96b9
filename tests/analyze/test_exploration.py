"""Exploration measures on hand-made configurations with known answers, packed against
unpacked implementations, and on a recorded trace."""

from __future__ import annotations

import math

import numpy as np
import pytest
import xarray as xr

from ntrace.analyze import AnalysisOptions, analyze_trace, graph
from ntrace.analyze.exploration import (
    Configs,
    Probe,
    log_volume,
    log_volume_dense,
    min_previous_distance,
    min_previous_distance_dense,
    popcount,
    switch_fraction,
    switch_fraction_dense,
    to_words,
)
from ntrace.analyze.metrics import METRICS, Metric
from ntrace.analyze.metrics.changed import (
    ChangedUnits,
    changed_unit_fraction,
    changed_unit_fraction_dense,
    first_changes,
)
from ntrace.format.bits import pack, unpack
from ntrace.format.reader import open_trace


def _readers(A: np.ndarray):
    P = pack(A)  # (snapshot, probe, unit_byte)

    def rows(k0: int, k1: int) -> np.ndarray:
        return P[k0:k1]

    def cols(b0: int, b1: int) -> np.ndarray:
        return P[:, :, b0:b1]

    return rows, cols


def test_hand_made_configurations() -> None:
    # 4 snapshots, 2 probe points, 3 units
    A = np.array([
        [[1, 0, 0], [0, 1, 0]],
        [[1, 0, 0], [0, 1, 1]],  # one bit from snapshot 0
        [[0, 1, 1], [1, 0, 1]],  # 5 from snapshot 1, 6 from snapshot 0
        [[1, 0, 0], [0, 1, 0]],  # equal to snapshot 0
    ], dtype=bool)
    rows, cols = _readers(A)
    np.testing.assert_array_equal(min_previous_distance(rows, 4), [-1, 1, 5, 0])
    # probe 0 switches 0 + 3 + 3 bits, probe 1: 1 + 2 + 3; possible: 3 transitions × 3 units
    np.testing.assert_allclose(switch_fraction(rows, 4, 3), [6 / 9, 6 / 9])
    lv = log_volume(cols, 4, 2, 3, rank=50, floor=1e-6)
    assert lv.rank == 2
    # unit 0: columns (1,1,0,1) and (0,0,1,0): centred, the matrix has rank 1 and
    # σ_1 = √(2·(3·1/16 + 9/16)) = √(3/2)
    assert lv.value[0] == pytest.approx(0.5 * math.log(1.5) + math.log(1e-6))


def test_a_unit_that_never_switches_scores_the_floor() -> None:
    A = np.zeros((5, 4, 2), dtype=bool)
    A[:, 1, 0] = True  # constant in time: centred away
    A[2, 3, 1] = True
    rows, cols = _readers(A)
    lv = log_volume(cols, 5, 4, 2, rank=3, floor=1e-4)
    assert lv.value[0] == pytest.approx(3 * math.log(1e-4))
    assert lv.value[1] > 3 * math.log(1e-4)


@pytest.mark.parametrize("shape", [(7, 5, 3), (13, 9, 17), (33, 4, 70)])
def test_packed_and_unpacked_agree(shape: tuple[int, int, int]) -> None:
    rng = np.random.default_rng(sum(shape))
    A = rng.random(shape) < 0.3
    A[3] = A[1]  # a repeated configuration
    rows, cols = _readers(A)
    K, Q, M = shape
    for block in (64, 1 << 12, 1 << 20):  # tiny blocks exercise the blocked paths
        np.testing.assert_array_equal(min_previous_distance(rows, K, block),
                                      min_previous_distance_dense(A))
        np.testing.assert_allclose(switch_fraction(rows, K, M, block), switch_fraction_dense(A))
        lv = log_volume(cols, K, Q, M, rank=4, floor=1e-6, block_bytes=block)
        np.testing.assert_allclose(lv.value, log_volume_dense(A, rank=4, floor=1e-6),
                                   rtol=1e-9)


def test_popcount_table_equals_bitwise_count(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(1)
    w = to_words(rng.integers(0, 256, (6, 19), dtype=np.uint8))
    fast = popcount(w).astype(np.int64)
    monkeypatch.delattr(np, "bitwise_count", raising=False)
    np.testing.assert_array_equal(popcount(w).astype(np.int64), fast)
    ref = np.array([[bin(int(x)).count("1") for x in row] for row in w])
    np.testing.assert_array_equal(fast, ref)


def test_exploration_of_a_recorded_trace(mlp_mse) -> None:
    ds = analyze_trace(mlp_mse, AnalysisOptions(scales=("neuron",), checkpoints=2))
    tr = open_trace(mlp_mse)
    units = tr.probe_units.total
    A = unpack(tr.read("probe/config"), units)
    np.testing.assert_array_equal(ds.min_distance.values, min_previous_distance_dense(A))
    np.testing.assert_allclose(ds.switch_fraction.values, switch_fraction_dense(A))
    np.testing.assert_allclose(ds.log_volume.values, log_volume_dense(A), rtol=1e-9)
    np.testing.assert_array_equal(ds.snapshot_round.values, tr.read("probe/round_index"))
    assert (np.diff(ds.switch_fraction_sorted.values) <= 0).all()
    assert ds.attrs["ntrace"]["exploration"]["singular_value_floor"] == 1e-6


# -- (d) the fraction of units whose state has ever changed: the metric added as a plugin ----
def test_changed_units_hand_made() -> None:
    A = np.array([
        [[1, 0, 0], [0, 1, 0]],
        [[1, 0, 0], [0, 1, 1]],  # unit 2 changes (at probe point 1)
        [[0, 1, 1], [1, 0, 1]],  # units 0 and 1 too
        [[1, 0, 0], [0, 1, 0]],  # back to snapshot 0: they have still changed
    ], dtype=bool)
    rows, _ = _readers(A)
    np.testing.assert_array_equal(first_changes(rows, 4, 3), [2, 2, 1])
    np.testing.assert_allclose(changed_unit_fraction(rows, 4, 3), [0, 1 / 3, 1, 1])
    np.testing.assert_allclose(changed_unit_fraction_dense(A), [0, 1 / 3, 1, 1])


@pytest.mark.parametrize("shape", [(7, 5, 3), (13, 9, 17), (33, 4, 70)])
def test_changed_units_packed_parts_and_dense_agree(shape: tuple[int, int, int]) -> None:
    rng = np.random.default_rng(sum(shape) + 1)
    K, Q, M = shape
    first = rng.integers(1, K + 1, M)  # each unit's first change; K: it never changes
    first[0], first[-1] = K, 1
    A = np.repeat(rng.random((1, Q, M)) < 0.4, K, axis=0)
    for u in np.nonzero(first < K)[0]:
        A[first[u]:, rng.integers(Q), u] ^= True  # one probe point flips at first[u]
        A[first[u] + 1:, :, u] ^= rng.random((K - first[u] - 1, Q)) < 0.3  # then any
    rows, _ = _readers(A)
    dense = changed_unit_fraction_dense(A)
    np.testing.assert_array_equal(first_changes(rows, K, M), first)
    assert 0 < dense[-1] < 1
    probe = Probe(K, Q, M, (M + 7) // 8)
    metric = ChangedUnits()
    for block in (64, 1 << 12, 1 << 20):
        np.testing.assert_array_equal(changed_unit_fraction(rows, K, M, block), dense)
        opts = AnalysisOptions(block_bytes=max(block, 1 << 16))
        for tasks in (1, 3, 8):
            parts = metric.parts(probe, opts, tasks)
            assert parts[0][0] == 0 and parts[-1][1] == K and len(parts) == max(1, tasks // 2)
            got = [first_changes(rows, K, M, block, part=p) for p in parts]
            np.testing.assert_array_equal(metric.combine(probe, got, opts), dense)


def test_every_registered_metric_lands_in_the_results(mlp_mse) -> None:
    names = [m.name for m in METRICS]
    assert len(set(names)) == len(names) and "hindsight" not in names
    ds = analyze_trace(mlp_mse, AnalysisOptions(scales=("network",), checkpoints=2))
    tr = open_trace(mlp_mse)
    A = unpack(tr.read("probe/config"), tr.probe_units.total)
    np.testing.assert_array_equal(ds.changed_unit_fraction.values,
                                  changed_unit_fraction_dense(A))
    assert ds.changed_unit_fraction.dims == ("snapshot",)
    probe = Probe.of(tr)
    for m in METRICS:
        value = m.combine(probe, [m.compute(Configs.of(tr, probe.snapshots), probe, p,
                                            AnalysisOptions())
                                  for p in m.parts(probe, AnalysisOptions(), 1)],
                          AnalysisOptions())
        for k, v in m.variables(probe, value).items():
            np.testing.assert_array_equal(ds[k].values, v.values, err_msg=k)


class _Active(Metric):
    """A metric defined outside the package: per snapshot, the active states."""

    name = "active"

    def parts(self, probe, opts, tasks):
        return [(0, probe.snapshots)]

    def compute(self, configs, probe, part, opts):
        return popcount(to_words(configs.rows(*part))).sum(axis=(1, 2), dtype=np.int64)

    def combine(self, probe, results, opts):
        return np.concatenate(results)

    def variables(self, probe, value):
        return {"active_states": xr.Variable("snapshot", value)}


def test_a_registered_metric_needs_nothing_else(mlp_mse, monkeypatch: pytest.MonkeyPatch
                                                ) -> None:
    monkeypatch.setattr(graph, "METRICS", (*METRICS, _Active()))
    ds = analyze_trace(mlp_mse, AnalysisOptions(scales=("network",), checkpoints=2))
    tr = open_trace(mlp_mse)
    A = unpack(tr.read("probe/config"), tr.probe_units.total)
    np.testing.assert_array_equal(ds.active_states.values, A.sum(axis=(1, 2)))
    assert "changed_unit_fraction" in ds
