"""A trace is untrusted data (spec/security.md): reading one never runs code from it and a
hostile one cannot exhaust memory; every refusal is one ``InvalidTraceError`` line."""

from __future__ import annotations

import ast
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import tracemalloc
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ntrace.errors import InvalidTraceError
from ntrace.format import limits
from ntrace.format.pack import pack_trace
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
    for value in ("1 MiB", "16 MiB", "1 GiB", "4 TiB", "64 levels", "32 dimensions",
                  "spanning more than one row | 16 MiB", "10,000", "4 GiB declared"):
        assert value in text, value
    assert limits.MAX_SPAN_CHUNK_BYTES == 16 << 20 and limits.MAX_NAMES == 10_000
    assert limits.MAX_RESULTS_BYTES == 4 << 30
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


# -- one store layer: regular files inside the trace root, nothing else ---------------------------
def _outside(tmp_path: Path, data: bytes = b"TOP-SECRET-0123456789abcdefghijklmnopqrstuv") -> Path:
    (tmp_path / "outside").mkdir(exist_ok=True)
    secret = tmp_path / "outside" / "secret.txt"
    secret.write_bytes(data)
    return secret


def _bytes_only(d: dict[str, Any]) -> None:
    d["codecs"] = [{"name": "bytes", "configuration": {"endian": "little"}}]


def test_a_chunk_linked_outside_the_trace_is_refused_by_every_reader(tmp_path: Path) -> None:
    t = _copy(tmp_path)
    secret = _outside(tmp_path, bytes(range(48)))  # 12 float32 rounds, bytes-only codec
    _edit(t, "loss/zarr.json", _bytes_only)
    (t / "loss/c/0").unlink()
    os.symlink("../../../outside/secret.txt", t / "loss/c/0")
    assert (t / "loss/c/0").read_bytes() == secret.read_bytes()  # the link works
    msg = "loss/c/0: a symbolic link inside the trace"
    reasons = validate_trace(t).reasons
    assert any(msg in r for r in reasons), reasons
    with open_trace(t) as tr, pytest.raises(InvalidTraceError, match=msg):
        tr.read("loss")
    with pytest.raises(InvalidTraceError, match=msg):
        summarize(t)  # info lists every file
    with pytest.raises(InvalidTraceError, match=msg):
        pack_trace(t, tmp_path / "t.zip")
    assert not (tmp_path / "t.zip").exists() and not list(tmp_path.glob(".t.zip*"))


def test_a_chunk_linked_to_a_system_file_leaks_nothing_into_the_message(tmp_path: Path) -> None:
    target = Path("/etc/passwd")
    if not target.is_file():
        pytest.skip("no /etc/passwd")
    t = _copy(tmp_path)
    (t / "layers/fc1/bias/c/0/0").unlink()
    os.symlink(target, t / "layers/fc1/bias/c/0/0")
    reasons = validate_trace(t).reasons
    assert len(reasons) == 1 and "layers/fc1/bias/c/0/0: a symbolic link" in reasons[0]
    head = target.read_bytes()[:16]
    declared = str(int.from_bytes(head[4:8], "little"))  # what the blosc check used to print
    assert declared not in reasons[0] and head[:4].decode(errors="ignore") not in reasons[0]


def test_a_directory_linked_outside_is_refused_and_resume_writes_nothing_there(
        ae_trace: Path, tmp_path: Path) -> None:
    from ntrace.format.writer import TraceWriter

    t = tmp_path / "ae.zarr"
    shutil.copytree(ae_trace, t)
    outside = tmp_path / "outside"
    shutil.move(t / "loss" / "c", outside)
    os.symlink(outside, t / "loss" / "c")
    before = sorted(p.name for p in outside.iterdir())
    with pytest.raises(InvalidTraceError, match="loss/c: a symbolic link inside the trace"):
        TraceWriter.reopen(t)
    assert sorted(p.name for p in outside.iterdir()) == before
    assert any("loss/c: a symbolic link" in r for r in validate_trace(t).reasons)


