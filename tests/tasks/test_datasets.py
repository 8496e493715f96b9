"""Data set readers: real MNIST IDX files, synthetic malformed ones, scikit-learn's digits."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import numpy as np
import pytest

from ntrace.errors import DatasetError
from ntrace.tasks.datasets import load_digits, load_mnist, read_idx

MNIST = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "mnist"
T10K_IMAGES = MNIST / "t10k-images-idx3-ubyte.gz"
T10K_LABELS = MNIST / "t10k-labels-idx1-ubyte.gz"
LABEL_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]  # MNIST's SOURCE.md
needs_mnist = pytest.mark.skipif(not T10K_IMAGES.is_file() or not T10K_LABELS.is_file(),
                                 reason=f"MNIST test split not found under {MNIST}")


def idx_bytes(data: np.ndarray, code: int = 0x08) -> bytes:
    """An IDX file, written independently of the reader: magic 0 0 <code> <ndim>, big-endian
    uint32 sizes, then the big-endian values."""
    dtype = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}[code]
    head = bytes([0, 0, code, data.ndim]) + b"".join(n.to_bytes(4, "big") for n in data.shape)
    return head + np.asarray(data, dtype=dtype).tobytes()


def write(path: Path, payload: bytes, gz: bool = False) -> Path:
    path.write_bytes(gzip.compress(payload, mtime=0) if gz else payload)
    return path


def mnist_like(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
            rng.integers(0, 10, n, dtype=np.uint8))


# -- the real MNIST test split ---------------------------------------------------------------------
@needs_mnist
def test_read_real_mnist_images_and_labels() -> None:
    images = read_idx(T10K_IMAGES)
    labels = read_idx(T10K_LABELS)
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,) and labels.dtype == np.uint8
    assert np.bincount(labels, minlength=10).tolist() == LABEL_COUNTS
    assert images.min() == 0 and images.max() == 255


@needs_mnist
def test_gzip_and_raw_files_read_identically(tmp_path: Path) -> None:
    raw = write(tmp_path / "t10k-labels-idx1-ubyte", gzip.decompress(T10K_LABELS.read_bytes()))
    a, b = read_idx(T10K_LABELS), read_idx(raw)
    assert a.dtype == b.dtype and np.array_equal(a, b)
    # the raw payload is what SOURCE.md's header description says: magic 2049, count 10000
    head = raw.read_bytes()[:8]
    assert int.from_bytes(head[:4], "big") == 2049 and int.from_bytes(head[4:], "big") == 10000


@needs_mnist
def test_load_mnist_from_the_shared_directory() -> None:
    x, y = load_mnist(MNIST)
    assert x.shape == (10000, 784) and x.dtype == np.float32
    assert y.shape == (10000,) and y.dtype == np.int64
    assert 0.0 <= x.min() and x.max() <= 1.0 and x.max() == 1.0
    assert np.bincount(y).tolist() == LABEL_COUNTS
    # an independent reference for one image: the raw bytes after the 16-byte header
    raw = np.frombuffer(gzip.decompress(T10K_IMAGES.read_bytes())[16:16 + 784], np.uint8)
    np.testing.assert_array_equal(x[0], raw / np.float32(255.0))


@needs_mnist
def test_shared_files_are_the_documented_ones() -> None:
    sha = hashlib.sha256(T10K_LABELS.read_bytes()).hexdigest()
    assert sha == "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"


# -- the IDX reader on synthetic files -------------------------------------------------------------
@pytest.mark.parametrize("code", [0x08, 0x09, 0x0B, 0x0C, 0x0D, 0x0E])
def test_read_idx_every_dtype_big_endian_to_native(tmp_path: Path, code: int) -> None:
    data = np.arange(-3, 9).reshape(3, 4) + (3 if code == 0x08 else 0)  # unsigned for 0x08
    arr = read_idx(write(tmp_path / "a-idx2", idx_bytes(data, code)))
    assert arr.shape == (3, 4) and arr.dtype.isnative
    np.testing.assert_array_equal(arr, data)


def test_gzip_detected_by_content_not_name(tmp_path: Path) -> None:
    data = np.arange(12, dtype=np.uint8).reshape(3, 4)
    np.testing.assert_array_equal(read_idx(write(tmp_path / "x", idx_bytes(data), gz=True)),
                                  data)


def test_bad_magic(tmp_path: Path) -> None:
    payload = b"\x08\x03" + idx_bytes(np.zeros((2, 2, 2), np.uint8))[2:]
    with pytest.raises(DatasetError, match="not an IDX file \\(bad magic number\\)"):
        read_idx(write(tmp_path / "bad-idx3-ubyte", payload))


def test_unknown_type_code_is_bad_magic(tmp_path: Path) -> None:
    payload = bytearray(idx_bytes(np.zeros((2, 2), np.uint8)))
    payload[2] = 0x0A
    with pytest.raises(DatasetError, match="bad magic number"):
        read_idx(write(tmp_path / "odd", bytes(payload)))


@pytest.mark.parametrize("gz", [False, True])
def test_truncated_body(tmp_path: Path, gz: bool) -> None:
    payload = idx_bytes(np.ones((10, 28, 28), np.uint8))[:-100]
    with pytest.raises(DatasetError) as info:
        read_idx(write(tmp_path / ("imgs.gz" if gz else "imgs"), payload, gz))
    msg = str(info.value)
    assert "promises shape (10, 28, 28) (7856 bytes)" in msg and "7756 bytes" in msg
    assert "truncated or corrupt" in msg


def test_header_size_mismatch_extra_bytes(tmp_path: Path) -> None:
    payload = idx_bytes(np.ones((5,), np.uint8)) + b"\0"
    with pytest.raises(DatasetError, match=r"promises shape \(5,\) \(13 bytes\) but the file "
                                           r"holds 14 bytes"):
        read_idx(write(tmp_path / "labels", payload))


def test_truncated_header(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="truncated IDX header"):
        read_idx(write(tmp_path / "h", bytes([0, 0, 8, 3]) + (10).to_bytes(4, "big")))


def test_zero_dimensions(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="declares 0 dimensions"):
        read_idx(write(tmp_path / "z", bytes([0, 0, 8, 0])))


def test_header_whose_size_overflows_int64(tmp_path: Path) -> None:
    # 3 dimensions of 2**31 multiply to 2**93; an int64 product wraps to 0 and matched the
    # empty body, so the reader used to fail in reshape with a bare ValueError
    payload = bytes([0, 0, 8, 3]) + (2**31).to_bytes(4, "big") * 3
    with pytest.raises(DatasetError, match="promises shape"):
        read_idx(write(tmp_path / "huge", payload))


def test_named_gz_but_not_gzip(tmp_path: Path) -> None:
    payload = idx_bytes(np.zeros((2, 2), np.uint8))
    with pytest.raises(DatasetError, match="named .gz but is not gzip-compressed"):
        read_idx(write(tmp_path / "t10k-labels-idx1-ubyte.gz", payload))


@pytest.mark.parametrize("damage", ["block-type", "crc", "cut"])
def test_corrupt_gzip_stream(tmp_path: Path, damage: str) -> None:
    gz = gzip.compress(idx_bytes(np.arange(100, dtype=np.uint8)), mtime=0)
    bad = {"block-type": gz[:10] + b"\xff" + gz[11:],  # zlib.error: invalid block type
           "crc": gz[:-8] + b"\0\0\0\0" + gz[-4:],
           "cut": gz[:-12]}[damage]
    with pytest.raises(DatasetError, match="gzip stream is corrupt or truncated"):
        read_idx(write(tmp_path / "x.gz", bad))


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="cannot read IDX file .*nope"):
        read_idx(tmp_path / "nope")
    with pytest.raises(DatasetError, match="cannot read IDX file"):
        read_idx(tmp_path)


# -- load_mnist picking files from a directory -----------------------------------------------------
def test_load_mnist_prefers_the_training_split(tmp_path: Path) -> None:
    (tx, ty), (vx, vy) = mnist_like(6, 1), mnist_like(4, 2)
    write(tmp_path / "train-images-idx3-ubyte.gz", idx_bytes(tx), gz=True)
    write(tmp_path / "train-labels-idx1-ubyte", idx_bytes(ty))
    write(tmp_path / "t10k-images-idx3-ubyte", idx_bytes(vx))
    write(tmp_path / "t10k-labels-idx1-ubyte", idx_bytes(vy))
    x, y = load_mnist(tmp_path)
    assert x.shape == (6, 784)
    np.testing.assert_array_equal(y, ty.astype(np.int64))
    np.testing.assert_allclose(x, tx.reshape(6, -1) / 255.0, rtol=1e-6)


def test_load_mnist_needs_a_directory(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="--data-dir"):
        load_mnist(None)
    with pytest.raises(DatasetError, match="is not a directory"):
        load_mnist(tmp_path / "absent")


def test_load_mnist_names_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as info:
        load_mnist(tmp_path)
    assert "no MNIST files" in str(info.value)
    assert "t10k-images-idx3-ubyte(.gz)" in str(info.value)
    x, _ = mnist_like(3)
    write(tmp_path / "t10k-images-idx3-ubyte.gz", idx_bytes(x), gz=True)
    with pytest.raises(DatasetError, match=r"has t10k-images-idx3-ubyte.gz but no "
                                           r"t10k-labels-idx1-ubyte\(.gz\)"):
        load_mnist(tmp_path)


def test_load_mnist_refuses_mismatched_split(tmp_path: Path) -> None:
    x, y = mnist_like(5)
    write(tmp_path / "t10k-images-idx3-ubyte", idx_bytes(x))
    write(tmp_path / "t10k-labels-idx1-ubyte", idx_bytes(y[:4]))
    with pytest.raises(DatasetError, match="do not form an MNIST split"):
        load_mnist(tmp_path)


def test_load_mnist_passes_reader_errors_on(tmp_path: Path) -> None:
    write(tmp_path / "t10k-images-idx3-ubyte", b"\x01\x02\x03\x04")
    write(tmp_path / "t10k-labels-idx1-ubyte", idx_bytes(np.zeros(1, np.uint8)))
    with pytest.raises(DatasetError, match="bad magic"):
        load_mnist(tmp_path)


# -- scikit-learn's digits -------------------------------------------------------------------------
def test_load_digits() -> None:
    x, y = load_digits()
    assert x.shape == (1797, 64) and x.dtype == np.float32
    assert y.shape == (1797,) and y.dtype == np.int64
    assert x.min() == 0.0 and x.max() == 1.0
    assert sorted(set(y.tolist())) == list(range(10))
    assert np.allclose(x * 16, np.round(x * 16))  # 17 grey levels, 0..16
