"""Every benchmark in one run, one table of ratios (not a test).

    python tools/bench.py [--data-dir ../shared/data] [--quick] [--readme]

Each row compares ntrace with the obvious alternative measured in this same run:

- recording overhead, MLP and convnet (and again on CUDA when a GPU is present): training
  with recording ÷ without, median round and whole loop (tools/bench_record.py);
- bytes on disk per round against the raw arrays and against materialising G = J ⊗ x;
  bits per activation (packed, compressed);
- hindsight Taylor optima against scipy one neuron at a time; packed Hamming/switch kernels
  against numpy on unpacked bools (tools/bench_analyze.py);
- bytes read when opening a trace (ntrace and plain xarray) against its size;
- analysis on a 2-worker Dask LocalCluster against in-process (tools/bench_dask.py).

``--readme`` rewrites the generated part of README.md's performance section (between the
``bench.py`` markers) with the table and the machine it was measured on. The default plan
takes about 10–15 minutes on 2 CPU cores; ``--quick`` about a third of that.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_analyze  # noqa: E402
import bench_record  # noqa: E402

from ntrace.format.reader import Trace, open_trace  # noqa: E402
from ntrace.format.summary import dir_bytes  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data"
BEGIN, END = "<!-- bench.py: begin -->", "<!-- bench.py: end -->"


@dataclass
class Row:
    """One line of the table: what was measured, the alternative's figure, ntrace's, the
    ratio (alternative ÷ ntrace for costs ntrace saves, ntrace ÷ alternative for overheads,
    as ``ratio_label`` says) and a note."""

    group: str
    measure: str
    alternative: str
    ntrace: str
    ratio: float | None
    ratio_label: str
    note: str = ""


def machine() -> str:
    """The machine, in words: CPU model and cores, GPU when present, library versions."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    words = f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()}"
    words += " threads)"
    if torch.cuda.is_available():
        words += f"; GPU {torch.cuda.get_device_name(0)}"
    import zarr

    return words + f"; zarr {zarr.__version__}; Python {platform.python_version()}"


def materialised_g_bytes(tr: Trace) -> float:
    """Bytes of G = J ⊗ x (float32) per training round if stored instead of its factors:
    per Taylor round, sample, output and tracked neuron, one entry per parameter of that
    neuron's row (weights and bias)."""
    per_taylor = 0.0
    S, p = tr.attrs.sampling.samples_per_round, tr.attrs.output_size
    for name, la in tr.layers.items():
        geo = la.shape
        row = int(np.prod(geo.weight_shape)) // geo.output_shape[0] + int(la.bias)
        per_taylor += 4.0 * S * p * len(tr.tracked[name]) * row
    return per_taylor * tr.taylor_rounds / max(tr.rounds, 1)


def record_rows(task: str, label: str, tmp: Path, data_dir: str | None, steps: int,
                repeats: int, device: str) -> tuple[list[Row], Path]:
    """Overhead and storage rows of one task at its default sampling."""
    tmp.mkdir(parents=True, exist_ok=True)
    r = bench_record.measure(task, tmp, data_dir=data_dir, steps=steps, paper_steps=0,
                             repeats=repeats, device=device)[0]
    where = f"{task}, {device}, {r['rounds']} rounds × {repeats}"
    sampling = f"Taylor data every {r['taylor_every']} rounds on {r['samples']} samples"
    rows = [
        Row("record", f"overhead {label}: median round", f"{r['plain_ms']:.2f} ms plain",
            f"{r['rec_ms']:.2f} ms", r["median_ratio"], "recorded ÷ plain", f"{where}; {sampling}"),
        Row("record", f"overhead {label}: whole loop", "plain loop", "create + record + close",
            r["total_ratio"], "recorded ÷ plain", "trace creation, writer drain and close "
            "included"),
    ]
    tr = open_trace(r["trace"])
    g = materialised_g_bytes(tr)
    disk = r["bytes_per_round"]
    rows += [
        Row("storage", f"disk per round {label} vs raw arrays",
            f"{r['raw_per_round'] / 1e3:.1f} kB", f"{disk / 1e3:.1f} kB",
            r["raw_per_round"] / disk, "raw ÷ disk",
            "blosc zstd + bitshuffle, activations bit-packed"),
        Row("storage", f"disk per round {label} vs materialised G = J ⊗ x",
            f"{g / 1e3:.1f} kB", f"{disk / 1e3:.1f} kB", g / disk, "G ÷ disk",
            "G of the tracked neurons in float32, per training round"),
        Row("storage", f"bits per activation {label}", "1 bit packed, 8 as bool",
            f"{r['bits_per_activation']:.3f} bits", 1.0 / max(r["bits_per_activation"], 1e-9),
            "1 bit ÷ ntrace", "activation states (masks, pooling winners, probe configs)"),
    ]
    return rows, Path(r["trace"])


