"""``engine="ntrace"``: committed rows, coordinates, unpacked states and attributes, lazily,
through the guarded store; every value checked against ``Trace.read`` and ``bits.unpack``."""

from __future__ import annotations

import os
import shutil
import sys
import tomllib
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
from torch import nn

from ntrace.errors import InvalidTraceError
from ntrace.format.bits import unpack
from ntrace.format.metadata import Sampling
from ntrace.format.pack import pack_trace
from ntrace.format.reader import open_trace
from ntrace.format.xarray_backend import NtraceBackendEntrypoint, unit_axes
from ntrace.recording import record

from .conftest import chunk_keys

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "spec" / "examples" / "valid"
RUNNING = EXAMPLES / "running-uncommitted-rows.zarr"
ARCHIVES = sorted((REPO / "tests" / "data" / "archives").glob("format-*.zarr"))


@pytest.fixture(scope="module")
def engine() -> Iterator[str]:
    """``engine="ntrace"`` as an installed ntrace provides it: a distribution whose entry
    points are this checkout's pyproject ``xarray.backends`` table (the test environment's
    install may predate it)."""
    from xarray.backends.plugins import refresh_engines

    table = tomllib.loads((REPO / "pyproject.toml").read_text())
    eps = table["project"]["entry-points"]["xarray.backends"]
    assert eps == {"ntrace": "ntrace.format.xarray_backend:NtraceBackendEntrypoint"}
    site = Path(os.environ.get("TMPDIR", "/tmp")) / f"ntrace-ep-{os.getpid()}"
    info = site / "ntrace_backend_probe-0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: ntrace-backend-probe\n"
                                   "Version: 0\n")
    (info / "entry_points.txt").write_text(
        "[xarray.backends]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()))
    sys.path.insert(0, str(site))
    refresh_engines()
    try:
        yield "ntrace"
    finally:
        sys.path.remove(str(site))
        shutil.rmtree(site, ignore_errors=True)
        refresh_engines()


def _expected(tr, path: str) -> np.ndarray:  # noqa: ANN001 - a Trace
    raw = tr.read(path)
    axes = unit_axes(tr, path)
    if axes is None:
        return raw
    return unpack(raw, int(np.prod(axes[1]))).reshape(*raw.shape[:-1], *axes[1])


def _variable(tree: xr.DataTree, path: str) -> xr.DataArray:
    group, _, name = path.rpartition("/")
    ds = tree[group].to_dataset() if group else tree.to_dataset()
    if name in ds.data_vars:
        return ds[name]
    return ds["tracked_neuron" if name == "tracked" else "round"]


def _assert_matches_the_reader(location: Path, tree: xr.DataTree) -> None:
    with open_trace(location) as tr:
        for path in tr.layouts:
            got = _variable(tree, path)
            np.testing.assert_array_equal(got.values, _expected(tr, path), err_msg=path)
            if path.rpartition("/")[2] not in ("tracked", "round_index"):
                assert got.attrs["long_name"] and got.attrs["description"], path


@pytest.mark.parametrize("location", [*ARCHIVES, *sorted(EXAMPLES.glob("*.zarr"))],
                         ids=lambda p: p.name)
def test_every_array_reads_as_the_reader_reads_it(location: Path, engine: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tree = xr.open_datatree(location, engine=engine)
    _assert_matches_the_reader(location, tree)


def test_a_running_trace_shows_only_committed_rows(engine: str) -> None:
    tree = xr.open_datatree(RUNNING, engine=engine)
    plain = xr.open_datatree(RUNNING, engine="zarr", consolidated=False)
    with open_trace(RUNNING) as tr:
        assert tr.attrs.status == "running"
        assert tree["/"].sizes["round"] == tr.rounds < plain["/"].sizes["round"]
        assert tree["taylor"].sizes["taylor_round"] == tr.taylor_rounds
        assert tree["probe"].sizes["snapshot"] == tr.snapshots


def test_opening_reads_metadata_only(ae_trace: Path, engine: str,
                                     store_reads: list[str]) -> None:
    tree = xr.open_datatree(ae_trace, engine=engine)
    ds = xr.open_dataset(ae_trace, engine=engine, group="layers/fc2", chunks={})
    assert store_reads and chunk_keys(store_reads) == []
    store_reads.clear()
    mask = tree["layers/fc1"]["mask"].isel(taylor_round=4, sample=0).values
    assert mask.dtype == bool and mask.shape == (50,)
    assert {k.rsplit("/c/", 1)[0] for k in chunk_keys(store_reads)} == {"layers/fc1/mask"}
    assert ds["mask"].chunks is not None  # dask-backed on request
    store_reads.clear()
    ds["mask"].isel(taylor_round=1).sum().compute()  # with its lazy coordinate, round
    read = {k.rsplit("/c/", 1)[0] for k in chunk_keys(store_reads)}
    assert read == {"layers/fc2/mask", "taylor/round_index"}


def test_coordinates_and_attributes(ae_trace: Path, engine: str) -> None:
    tree = xr.open_datatree(ae_trace, engine=engine)
    taylor = tree["taylor"].to_dataset()
    with open_trace(ae_trace) as tr:
        rounds = tr.read("taylor/round_index")
        tracked = tr.read("layers/fc2/tracked")
        config = unpack(tr.read("probe/config"), tr.probe_units.total)
        offset = tr.probe_units.offsets()[tr.probe_units.layers.index("fc2")]
    assert "round_index" not in taylor and list(taylor["round"].values) == list(rounds)
    picked = taylor.set_xindex("round").sel(round=int(rounds[3]))
    np.testing.assert_array_equal(picked["sample_loss"], taylor["sample_loss"][3])
    fc2 = tree["layers/fc2"].to_dataset()
    assert fc2["layer"].item() == "fc2"
    assert list(fc2["tracked_neuron"].values) == list(tracked)
    assert list(fc2["round"].values) == list(rounds)  # every taylor_round axis has rounds
    assert fc2["mask"].dims == ("taylor_round", "sample", "neuron")
    probe = tree["probe"].to_dataset()
    got = probe["config"].sel(layer="fc2")
    np.testing.assert_array_equal(got.values, config[..., offset:offset + 30])
    assert probe["round"].dims == ("snapshot",)
    assert tree["/"]["loss"].attrs["units"] == "1"
    assert "checkpoints" not in tree.children
    with_ck = xr.open_datatree(ae_trace, engine=engine, checkpoints=True)
    assert "checkpoints" in with_ck.children and with_ck["checkpoints"].children


def test_one_group_and_a_packed_trace(ae_trace: Path, engine: str, tmp_path: Path) -> None:
    zipped = tmp_path / "ae.zip"
    pack_trace(ae_trace, zipped)
    backend = NtraceBackendEntrypoint()
    assert backend.guess_can_open(ae_trace) and backend.guess_can_open(zipped)
    assert not backend.guess_can_open(tmp_path) and not backend.guess_can_open(REPO / "README.md")
    tree = xr.open_datatree(zipped, engine=engine)
    _assert_matches_the_reader(zipped, tree)
    ds = xr.open_dataset(zipped, engine=engine, group="/layers/fc3")
    assert ds["weight"].shape == (20, 20, 30)
    ds.close()
    with pytest.raises(Exception, match="no group 'nope'"):
        xr.open_dataset(zipped, engine=engine, group="nope")


def test_the_guarded_store_stays_in_force(ae_trace: Path, engine: str, tmp_path: Path) -> None:
    t = tmp_path / "linked.zarr"
    shutil.copytree(ae_trace, t)
    chunk = next((t / "layers" / "fc1" / "weight" / "c").rglob("*"))
    while chunk.is_dir():
        chunk = next(chunk.iterdir())
    chunk.unlink()
    chunk.symlink_to(ae_trace / "loss" / "zarr.json")
    tree = xr.open_datatree(t, engine=engine)  # metadata only: fine
    with pytest.raises(InvalidTraceError, match="symbolic link"):
        tree["layers/fc1"]["weight"].values  # noqa: B018


def _conv_model() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(8, 3))


def test_conv_masks_and_module_states_unpack_to_their_axes(tmp_path: Path,
                                                          engine: str) -> None:
    torch.manual_seed(0)
    model = _conv_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(16, 1, 4, 4), torch.randint(0, 3, (16,))
    out_path = tmp_path / "conv.zarr"
    with record(model, out_path, loss="cross_entropy", optimizer=opt,
                sampling=Sampling(taylor_every=1, samples_per_round=4), probe=x[:6],
                probe_index=range(6), probe_every=2, expected_rounds=4) as rec:
        for n in range(4):
            out = model(x[n * 4:n * 4 + 4])
            loss = nn.functional.cross_entropy(out, y[n * 4:n * 4 + 4])
            rec.step(loss, out, y[n * 4:n * 4 + 4], indices=torch.arange(n * 4, n * 4 + 4))
            opt.zero_grad()
            loss.backward()
            opt.step()
    tree = xr.open_datatree(out_path, engine=engine)
    _assert_matches_the_reader(out_path, tree)
    conv = next(iter(tree["layers"].children.values())).to_dataset()
    assert conv["mask"].dims == ("taylor_round", "sample", "neuron", "y0", "y1")
    assert conv["mask"].shape[2:] == (2, 4, 4)
    pool = next(iter(tree["modules"].children.values())).to_dataset()
    assert pool["state"].dims == ("taylor_round", "sample", "in_channel", "x0", "x1")
    corner = pool["state"].isel(in_channel=1, x0=slice(1, 3), x1=[0, 3])
    full = pool["state"].values[:, :, 1, 1:3][..., [0, 3]]
    np.testing.assert_array_equal(corner.values, full)


def test_the_readme_example_runs(ae_trace: Path, engine: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import torch

    from ntrace.analyze.taylor import taylor_loss

    text = (REPO / "README.md").read_text()
    section = text[text.index("## Working with traces in xarray"):]
    start = section.index("```python\n") + 10
    code = section[start:section.index("\n```", start)]
    assert 5 <= len([line for line in code.splitlines() if line.strip()]) <= 10
    scope: dict[str, object] = {}
    exec(code.replace('"run.zarr"', repr(str(ae_trace))), scope)  # noqa: S102
    with open_trace(ae_trace) as tr:
        t = list(tr.read("taylor/round_index")).index(30)
        w = torch.as_tensor(tr.read("layers/fc2/weight", t), dtype=torch.float64)
        b = torch.as_tensor(tr.read("layers/fc2/bias", t), dtype=torch.float64)
        want = float(taylor_loss(tr, t, {"fc2": (w, b + 0.01)}))
        mask = unpack(tr.read("layers/fc2/mask", t), 30).mean(axis=0)
    assert float(scope["taylor_loss"]) == pytest.approx(want, rel=1e-5)
    np.testing.assert_allclose(scope["on"].values, mask)


def test_urls_open_through_fsspec(engine: str, tmp_path: Path) -> None:
    fsspec = pytest.importorskip("fsspec")
    tiny = EXAMPLES / "tiny-mlp.zarr"
    pack_trace(tiny, tmp_path / "tiny.zip")
    fs = fsspec.filesystem("memory")
    root = f"/xr-{os.getpid()}"
    fs.put(str(tiny), f"{root}/tiny.zarr", recursive=True)
    fs.put(str(tmp_path / "tiny.zip"), f"{root}/tiny.zip")
    try:
        for name in ("tiny.zarr", "tiny.zip"):
            tree = xr.open_datatree(f"memory://{root}/{name}", engine=engine)
            _assert_matches_the_reader(tiny, tree)
            tree.close()
        tree = xr.open_datatree(f"file://{tmp_path / 'tiny.zip'}", engine=engine)
        assert tree["/"].sizes["round"] == 12
    finally:
        fs.rm(root, recursive=True)


def test_every_array_the_layout_declares_is_described() -> None:
    """One table of variable attributes: an array added to the layout without an entry in
    ``VARIABLES`` would open without long_name/units (as ``gradient_error`` did at first)."""
    import ast

    from ntrace.format import layout
    from ntrace.format.variables import VARIABLES

    tree = ast.parse(Path(layout.__file__).read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "ArrayLayout":
            first = node.args[0]
            parts = first.values if isinstance(first, ast.JoinedStr) else [first]
            last = parts[-1]
            assert isinstance(last, ast.Constant), ast.dump(first)
            names.add(str(last.value).rpartition("/")[2])
    assert len(names) >= 15, names
    assert names - set(VARIABLES) == set()
