"""A trace is untrusted data (spec/security.md): reading one never runs code from it and a
hostile one cannot exhaust memory; every refusal is one ``InvalidTraceError`` line."""

from __future__ import annotations

import ast
import json
import shutil
import struct
import tracemalloc
import zipfile
from pathlib import Path
from typing import Any

import pytest

from ntrace.errors import InvalidTraceError
from ntrace.format import limits
from ntrace.format.reader import open_trace
from ntrace.format.safe import GuardedStore
from ntrace.format.store import open_store
from ntrace.format.summary import summarize
from ntrace.format.validate import validate_trace

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "spec" / "examples" / "valid" / "tiny-mlp.zarr"
READ_PATHS = ("ntrace",)  # every read path (format, analyze, resume in record) and the rest
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "shelve", "marshal",
                  "joblib"}
UNSAFE_CALLS = {"eval", "exec", "compile", "__import__"}


# -- nothing on a read path can unpickle or evaluate ----------------------------------------------
def _violations(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        where = f"{path.relative_to(REPO)}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names]
            mods = names if isinstance(node, ast.Import) else [node.module or ""]
            for m in mods:
                if m.split(".")[0] in UNSAFE_MODULES:
                    found.append(f"{where}: imports {m}")
        elif isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name) and func.id in UNSAFE_CALLS:
                found.append(f"{where}: calls {func.id}()")
            name = ast.unparse(func)
            kwargs = {k.arg: k.value for k in node.keywords}
            if name.endswith("torch.load"):
                w = kwargs.get("weights_only")
                if not (isinstance(w, ast.Constant) and w.value is True):
                    found.append(f"{where}: torch.load without weights_only=True")
            a = kwargs.get("allow_pickle")
            if a is not None and not (isinstance(a, ast.Constant) and a.value is False):
                found.append(f"{where}: allow_pickle={ast.unparse(a)}")
            if name.endswith(("yaml.load", "yaml.unsafe_load", "yaml.full_load")):
                found.append(f"{where}: {name}")
        elif isinstance(node, ast.Attribute) and node.attr in ("loads", "load") and \
                isinstance(node.value, ast.Name) and node.value.id in UNSAFE_MODULES:
            found.append(f"{where}: {node.value.id}.{node.attr}")
    return found


def test_read_paths_never_unpickle_or_evaluate() -> None:
    files = [f for d in READ_PATHS if (REPO / d).is_dir() for f in (REPO / d).rglob("*.py")]
    assert any("format" in str(f) for f in files) and any("analyze" in str(f) for f in files)
    found = [v for f in files for v in _violations(f)]
    assert not found, "\n".join(found)


def test_the_scanner_finds_what_it_looks_for(tmp_path: Path) -> None:
    bad = REPO / "ntrace" / "format" / "_scanner_probe_tmp.py"
    try:
        bad.write_text("import pickle\nimport torch\nimport numpy as np\n"
                       "x = eval('1')\nexec('y = 2')\ntorch.load('m.pt')\n"
                       "torch.load('m.pt', weights_only=False)\nnp.load('a.npy', "
                       "allow_pickle=True)\npickle.loads(b'')\n"
                       "torch.load('ok.pt', weights_only=True)\nmodel.eval()\n")
        found = _violations(bad)
    finally:
        bad.unlink()
    assert len(found) == 7, found  # the last two lines are fine


def test_a_trace_naming_a_code_running_codec_is_refused_before_any_chunk_is_read(
        tmp_path: Path) -> None:
    t = _copy(tmp_path)
    doc = json.loads((t / "loss/zarr.json").read_text())
    doc["codecs"] = [{"name": "bytes", "configuration": {"endian": "little"}},
                     {"name": "numcodecs.pickle"}]
    (t / "loss/zarr.json").write_text(json.dumps(doc))
    msg = "loss: codecs ['numcodecs.pickle'] are not Zarr v3 core codecs"
    with pytest.raises(InvalidTraceError, match=msg.replace("[", r"\[").replace("]", r"\]")):
        open_trace(t)
    assert msg in validate_trace(t).reasons[0]
    doc["codecs"] = [{"name": "sharding_indexed", "configuration": {
        "chunk_shape": [64], "codecs": [{"name": "numcodecs.pickle"}],
        "index_codecs": [{"name": "bytes"}, {"name": "crc32c"}]}}]
    (t / "loss/zarr.json").write_text(json.dumps(doc))
    assert "numcodecs.pickle" in validate_trace(t).reasons[0]  # nested codecs too