def test_a_key_whose_document_is_a_link_or_fifo_is_refused_on_open(tmp_path: Path) -> None:
    t = _copy(tmp_path)
    (t / "layers/fc1/zarr.json").unlink()
    os.symlink(_outside(tmp_path, b'{"node_type": "group"}'), t / "layers/fc1/zarr.json")
    with pytest.raises(InvalidTraceError, match="layers/fc1/zarr.json: a symbolic link"):
        open_trace(t)
    (t / "layers/fc1/zarr.json").unlink()
    os.mkfifo(t / "layers/fc1/zarr.json")
    with _deadline(60), pytest.raises(InvalidTraceError, match="layers/fc1/zarr.json: a FIFO"):
        open_trace(t)  # refused before it is opened: no hang


@contextmanager
def _deadline(seconds: int) -> Iterator[None]:
    """Fail with ``TimeoutError`` instead of hanging (a reader blocked on a FIFO)."""

    def alarm(*args: Any) -> None:
        raise TimeoutError(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# Hostile traces whose reading used to hang or exhaust memory run in a child process with an
# address-space limit and a per-command alarm, so that a regression fails instead of hanging.
RUNNER = textwrap.dedent("""
    import json, resource, signal, sys
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
    from click.testing import CliRunner
    from ntrace.cli import main

    def alarm(*args):
        raise TimeoutError("still running after 60 s")

    signal.signal(signal.SIGALRM, alarm)
    out = []
    for args in json.loads(sys.argv[1]):
        signal.alarm(60)
        try:
            res = CliRunner().invoke(main, args)
            out.append([res.exit_code, res.output, repr(res.exception)])
        except TimeoutError as exc:
            out.append([-1, str(exc), ""])
        finally:
            signal.alarm(0)
    print(json.dumps(out))
""")


def _commands(t: Path, tmp_path: Path) -> list[list[str]]:
    return [["info", str(t)], ["validate", str(t)], ["pack", str(t), str(tmp_path / "p.zip")],
            ["analyze", str(t), "--out", str(tmp_path / "an"), "--no-figures",
             "--checkpoints", "2"]]


def _run_hostile(commands: list[list[str]], timeout: float = 300) -> list[tuple[int, str]]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(commands)],
                          capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [(code, out.strip()) for code, out, _ in json.loads(proc.stdout.splitlines()[-1])]


@pytest.mark.parametrize("key", ["layers/fc1/zarr.json", "loss/c/0"])
@pytest.mark.parametrize("how", ["dev-zero", "fifo"])
def test_devices_and_fifos_are_refused_by_every_command(tmp_path: Path, key: str,
                                                        how: str) -> None:
    t = _copy(tmp_path)
    (t / key).unlink()
    if how == "fifo":
        os.mkfifo(t / key)
    else:
        os.symlink("/dev/zero", t / key)
    what = "a FIFO" if how == "fifo" else "a symbolic link"
    for (code, out), args in zip(_run_hostile(_commands(t, tmp_path)), _commands(t, tmp_path),
                                 strict=True):
        assert code in (1, 5), (args[0], code, out)  # validate reports (1), the rest refuse (5)
        assert f"{key}: {what} inside the trace" in out, (args[0], out)
        assert len(out.splitlines()) <= 2, (args[0], out)  # validate: a header and the reason
    assert not (tmp_path / "p.zip").exists()


# -- work and memory caps -------------------------------------------------------------------------
def _rewrite(t: Path, path: str, data: np.ndarray, chunks: tuple[int, ...]) -> None:
    """Replace the array ``path`` of ``t`` by ``data`` stored in ``chunks`` (same dims, dtype,
    codecs and fill value), every chunk written."""
    import zarr

    old = zarr.open_array(t / path, mode="r")
    dims = old.metadata.dimension_names
    shutil.rmtree(t / path)
    arr = zarr.create_array(t / path, shape=data.shape, chunks=chunks, dtype=old.dtype,
                            fill_value=old.fill_value, compressors=old.compressors,
                            dimension_names=dims, config={"write_empty_chunks": True})
    arr[...] = data


