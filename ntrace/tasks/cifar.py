"""CIFAR-10 readers: the binary distribution or an ``.npz``; never Python pickles.

Both return ``x`` float32 of shape (N, 3, 32, 32) scaled to [0, 1] and ``y`` int64.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ntrace.errors import DatasetError

RECORD = 1 + 3 * 32 * 32  # label byte, then 1024 R, 1024 G, 1024 B bytes
BINARY_FILES = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]


def _from_binary(files: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for f in files:
        raw = np.fromfile(f, dtype=np.uint8)
        if raw.size == 0 or raw.size % RECORD:
            raise DatasetError(f"{f}: {raw.size} bytes is not a whole number of CIFAR-10 "
                               f"records of {RECORD} bytes; the file is truncated or not CIFAR-10")
        rec = raw.reshape(-1, RECORD)
        ys.append(rec[:, 0].astype(np.int64))
        xs.append(rec[:, 1:].reshape(-1, 3, 32, 32))
    y = np.concatenate(ys)
    if y.max() > 9:
        raise DatasetError(f"{files[0].parent}: labels above 9; these are not CIFAR-10 files")
    return np.concatenate(xs), y


def _from_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as d:
            if "x" not in d or "y" not in d:
                raise DatasetError(f"{path}: expected arrays 'x' (N, 32, 32, 3) and 'y' (N,), "
                                   f"found {sorted(d.files)}")
            x, y = d["x"], d["y"]
    except (OSError, ValueError) as exc:
        raise DatasetError(f"cannot read {path}: {exc}") from exc
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (32, 32, 3) or y.shape != (len(x),):
        raise DatasetError(f"{path}: x must be uint8 (N, 32, 32, 3) and y (N,), found x "
                           f"{x.dtype} {x.shape} and y {y.shape}")
    if len(y) and (y.min() < 0 or y.max() > 9):
        raise DatasetError(f"{path}: labels outside 0..9")
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2)), y.astype(np.int64)


def has_cifar10(data_dir: str | os.PathLike[str]) -> bool:
    """Whether ``data_dir`` holds files :func:`load_cifar10` reads (binary batches, directly
    or in ``cifar-10-batches-bin/``, or an ``.npz``)."""
    d = Path(data_dir)
    return any((base / f).is_file() for base in (d, d / "cifar-10-batches-bin")
               for f in BINARY_FILES) or any(d.glob("*.npz"))


def load_cifar10(data_dir: str | os.PathLike[str] | None) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10 from ``data_dir``: the binary batches (``data_batch_*.bin``, also inside
    ``cifar-10-batches-bin/``) or a single ``.npz`` holding ``x`` (uint8 NHWC) and ``y``."""
    if data_dir is None:
        raise DatasetError("task needs CIFAR-10: pass --data-dir DIR holding the binary "
                           "distribution (data_batch_1.bin, ...) or an .npz with x and y")
    d = Path(data_dir)
    if not d.is_dir():
        raise DatasetError(f"--data-dir {d} is not a directory")
    for base in (d, d / "cifar-10-batches-bin"):
        files = [base / f for f in BINARY_FILES if (base / f).is_file()]
        if files:
            x, y = _from_binary(files)
            break
    else:
        npz = sorted(d.glob("*.npz"))
        if not npz:
            raise DatasetError(f"no CIFAR-10 files in {d}: expected data_batch_*.bin or an .npz")
        if len(npz) > 1:
            raise DatasetError(f"{d} holds several .npz files ({', '.join(p.name for p in npz)}); "
                               "point --data-dir at a directory with exactly one")
        x, y = _from_npz(npz[0])
    return (x / 255.0).astype(np.float32), y