# -- size limits: refused before anything is allocated ------------------------------------------
def _copy(tmp_path: Path) -> Path:
    """tiny-mlp without its (optional) consolidated metadata, so that an edited node document
    is the only change."""
    t = tmp_path / "t.zarr"
    shutil.copytree(TINY, t)
    doc = json.loads((t / "zarr.json").read_text())
    del doc["consolidated_metadata"]
    (t / "zarr.json").write_text(json.dumps(doc))
    return t


def _edit(t: Path, key: str, change: Any) -> None:
    p = t / key
    doc = json.loads(p.read_text())
    change(doc)
    p.write_text(json.dumps(doc))


def _refused(t: Path, match: str) -> str:
    tracemalloc.start()
    try:
        with pytest.raises(InvalidTraceError) as info:
            open_trace(t)
        report = validate_trace(t)
        with pytest.raises(InvalidTraceError):
            summarize(t)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert match in str(info.value), str(info.value)
    assert not report.ok and any(match in r for r in report.reasons), report.reasons
    assert "\n" not in str(info.value)
    assert peak < 64 << 20, f"peak {peak >> 20} MiB while refusing"
    return str(info.value)


def test_oversized_metadata_documents_are_refused(tmp_path: Path) -> None:
    t = _copy(tmp_path)
    raw = (t / "layers/fc1/zarr.json").read_bytes()
    (t / "layers/fc1/zarr.json").write_bytes(raw[:-1] + b" " * (1 << 20) + raw[-1:])
    _refused(t, "layers/fc1/zarr.json: metadata document larger than 1 MiB")
    t2 = tmp_path / "root"
    shutil.copytree(TINY, t2)
    raw = (t2 / "zarr.json").read_bytes()
    (t2 / "zarr.json").write_bytes(raw[:-1] + b" " * (16 << 20) + raw[-1:])
    with pytest.raises(InvalidTraceError, match="zarr.json: metadata document larger than 16"):
        open_trace(t2)


def test_the_root_may_carry_large_consolidated_metadata(tmp_path: Path) -> None:
    t = _copy(tmp_path)
    raw = (t / "zarr.json").read_bytes()
    (t / "zarr.json").write_bytes(raw[:-1] + b" " * (2 << 20) + raw[-1:])  # 2 MiB: fine
    assert validate_trace(t).ok


def test_deeply_nested_documents_are_refused(tmp_path: Path) -> None:
    t = _copy(tmp_path)
    text = (t / "layers/zarr.json").read_text()
    for depth, what in ((100, "nested deeper than 64"), (100_000, "nested too deeply")):
        (t / "layers/zarr.json").write_text(
            text.replace('"attributes": {', '"attributes": {"x": ' + "[" * depth + "]" * depth
                         + ", ", 1))
        _refused(t, f"layers/zarr.json: metadata document {what}")


@pytest.mark.parametrize("change, match", [
    (lambda d: d.update(shape=[2**50, 4, 6]), "needs 108086391056891904 bytes, more than the 4 "
                                              "TiB"),
    (lambda d: d.update(shape=[4, 2**20, 2**10]), "one row of shape [4, 1048576, 1024] needs "
                                                  "4294967296 bytes"),
    (lambda d: d["chunk_grid"]["configuration"].update(chunk_shape=[2**27, 4, 6]),
     "chunk shape [134217728, 4, 6] of 4-byte items needs 12884901888 bytes per chunk"),
    (lambda d: d.update(shape=[-1, 4, 6]), "'shape' must be a list of at most 32 non-negative"),
    (lambda d: d.update(shape=[1] * 40), "'shape' must be a list of at most 32"),
])
def test_huge_shapes_and_chunks_are_refused_before_allocation(tmp_path: Path, change: Any,
                                                              match: str) -> None:
    t = _copy(tmp_path)
    _edit(t, "layers/fc1/weight/zarr.json", change)
    assert _refused(t, match).startswith("layers/fc1/weight/zarr.json: ")