def _commit(t: Path, **counts: int) -> None:
    _edit(t, "zarr.json", lambda d: d["attributes"]["ntrace"]["commit"].update(counts))


def test_a_chunk_spanning_many_rows_is_refused(tmp_path: Path) -> None:
    t = _copy(tmp_path)
    _edit(t, "loss/zarr.json",
          lambda d: d["chunk_grid"]["configuration"].update(chunk_shape=[2**26]))
    _refused(t, "loss/zarr.json: chunk shape [67108864] spans 67108864 rows of 'round' in "
                "268435456 bytes, more than the 16 MiB")


def test_validate_decodes_each_chunk_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                         ) -> None:
    from ntrace.format import files, validate

    t = _copy(tmp_path)
    _rewrite(t, "loss", np.linspace(1, 2, 20_000, dtype=np.float32), (8192,))
    _commit(t, rounds=20_000)
    monkeypatch.setattr(validate, "BLOCK_BYTES", 4096)  # blocks far smaller than a chunk
    reads: list[str] = []
    original = files.TraceDirStore.get

    async def counting(self: Any, key: str, *args: Any, **kwargs: Any) -> Any:
        reads.append(key)
        return await original(self, key, *args, **kwargs)

    monkeypatch.setattr(files.TraceDirStore, "get", counting)
    assert validate_trace(t).ok
    assert sorted(k for k in reads if k.startswith("loss/c/")) == ["loss/c/0", "loss/c/1",
                                                                  "loss/c/2"]