@contextlib.contextmanager
def counted_reads() -> Iterator[list[int]]:
    """Bytes returned by every read of a trace directory while the context is open: ntrace
    reads through its own store (TraceDirStore), plain xarray through zarr's LocalStore."""
    import zarr.storage

    from ntrace.format.files import TraceDirStore

    sizes: list[int] = []
    originals = {cls: cls.__dict__["get"] for cls in (zarr.storage.LocalStore, TraceDirStore)}

    def counted(original: Any) -> Any:
        async def counting(self: Any, key: str, *args: Any, **kwargs: Any) -> Any:
            buf = await original(self, key, *args, **kwargs)
            if buf is not None:
                sizes.append(len(buf.to_bytes()))
            return buf
        return counting

    for cls, original in originals.items():
        cls.get = counted(original)  # type: ignore[method-assign]
    try:
        yield sizes
    finally:
        for cls, original in originals.items():
            cls.get = original  # type: ignore[method-assign]


def open_rows(path: Path) -> list[Row]:
    """Bytes read to open a trace (ntrace, then plain xarray's lazy DataTree) vs its size."""
    import xarray as xr

    size = dir_bytes(path)
    with counted_reads() as sizes:
        tr = open_trace(path)
        _ = tr.attrs, tr.layers
    ours = sum(sizes)
    with counted_reads() as sizes:
        tree = xr.open_datatree(path, engine="zarr")
        _ = list(tree.subtree)
    plain = sum(sizes)
    with counted_reads() as sizes:
        name = next(iter(tr.layers))
        tr.read(f"layers/{name}/weight", tr.taylor_rounds // 2)
    row_read = sum(sizes)
    mb = f"{size / 1e6:.1f} MB"
    return [
        Row("open", "bytes read by open_trace vs trace size", mb, f"{ours / 1e3:.1f} kB",
            size / ours, "size ÷ read", f"{path.name}: metadata documents only"),
        Row("open", "bytes read by xarray.open_datatree vs trace size", mb,
            f"{plain / 1e3:.1f} kB", size / plain, "size ÷ read", "plain xarray, lazy"),
        Row("open", "bytes read for one layer's weights of one round", mb,
            f"{row_read / 1e3:.1f} kB", size / max(row_read, 1), "size ÷ read",
            "one chunk (and its metadata)"),
    ]


def analyze_rows(steps: int, snapshots: int, scipy_iter: int) -> list[Row]:
    out = []
    for name, ref, mine, note in bench_analyze.measure(steps, torch.device("cpu"), snapshots,
                                                       scipy_iter):
        out.append(Row("analyze", name, f"{ref:.2f} s", f"{mine:.3f} s", ref / mine,
                       "alternative ÷ ntrace", note))
    return out


def dask_rows(quick: bool) -> list[Row]:
    """One row from tools/bench_dask.py: the same analysis in process and on a 2-worker
    LocalCluster, with how far the results differ."""
    try:
        import bench_dask  # type: ignore[import-not-found]
    except ImportError as exc:  # dask not installed: say so instead of failing the table
        return [Row("dask", "analysis, 2-worker LocalCluster vs in process", "—", "—", None,
                    "", f"not run: {exc}")]
    by = {d["name"]: d for d in bench_dask.run(quick)}
    local, dask = by["dask analyze: in process"], by["dask analyze: 2-worker LocalCluster"]
    one = by.get("dask analyze: in process, 1 thread")
    start = by["dask analyze: LocalCluster start"]["value"]
    diff = by["dask analyze: largest difference"]["value"]
    outside = by["dask analyze: optima outside their gaps"]["value"]
    note = (f"{local['note']}; cluster start {start} s (excluded); largest difference "
            f"{diff:.1e}, {outside} optima outside their certified gaps")
    if one is not None:
        note += f"; in process on 1 thread {one['value']} s"
    return [Row("dask", "analysis, 2-worker LocalCluster vs in process",
                f"{local['value']} s", f"{dask['value']} s", local["value"] / dask["value"],
                "in process ÷ cluster", note)]


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def markdown(rows: list[Row], seconds: float, where: str, command: str) -> str:
    lines = [f"Measured by `{command}` in {seconds / 60:.1f} min on: {where}.", "",
             "| | measure | alternative | ntrace | ratio | |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        ratio = "—" if r.ratio is None else f"**{r.ratio:,.2f}×** {r.ratio_label}"
        cells = [r.group, r.measure, r.alternative, r.ntrace, ratio, r.note]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines)


def update_readme(table: str, readme: Path) -> None:
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"bench: {readme} has no '{BEGIN}' … '{END}' markers; add them to the "
                         "performance section")
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    readme.write_text(pattern.sub(lambda _: f"{BEGIN}\n{table}\n{END}", text))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=str(DEFAULT_DATA),
                    help="folder with mnist/ and cifar10/ (default ../shared/data); without "
                         "them the MLP is the digits autoencoder and the convnet is skipped")
    ap.add_argument("--quick", action="store_true", help="fewer rounds and repeats")
    ap.add_argument("--readme", action="store_true", help="write the table into README.md")
    args = ap.parse_args()
    t0 = time.perf_counter()
    data = Path(args.data_dir)
    mnist = data / "mnist" if (data / "mnist").is_dir() else None
    cifar = data / "cifar10" if (data / "cifar10").is_dir() else None
    q = args.quick
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows: list[Row] = []
    steps: list[tuple[str, Callable[[], list[Row]]]] = []
    tmp = Path(tempfile.mkdtemp(prefix="ntrace-bench-"))
    kept: dict[str, Path] = {}

    def recorder(task: str, label: str, d: str | None, n: int, rep: int, dev: str
                 ) -> Callable[[], list[Row]]:
        def go() -> list[Row]:
            out, path = record_rows(task, label, tmp / f"{dev}-{label}", d, n, rep, dev)
            kept.setdefault(label, path)
            return out
        return go

    mlp = ("mnist-autoencoder", str(mnist)) if mnist else ("digits-autoencoder", None)
    for dev in devices:
        steps.append((f"record MLP ({dev})", recorder(mlp[0], "MLP", mlp[1], 200 if q else 600,
                                                      1 if q else 2, dev)))
        if cifar:
            steps.append((f"record convnet ({dev})",
                          recorder("cifar10-convnet", "convnet", str(cifar), 20 if q else 40,
                                   1 if q else 2, dev)))
    steps.append(("open a trace", lambda: open_rows(kept["MLP"])))
    steps.append(("analysis kernels", lambda: analyze_rows(200 if q else 400, 200 if q else 400,
                                                           1000 if q else 3000)))
    steps.append(("dask", lambda: dask_rows(q)))
    try:
        for k, (title, fn) in enumerate(steps, 1):
            t = time.perf_counter()
            print(f"[{k}/{len(steps)}] {title} …", flush=True)
            got = fn()
            rows += got
            print(f"[{k}/{len(steps)}] {title}: {len(got)} rows in {time.perf_counter() - t:.0f} s",
                  flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    command = "python tools/bench.py" + (" --quick" if q else "")
    table = markdown(rows, time.perf_counter() - t0, machine(), command)
    print("\n" + table)
    if args.readme:
        update_readme(table, ROOT / "README.md")
        print(f"\nwrote the table into {ROOT / 'README.md'}")


if __name__ == "__main__":
    main()
