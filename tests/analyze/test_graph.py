"""The analysis graph: one set of tasks whatever runs it. In process the plan is one task
(one pass over the rounds) and each metric one part; cut into many parts, the same tasks run
by the in-process scheduler combine into the same results (what the Dask path relies on)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ntrace.analyze import AnalysisOptions, analyze_trace, graph
from ntrace.analyze.assemble import build_dataset
from ntrace.analyze.metrics import METRICS
from ntrace.analyze.plan import make_plan
from ntrace.analyze.run import explore
from ntrace.format.reader import open_trace

from .conftest import same_results


def _results(path: Path, opts: AnalysisOptions, tasks: int) -> tuple[object, graph.Graph]:
    trace = open_trace(path)
    plan = make_plan(trace, opts)
    g = graph.build_graph(trace, plan, opts, tasks)
    hs, expl = g.combine(trace, graph.run_here(trace, g, opts.progress))
    assert hs is not None
    return build_dataset(trace, plan, opts, hs, expl, []), g


def test_in_process_one_hindsight_task_and_one_part_per_metric(mlp_mse: Path) -> None:
    opts = AnalysisOptions(checkpoints=3)
    ds, g = _results(mlp_mse, opts, 1)
    assert [t.group for t in g.tasks] == ["hindsight"] + [m.name for m in METRICS]
    assert g.tasks[0].args[0].plan is g.plan  # the whole plan, one pass over the rounds
    assert g.tasks[0].args[0].layout is None  # read in the blocks of its own (whole) plan
    same_results(analyze_trace(mlp_mse, opts), ds)


@pytest.mark.parametrize("fixture", ["mlp_mse", "mlp_ce"])
def test_many_parts_run_here_combine_into_the_same_results(
        fixture: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    path = request.getfixturevalue(fixture)
    monkeypatch.setattr(graph, "MIN_NEURON_BLOCK", 1)  # tiny layers cut into blocks too
    opts = AnalysisOptions(checkpoints=4, dynamic=True, block_bytes=1 << 16)
    whole, _ = _results(path, opts, 1)
    cut, g = _results(path, opts, 8)
    groups = [t.group for t in g.tasks]
    labels = [t.label for t in g.tasks]
    assert groups.count("hindsight") > 2 and any(lab.startswith("layer ") for lab in labels)
    assert groups.count("switch") > 1 and groups.count("changed") > 1
    if fixture == "mlp_mse":  # every neuron tracked: the network too, neuron blocks, and
        # snapshots enough for two blocks of the distance pass
        assert "network" in labels and sum(lab.startswith("neurons ") for lab in labels) > 3
        assert groups.count("distance") > 1
    # network, layers and exploration bit for bit; neurons solved in other batches within
    # their certified gaps
    same_results(whole, cut, close="neuron_")


def test_explore_is_the_exploration_of_an_analysis(mlp_ce: Path) -> None:
    ds = analyze_trace(mlp_ce, AnalysisOptions(scales=("layer",), checkpoints=2))
    e = explore(open_trace(mlp_ce), AnalysisOptions(exploration=False))
    assert e is not None
    data, coords, attrs = e.variables()
    for k, v in {**data, **coords}.items():
        np.testing.assert_array_equal(ds[k].values, v.values, err_msg=k)
    assert attrs == ds.attrs["ntrace"]["exploration"]
    assert set(data) == {k for k in ds.data_vars if ds[k].dims[0] in
                         ("snapshot", "probe", "unit", "probe_rank", "unit_rank")}
