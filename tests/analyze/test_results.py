"""The results store: layer names as coordinates, (layer, index) pairs indexing neurons and
probe units, consolidated so that plain xarray opens it without warnings."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from ntrace.analyze import AnalysisOptions, analyze_trace, open_results
from ntrace.analyze.results import write_results


@pytest.fixture(scope="module")
def analysed(mlp_mse: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[xr.Dataset, Path]:
    out = tmp_path_factory.mktemp("results") / "res.zarr"
    ds = analyze_trace(mlp_mse, AnalysisOptions(checkpoints=4), out=out)
    return ds, out


def test_plain_xarray_opens_results_without_warnings(analysed: tuple[xr.Dataset, Path]
                                                     ) -> None:
    ds, out = analysed
    assert "consolidated_metadata" in json.loads((out / "zarr.json").read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plain = xr.open_zarr(out)
        tree = xr.open_datatree(out, engine="zarr")
    names = list(ds.attrs["ntrace"]["layer_names"])
    assert list(plain["layer"].values) == names == list(tree["layer"].values)
    second = names[1]
    np.testing.assert_array_equal(plain["layer_regret"].sel(layer=second),
                                  ds["layer_regret"].values[:, 1])
    assert set(plain["neuron_layer"].values) <= set(names)


def test_neurons_and_units_select_by_layer_name(analysed: tuple[xr.Dataset, Path]) -> None:
    ds, out = analysed
    for got in (ds, open_results(out)):
        names = list(got["layer"].values)
        layers = got["neuron_layer"].values
        for name in names:
            if (layers == name).any():
                sel = got["neuron_regret"].sel(neuron_layer=name)
                np.testing.assert_array_equal(sel.values,
                                              got["neuron_regret"].values[:, layers == name])
        first = got.sel(neuron_layer=names[0], neuron_index=0)["neuron_regret"]
        assert first.shape == (got.sizes["checkpoint"],)
        assert set(got["unit_layer"].values) <= set(names)
        per_unit = next(v for v in got.data_vars.values() if v.dims == ("unit",))
        unit = per_unit.sel(unit_layer=names[0])
        assert unit.size == int((got["unit_layer"].values == names[0]).sum()) > 0


def test_results_of_format_1_0_read_with_names(analysed: tuple[xr.Dataset, Path],
                                               tmp_path: Path) -> None:
    ds, _ = analysed
    names = list(ds.attrs["ntrace"]["layer_names"])
    old = ds.reset_index(["neuron", "unit"]).drop_vars(["neuron", "unit"], errors="ignore")
    pos = {n: i for i, n in enumerate(names)}
    old = old.assign_coords(
        layer=("layer", np.arange(len(names))),
        neuron_layer=("neuron", [pos[n] for n in old["neuron_layer"].values]),
        unit_layer=("unit", [pos[n] for n in old["unit_layer"].values]))
    old["unit_layer"].attrs["layer_names"] = names
    old.attrs["ntrace"] = {**old.attrs["ntrace"], "results_version": "1.0"}
    write_results(old, tmp_path / "old.zarr")
    back = open_results(tmp_path / "old.zarr")
    assert list(back["layer"].values) == names
    np.testing.assert_array_equal(back["neuron_layer"].values, ds["neuron_layer"].values)
    np.testing.assert_array_equal(back["unit_layer"].values, ds["unit_layer"].values)