def test_a_forged_blosc_header_is_refused_before_decoding(tmp_path: Path) -> None:
    t = _copy(tmp_path)
    chunk = t / "layers/fc2/input/c/0/0/0"
    raw = bytearray(chunk.read_bytes())
    raw[4:8] = struct.pack("<I", 2**31 - 1)  # "decodes to 2 GiB"
    chunk.write_bytes(bytes(raw))
    tracemalloc.start()
    try:
        report = validate_trace(t)
        with open_trace(t) as tr, pytest.raises(InvalidTraceError) as info:
            tr.read("layers/fc2/input")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    msg = "blosc header declares a decoded size other than the 1024 bytes a chunk of this array"
    assert msg in str(info.value) and "layers/fc2/input/c/0/0/0" in str(info.value)
    assert "2147483647" not in str(info.value)  # no message echoes what a file holds
    assert any(msg in r for r in report.reasons), report.reasons
    assert peak < 64 << 20


def test_keys_that_leave_the_trace_are_never_read(tmp_path: Path) -> None:
    t = _copy(tmp_path)
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "zarr.json").write_text('{"node_type": "group"}')
    shutil.copy(TINY / "zarr.json", t / "zarr.json")  # with consolidated metadata
    _edit(t, "zarr.json", lambda d: d["consolidated_metadata"]["metadata"].update(
        {"../secret": {"node_type": "group"}}))
    reasons = validate_trace(t).reasons
    assert len(reasons) == 1 and "consolidated metadata disagrees" in reasons[0]
    store = open_store(t)
    assert isinstance(store, GuardedStore)
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    for key in ("../secret/zarr.json", "/etc/passwd", "a/../../secret/zarr.json"):
        with pytest.raises(InvalidTraceError, match="a key that leaves the trace"):
            sync(store.get(key, default_buffer_prototype()))


def test_zip_members_declaring_huge_sizes_are_refused(tmp_path: Path) -> None:
    z = tmp_path / "bomb.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for f in sorted(TINY.rglob("*")):
            if f.is_file():
                zf.write(f, str(f.relative_to(TINY)))
    raw = bytearray(z.read_bytes())
    i = raw.index(b"PK\x01\x02")  # first central directory entry: its uncompressed size
    raw[i + 24:i + 28] = struct.pack("<I", 0xFFFFFFF0)
    z.write_bytes(bytes(raw))
    with pytest.raises(InvalidTraceError, match=r"declares 4294967280 bytes, more than ntrace "
                                                r"reads for one object"):
        open_trace(z)


def test_the_limits_documented_are_the_limits_enforced() -> None:
    text = (REPO / "spec" / "security.md").read_text()
    for value in ("1 MiB", "16 MiB", "1 GiB", "4 TiB", "64 levels", "32 dimensions"):
        assert value in text, value
    assert limits.MAX_NODE_DOCUMENT_BYTES == 1 << 20
    assert limits.MAX_ROOT_DOCUMENT_BYTES == 16 << 20
    assert limits.MAX_CHUNK_BYTES == 1 << 30 and limits.MAX_ARRAY_BYTES == 4 << 40
    assert limits.MAX_JSON_DEPTH == 64 and limits.MAX_DIMENSIONS == 32


def test_a_gzip_bomb_is_refused_before_it_inflates(tmp_path: Path) -> None:
    import gzip

    t = _copy(tmp_path)

    def gz(d: dict[str, Any]) -> None:
        d["codecs"] = [{"name": "bytes", "configuration": {"endian": "little"}},
                       {"name": "gzip", "configuration": {"level": 9}}]

    _edit(t, "loss/zarr.json", gz)
    (t / "loss/c/0").write_bytes(gzip.compress(bytes(256 << 20), 9))  # 256 MiB of zeros
    tracemalloc.start()
    try:
        report = validate_trace(t)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert any("loss/c/0: the chunk's gzip stream inflates past the 16384 bytes" in r
               for r in report.reasons), report.reasons
    assert peak < 64 << 20