def test_validate_memory_does_not_grow_with_the_probe(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from ntrace.format import validate

    t = _copy(tmp_path)
    p = 400_000  # probe/input alone: 9.6 MB
    doc = json.loads((t / "zarr.json").read_text())
    snaps = doc["attributes"]["ntrace"]["commit"]["snapshots"]
    ub = json.loads((t / "probe/config/zarr.json").read_text())["shape"][2]
    feats = json.loads((t / "probe/input/zarr.json").read_text())["shape"][1]
    _rewrite(t, "probe/input", np.ones((p, feats), np.float32), (4096, feats))
    _rewrite(t, "probe/sample_index", np.arange(p, dtype=np.int64), (8192,))
    _rewrite(t, "probe/config", np.zeros((snaps, p, ub), np.uint8), (1, p, ub))
    _edit(t, "zarr.json", lambda d: d["attributes"]["ntrace"]["sampling"].update(probe_size=p))
    monkeypatch.setattr(validate, "BLOCK_BYTES", 256 << 10)
    tracemalloc.start()
    try:
        report = validate_trace(t)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert report.ok, report.reasons
    assert peak < 4 << 20, f"peak {peak >> 20} MiB for a probe of {p} points"


def test_too_many_layer_names_are_refused_before_their_groups_are_read(tmp_path: Path) -> None:
    t = _copy(tmp_path)
    _edit(t, "zarr.json", lambda d: d["attributes"]["ntrace"].update(
        layers=[f"l{i}" for i in range(limits.MAX_NAMES + 1)]))
    _refused(t, "the root lists 10001 layers and modules, more than the 10000 ntrace reads")


def test_storage_transformers_are_refused(tmp_path: Path) -> None:
    t = _copy(tmp_path)
    _edit(t, "loss/zarr.json", lambda d: d.update(
        storage_transformers=[{"name": "chunk-manifest-json"}]))
    _refused(t, "loss/zarr.json: storage_transformers [{'name': 'chunk-manifest-json'}]: "
                "ntrace reads no storage transformers")


def test_analysis_bounds_the_per_round_loss_by_max_memory() -> None:
    from ntrace.analyze import AnalysisOptions, analyze_trace
    from ntrace.errors import UsageError

    with pytest.raises(UsageError, match=r"commits 12 rounds, whose per-round loss takes 96 B, "
                                         r"more than max_memory \(64 B\)"):
        analyze_trace(TINY, AnalysisOptions(max_memory=64))


# -- missing data ---------------------------------------------------------------------------------
@pytest.mark.parametrize("array", ["probe/config", "taylor/sample_index", "layers/fc1/mask"])
def test_missing_chunks_inside_the_commit_are_errors(tmp_path: Path, array: str) -> None:
    """Their fill values (0, -1) are legal data: zarr would return them silently."""
    t = _copy(tmp_path)
    shutil.rmtree(t / array / "c")
    msg = "chunk missing inside the"
    reasons = validate_trace(t).reasons
    assert len(reasons) == 1 and reasons[0].startswith(f"{array}/c/0") and msg in reasons[0]
    with open_trace(t) as tr, pytest.raises(InvalidTraceError, match=msg):
        tr.read(array)


def test_analysis_of_a_trace_missing_probe_configurations_fails(tmp_path: Path) -> None:
    from ntrace.analyze import AnalysisOptions, analyze_trace

    t = _copy(tmp_path)
    shutil.rmtree(t / "probe/config/c")
    with pytest.raises(InvalidTraceError, match="probe/config/c/0/0/0: chunk missing inside "
                                                "the 6 committed rows of probe/config"):
        analyze_trace(t, AnalysisOptions(checkpoints=2))


def test_rows_past_the_commit_may_be_missing() -> None:
    assert validate_trace(REPO / "spec/examples/valid/running-uncommitted-rows.zarr").ok


# -- the error path -------------------------------------------------------------------------------
def test_a_failed_read_of_many_chunks_prints_one_line(tmp_path: Path) -> None:
    t = _copy(tmp_path)
    _rewrite(t, "loss", np.ones(2000, np.float32), (1,))
    _commit(t, rounds=2000)
    chunk = t / "loss/c/0"
    raw = bytearray(chunk.read_bytes())
    raw[-1] ^= 0xFF  # the crc32c checksum
    chunk.write_bytes(bytes(raw))
    code = ("import sys\nfrom ntrace.format.reader import open_trace\n"
            "tr = open_trace(sys.argv[1])\ntry:\n    tr.read('loss')\n"
            "except Exception as exc:\n    print(exc)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO),
                                                        os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code, str(t)], capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.stdout.startswith("loss: unreadable: ValueError: Stored and computed checksum")
    assert "b'…'" in proc.stdout  # the stored checksum is not echoed
    assert proc.stderr == ""  # no "Task was destroyed but it is pending!" lines


# -- analysis results are read through the same store ---------------------------------------------
def _results(tmp_path: Path) -> Path:
    import xarray as xr

    from ntrace.analyze.results import NODE, RESULTS_VERSION, write_results

    ds = xr.Dataset({"taylor_loss": ("taylor_round", np.arange(8.0))},
                    attrs={"ntrace": {"node": NODE, "results_version": RESULTS_VERSION,
                                      "layer_names": []}})
    return write_results(ds, tmp_path / "results.zarr")


def test_results_are_read_through_the_guarded_store(tmp_path: Path) -> None:
    from ntrace.analyze.results import open_results

    p = _results(tmp_path)
    assert list(open_results(p)["taylor_loss"].values) == list(np.arange(8.0))
    chunk = next((p / "taylor_loss" / "c").iterdir())
    chunk.unlink()
    os.symlink(_outside(tmp_path, bytes(64)), chunk)
    with pytest.raises(InvalidTraceError, match="taylor_loss/c/0: a symbolic link"):
        open_results(p)
    chunk.unlink()
    _edit(p, "taylor_loss/zarr.json", lambda d: d.update(shape=[2**36]))
    with pytest.raises(InvalidTraceError, match="declare 549755813888 bytes, more than the 4 GiB"):
        open_results(p)
