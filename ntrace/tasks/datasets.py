"""Data set readers for the built-in tasks. Standard files only; nothing is unpickled.

Every reader returns ``(x, y)`` numpy arrays: ``x`` float32 scaled to [0, 1], ``y`` int64.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from pathlib import Path

import numpy as np

from ntrace.errors import DatasetError

GZIP_MAGIC = b"\x1f\x8b"
IDX_DTYPES: dict[int, str] = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4",
                              0x0E: ">f8"}


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8×8 digits: 1,797 images of 64 pixels (values 0–16)."""
    from sklearn.datasets import load_digits as _load

    d = _load()
    return (d.data / 16.0).astype(np.float32), d.target.astype(np.int64)


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read one IDX file (gzip-compressed or raw, told by its first bytes), checking its header
    against its size."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise DatasetError(f"cannot read IDX file {p}: {exc.strerror or exc}") from exc
    if raw[:2] == GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise DatasetError(f"cannot read IDX file {p}: the gzip stream is corrupt or "
                               f"truncated ({exc})") from exc
    elif p.suffix == ".gz":
        raise DatasetError(f"cannot read IDX file {p}: it is named .gz but is not "
                           "gzip-compressed")
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_DTYPES:
        raise DatasetError(f"{p} is not an IDX file (bad magic number); expected MNIST files "
                           "such as t10k-images-idx3-ubyte.gz")
    dtype = np.dtype(IDX_DTYPES[raw[2]])
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0:
        raise DatasetError(f"{p}: the IDX header declares 0 dimensions")
    if len(raw) < header:
        raise DatasetError(f"{p}: truncated IDX header ({len(raw)} bytes, {ndim} dimensions "
                           f"need {header})")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = header + math.prod(shape) * dtype.itemsize  # Python ints: no overflow
    if len(raw) != expected:
        raise DatasetError(f"{p}: IDX header promises shape {shape} ({expected} bytes) but the "
                           f"file holds {len(raw)} bytes; the file is truncated or corrupt")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(
        dtype.newbyteorder("="))


def _find(data_dir: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (data_dir / name).is_file():
            return data_dir / name
    return None


def has_mnist(data_dir: str | os.PathLike[str]) -> bool:
    """Whether ``data_dir`` holds the images :func:`load_mnist` reads (either split)."""
    d = Path(data_dir)
    return any(_find(d, f"{split}-images-idx3-ubyte") for split in ("train", "t10k"))


def load_mnist(data_dir: str | os.PathLike[str] | None) -> tuple[np.ndarray, np.ndarray]:
    """MNIST from standard IDX files in ``data_dir``: the training split when present,
    else the 10k test split. Images are flattened to 784 values in [0, 1]."""
    if data_dir is None:
        raise DatasetError("task needs MNIST: pass --data-dir DIR holding "
                           "train-images-idx3-ubyte(.gz) or t10k-images-idx3-ubyte(.gz)")
    d = Path(data_dir)
    if not d.is_dir():
        raise DatasetError(f"--data-dir {d} is not a directory")
    for split in ("train", "t10k"):
        img = _find(d, f"{split}-images-idx3-ubyte")
        lab = _find(d, f"{split}-labels-idx1-ubyte")
        if img is None:
            continue
        if lab is None:
            raise DatasetError(f"{d} has {img.name} but no {split}-labels-idx1-ubyte(.gz)")
        x, y = read_idx(img), read_idx(lab)
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise DatasetError(f"{d}: images {x.shape} and labels {y.shape} do not form an MNIST "
                               "split (expected (N, 28, 28) and (N,))")
        return (x.reshape(len(x), -1) / 255.0).astype(np.float32), y.astype(np.int64)
    raise DatasetError(f"no MNIST files in {d}: expected train-images-idx3-ubyte(.gz) or "
                       "t10k-images-idx3-ubyte(.gz) with the matching labels file")
