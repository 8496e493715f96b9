"""Opening a trace reads metadata only; a row read touches only its chunks; plain xarray
opens a trace without ntrace."""

from __future__ import annotations

import warnings
from pathlib import Path

import xarray as xr

from ntrace.format.metadata import FORMAT_VERSION
from ntrace.format.reader import open_trace

from .conftest import chunk_keys


def test_open_reads_metadata_only(ae_trace: Path, store_reads: list[str]) -> None:
    tr = open_trace(ae_trace)
    assert store_reads, "the counting store saw no reads"
    assert chunk_keys(store_reads) == []
    assert tr.taylor_rounds == 20


def test_a_row_reads_only_its_chunks(ae_trace: Path, store_reads: list[str]) -> None:
    tr = open_trace(ae_trace)
    store_reads.clear()
    tr.read("layers/fc3/jacobian", 13)
    chunks = chunk_keys(store_reads)
    assert len(chunks) == 1 and chunks[0].startswith("layers/fc3/jacobian/c/")


def test_plain_xarray_opens_a_finished_trace(ae_trace: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no consolidated-metadata fallback warning
        tree = xr.open_datatree(ae_trace, engine="zarr")
    ds = tree["layers/fc2"].to_dataset()
    assert ds["jacobian"].dims == ("taylor_round", "sample", "output_unit", "tracked")
    assert ds.sizes["taylor_round"] == 20 and ds.sizes["tracked"] == 30
    assert tree.attrs["ntrace"]["format_version"] == FORMAT_VERSION
    # format 1.3: CF attributes and round_index as a coordinate (spec 'Variable attributes')
    taylor = tree["taylor"].to_dataset()
    assert "round_index" in taylor.coords and taylor["sample_loss"].dims[0] == "taylor_round"
    assert "round_index" in tree["probe"].to_dataset().coords
    assert ds["weight"].attrs["long_name"] == "weight" and ds["weight"].attrs["units"] == "1"
    assert tree["/"]["loss"].attrs["long_name"] == "training loss"
    assert "units" not in ds["mask"].attrs and ds["mask"].attrs["long_name"]


def test_lazy_xarray_views_are_cut_to_the_commit(ae_trace: Path,
                                                 store_reads: list[str]) -> None:
    tr = open_trace(ae_trace)
    tree = tr.datatree()
    store_reads.clear()
    w = tree["layers/fc1"]["weight"].isel(taylor_round=4).values
    assert w.shape == (50, 64)
    assert all(k.startswith("layers/fc1/weight/") for k in chunk_keys(store_reads))
