"""Single-file sharing (spec/sharing.md): ``ntrace pack`` / ``ntrace verify``, and every
reader on ``.zip`` traces and fsspec URLs (``file://``, ``memory://``, ``s3://`` against a
local S3-compatible server)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import uuid
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xarray as xr
import zarr
import zarr.storage
from click.testing import CliRunner

from ntrace.cli import main
from ntrace.errors import InvalidTraceError, TraceExistsError, TraceNotFoundError, UsageError
from ntrace.format.pack import MANIFEST, pack_trace, verify_pack
from ntrace.format.reader import open_trace
from ntrace.format.summary import summarize
from ntrace.format.validate import validate_trace

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "spec" / "examples"
TINY = EXAMPLES / "valid" / "tiny-mlp.zarr"


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pack") / "tiny.zip"
    pack_trace(TINY, out)
    return out


def _rows(location: Any) -> dict[str, np.ndarray]:
    with open_trace(location) as tr:
        return {p: tr.read(p) for p in tr.layouts}


def _assert_same_data(a: Any, b: Any) -> None:
    ra, rb = _rows(a), _rows(b)
    assert ra.keys() == rb.keys()
    for k in ra:
        np.testing.assert_array_equal(ra[k], rb[k], err_msg=k)


# -- pack and verify -----------------------------------------------------------------------------
def test_a_packed_trace_reads_validates_and_verifies(packed: Path) -> None:
    assert verify_pack(packed).ok
    report = validate_trace(packed)
    assert report.ok and report.attrs.commit.rounds == 12
    _assert_same_data(TINY, packed)
    s = summarize(packed)
    assert dict(s.header)["trace"] == str(packed) and s.stored > 0
    with open_trace(packed) as tr:
        assert tr.path == packed and tr.nbytes_stored() == s.stored
        assert tr.datatree()["layers/fc1"]["weight"].shape == (4, 4, 6)
        assert tr.dataset("taylor").sizes["taylor_round"] == 4


def test_the_zip_has_zarr_pythons_layout_with_consolidated_metadata(packed: Path) -> None:
    with zipfile.ZipFile(packed) as zf:
        names = zf.namelist()
        assert "zarr.json" in names and "layers/fc1/weight/c/0/0/0" in names
        assert all(i.compress_type == zipfile.ZIP_STORED for i in zf.infolist())
        root = json.loads(zf.read("zarr.json"))
        manifest = json.loads(zf.read(MANIFEST))
    meta = root["consolidated_metadata"]["metadata"]
    assert {"layers/fc1/weight", "probe", "loss"} <= set(meta)
    assert manifest["format_version"] == root["attributes"]["ntrace"]["format_version"]
    assert manifest["commit"] == root["attributes"]["ntrace"]["commit"]
    assert set(manifest["objects"]) == set(names) - {MANIFEST}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # consolidated: no fallback warning
        g = zarr.open_group(zarr.storage.ZipStore(packed, mode="r"), mode="r")
        assert g["layers/fc1/weight"].shape == (4, 4, 6)
        tree = xr.open_datatree(zarr.storage.ZipStore(packed, mode="r"), engine="zarr")
    assert tree["layers/fc2"].dataset.sizes["taylor_round"] == 4


def test_packing_is_deterministic_and_repacking_keeps_the_data(packed: Path,
                                                               tmp_path: Path) -> None:
    again = tmp_path / "again.zip"
    pack_trace(TINY, again)
    assert again.read_bytes() == packed.read_bytes()
    repacked = tmp_path / "repacked.zip"
    pack_trace(packed, repacked)  # a zip is a trace location like any other
    assert verify_pack(repacked).ok
    _assert_same_data(packed, repacked)


def test_a_running_trace_packs_its_committed_prefix(tmp_path: Path) -> None:
    out = tmp_path / "running.zip"
    result = pack_trace(EXAMPLES / "valid" / "running-uncommitted-rows.zarr", out)
    assert result.status == "running" and result.commit["rounds"] == 8
    report = validate_trace(out)
    assert report.ok and report.attrs.status == "running"
    _assert_same_data(EXAMPLES / "valid" / "running-uncommitted-rows.zarr", out)


def test_pack_refuses_what_it_should(packed: Path, tmp_path: Path) -> None:
    with pytest.raises(TraceExistsError):
        pack_trace(TINY, packed)
    other = tmp_path / "other.zip"
    with zipfile.ZipFile(other, "w") as zf:
        zf.writestr("notes.txt", "not a trace")
    with pytest.raises(UsageError, match="not a trace packed by ntrace"):
        pack_trace(TINY, other, overwrite=True)
    with pytest.raises(UsageError, match=r"must be a \.zip"):
        pack_trace(TINY, tmp_path / "out.tar")
    copy = tmp_path / "t.zarr"
    shutil.copytree(TINY, copy)
    with pytest.raises(UsageError, match="inside the trace"):
        pack_trace(copy, copy / "inside.zip")
    with pytest.raises(InvalidTraceError, match="jacobian: array is missing"):
        pack_trace(EXAMPLES / "invalid" / "missing-array.zarr", tmp_path / "m.zip")
    pack_trace(EXAMPLES / "invalid" / "sample-loss-tampered.zarr", tmp_path / "s.zip")
    with pytest.raises(InvalidTraceError, match="sample_loss"):
        pack_trace(EXAMPLES / "invalid" / "sample-loss-tampered.zarr", tmp_path / "s2.zip",
                   validate=True)
    assert not list(tmp_path.glob(".*.partial"))  # no temporary file left behind


def test_pack_leaves_out_stray_files(tmp_path: Path) -> None:
    t = tmp_path / "t.zarr"
    shutil.copytree(TINY, t)
    (t / "notes.txt").write_text("my notes")
    (t / "layers" / ".DS_Store").write_bytes(b"\0")
    result = pack_trace(t, tmp_path / "t.zip")
    assert result.skipped == ["layers/.DS_Store", "notes.txt"]
    with zipfile.ZipFile(result.path) as zf:
        assert "notes.txt" not in zf.namelist()


def _rewrite(src: Path, dst: Path, change: Any) -> None:
    """Copy a zip member by member, letting ``change(name, data)`` return new data (or None
    to drop the member); ``change`` may also be given the name ``None`` to add members."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = change(info.filename, zin.read(info))
            if data is not None:
                zout.writestr(info, data)
        for name, data in change(None, None) or []:
            zout.writestr(name, data)


@pytest.mark.parametrize("how, reason", [
    ("flip", "layers/fc1/weight/c/0/0/0: sha256"),
    ("drop", "loss/c/0: listed in the manifest but missing from the zip"),
    ("extra", "members not listed in the manifest: extra.bin"),
    ("commit", "ntrace-manifest.json: commit"),
    ("no-manifest", "no ntrace-manifest.json"),
    ("future", "manifest version 2 needs a newer ntrace"),
])
def test_verify_reports_every_kind_of_damage(packed: Path, tmp_path: Path, how: str,
                                             reason: str) -> None:
    bad = tmp_path / f"{how}.zip"

    def change(name: str | None, data: bytes | None) -> Any:
        if name is None:
            return [("extra.bin", b"x")] if how == "extra" else None
        assert data is not None
        if how == "flip" and name == "layers/fc1/weight/c/0/0/0":
            return data[:10] + bytes([data[10] ^ 1]) + data[11:]
        if how == "drop" and name == "loss/c/0":
            return None
        if how == "no-manifest" and name == MANIFEST:
            return None
        if name == MANIFEST and how in ("commit", "future"):
            m = json.loads(data)
            if how == "commit":
                m["commit"]["rounds"] = 99
            else:
                m["ntrace_manifest"] = 2
            return json.dumps(m).encode()
        return data

    _rewrite(packed, bad, change)
    report = verify_pack(bad)
    assert not report.ok and any(reason in r for r in report.reasons), report.reasons
    res = CliRunner().invoke(main, ["verify", str(bad)])
    assert res.exit_code == 1 and reason in res.output


def test_verify_catches_bytes_changed_on_disk(packed: Path, tmp_path: Path) -> None:
    bad = tmp_path / "disk.zip"
    raw = bytearray(packed.read_bytes())
    with zipfile.ZipFile(packed) as zf:
        info = zf.getinfo("taylor/output/c/0/0/0")
    raw[info.header_offset + 30 + len(info.filename) + 5] ^= 0xFF  # inside the member's data
    bad.write_bytes(bytes(raw))
    report = verify_pack(bad)
    assert not report.ok and "taylor/output/c/0/0/0" in report.reasons[0]


@pytest.mark.parametrize("name", ["../evil.txt", "/abs/zarr.json", "a/../../b", "c:\\x"])
def test_zip_members_that_escape_are_refused(packed: Path, tmp_path: Path, name: str) -> None:
    bad = tmp_path / "escape.zip"
    _rewrite(packed, bad, lambda n, d: [(name, b"x")] if n is None else d)
    with pytest.raises(InvalidTraceError, match="absolute or '..' path"):
        open_trace(bad)
    assert "absolute or '..' path" in validate_trace(bad).reasons[0]
    assert not verify_pack(bad).ok


def test_cli_pack_verify_info_validate(tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "cli.zip"
    res = runner.invoke(main, ["pack", str(TINY), str(out)])
    assert res.exit_code == 0, res.output
    assert "46 objects" in res.output and "12 rounds" in res.output
    res = runner.invoke(main, ["verify", str(out)])
    assert res.exit_code == 0 and res.output.startswith("verified:")
    assert runner.invoke(main, ["validate", str(out)]).exit_code == 0
    assert "tiny-mlp" in runner.invoke(main, ["info", str(out)]).output
    res = runner.invoke(main, ["pack", str(TINY), str(out)])
    assert res.exit_code == 4 and "--overwrite" in res.output
    assert runner.invoke(main, ["pack", str(TINY), str(out), "--overwrite"]).exit_code == 0
    assert runner.invoke(main, ["verify", str(tmp_path / "nope.zip")]).exit_code == 3


def test_a_file_that_is_not_a_trace(tmp_path: Path) -> None:
    f = tmp_path / "x.zarr"
    f.write_text("hello")
    with pytest.raises(TraceNotFoundError, match="not a zip archive"):
        open_trace(f)
    z = tmp_path / "empty.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("readme.txt", "no trace here")
    with pytest.raises(TraceNotFoundError, match="holds no zarr.json"):
        open_trace(z)


# -- fsspec URLs ---------------------------------------------------------------------------------
def test_file_urls(packed: Path) -> None:
    for loc in (TINY, packed):
        url = loc.resolve().as_uri()
        assert validate_trace(url).ok
        _assert_same_data(loc, url)
        assert dict(summarize(url).header)["trace"] == url


@pytest.fixture
def memory_fs() -> Iterator[tuple[Any, str]]:
    fsspec = pytest.importorskip("fsspec")
    fs = fsspec.filesystem("memory")
    root = f"/ntrace-{uuid.uuid4().hex[:8]}"
    yield fs, root
    fs.rm(root, recursive=True)


def test_memory_urls_and_the_cli(memory_fs: tuple[Any, str], packed: Path,
                                 tmp_path: Path) -> None:
    fs, root = memory_fs
    fs.put(str(TINY), f"{root}/tiny.zarr", recursive=True)
    fs.put(str(packed), f"{root}/tiny.zip")
    for name in ("tiny.zarr", "tiny.zip"):
        url = f"memory://{root}/{name}"
        assert validate_trace(url).ok
        _assert_same_data(TINY, url)
        with open_trace(url) as tr:
            assert str(tr.location) == url and tr.datatree()["loss"].size == 12
        runner = CliRunner()
        assert runner.invoke(main, ["validate", url]).exit_code == 0
        assert url in runner.invoke(main, ["info", url]).output
    out = tmp_path / "from-url.zip"
    pack_trace(f"memory://{root}/tiny.zarr", out)
    assert out.read_bytes() == packed.read_bytes()
    with pytest.raises(TraceNotFoundError):
        open_trace(f"memory://{root}/missing.zarr")


def test_s3_urls_against_a_local_server(packed: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("s3fs")
    server_mod = pytest.importorskip("moto.server")
    boto3 = pytest.importorskip("boto3")
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint,
                           "AWS_SESSION_TOKEN": "testing"}.items():
            monkeypatch.setenv(key, value)
        import fsspec

        fsspec.config.conf.pop("s3", None)
        s3 = boto3.client("s3", endpoint_url=endpoint)
        bucket = f"ntrace-{uuid.uuid4().hex[:8]}"
        s3.create_bucket(Bucket=bucket)
        for f in sorted(TINY.rglob("*")):
            if f.is_file():
                s3.upload_file(str(f), bucket, f"runs/tiny.zarr/{f.relative_to(TINY)}")
        s3.upload_file(str(packed), bucket, "runs/tiny.zip")
        s3fs = pytest.importorskip("s3fs")
        s3fs.S3FileSystem.clear_instance_cache()
        for name in ("tiny.zarr", "tiny.zip"):
            url = f"s3://{bucket}/runs/{name}"
            report = validate_trace(url)
            assert report.ok, report.reasons
            _assert_same_data(TINY, url)
            assert summarize(url).stored > 0
        with pytest.raises(TraceNotFoundError):
            open_trace(f"s3://{bucket}/runs/missing.zarr")
    finally:
        server.stop()


# -- hostile input and interrupted packs ---------------------------------------------------------
def _trace_copy(tmp_path: Path) -> Path:
    """tiny-mlp without its consolidated metadata, so that an edited document is the only
    change."""
    t = tmp_path / "t.zarr"
    shutil.copytree(TINY, t)
    doc = json.loads((t / "zarr.json").read_text())
    del doc["consolidated_metadata"]
    (t / "zarr.json").write_text(json.dumps(doc))
    return t


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity"])
def test_pack_refuses_nan_in_a_document_in_one_line(tmp_path: Path, token: str) -> None:
    t = _trace_copy(tmp_path)
    doc = t / "layers/fc1/zarr.json"
    doc.write_text(doc.read_text().replace('"attributes": {', f'"attributes": {{"x": {token}, ',
                                           1))
    assert validate_trace(t).ok  # Python's parser accepts it; JSON does not
    with pytest.raises(InvalidTraceError) as info:
        pack_trace(t, tmp_path / "t.zip")
    assert str(info.value).startswith("layers/fc1/zarr.json: holds NaN or Infinity")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "t.zip").exists() and not list(tmp_path.glob(".t.zip*"))
    res = CliRunner().invoke(main, ["pack", str(t), str(tmp_path / "t.zip")])
    assert res.exit_code == 5 and len(res.output.strip().splitlines()) == 1, res.output


def test_packed_json_is_standard_json(packed: Path) -> None:
    def strict(token: str) -> None:
        raise ValueError(f"non-standard JSON constant {token}")

    with zipfile.ZipFile(packed) as zf:
        for name in zf.namelist():
            if name.endswith(".json"):
                json.loads(zf.read(name), parse_constant=strict)


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    return int(proc.stdout)


def test_pack_removes_partial_files_of_killed_packs(tmp_path: Path) -> None:
    out = tmp_path / "t.zip"
    stale = tmp_path / f".t.zip.{_dead_pid()}.0123456789ab.partial"
    stale.write_bytes(b"PK half a zip")
    live = tmp_path / f".t.zip.{os.getpid()}.0123456789ab.partial"  # a pack still running
    live.write_bytes(b"PK")
    other = tmp_path / f".other.zip.{_dead_pid()}.0123456789ab.partial"
    other.write_bytes(b"PK")
    pack_trace(TINY, out)
    assert not stale.exists() and live.exists() and other.exists()
    assert verify_pack(out).ok


def test_a_terminated_pack_leaves_no_partial_file(tmp_path: Path) -> None:
    code = textwrap.dedent("""
        import os, signal, sys
        from ntrace.format import pack
        original = pack._get
        def get(store, key):
            os.kill(os.getpid(), signal.SIGTERM)  # as `kill PID` during the copy
            return original(store, key)
        pack._get = get
        pack.pack_trace(sys.argv[1], sys.argv[2])
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO),
                                                        os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code, str(TINY), str(tmp_path / "t.zip")],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []  # neither the archive nor its temporary file


def test_verify_detects_accidents_and_a_pinned_digest_detects_tampering(
        packed: Path, tmp_path: Path) -> None:
    res = CliRunner().invoke(main, ["pack", str(TINY), str(tmp_path / "p.zip")])
    digest = res.output.split("manifest sha256 ")[1].split()[0]
    with zipfile.ZipFile(packed) as zf:
        assert hashlib.sha256(zf.read(MANIFEST)).hexdigest() == digest
    assert verify_pack(packed, digest=digest).ok
    tampered = tmp_path / "tampered.zip"
    forged = b"forged bytes"

    def change(name: str | None, data: bytes | None) -> Any:
        if name is None:
            return None
        assert data is not None
        if name == "loss/c/0":
            return forged
        if name == MANIFEST:  # re-hash the edited member: the manifest stays consistent
            m = json.loads(data)
            m["objects"]["loss/c/0"] = {"size": len(forged),
                                        "sha256": hashlib.sha256(forged).hexdigest()}
            return json.dumps(m).encode()
        return data

    _rewrite(packed, tampered, change)
    assert verify_pack(tampered).ok  # what verify alone proves: no accident, not no tampering
    report = verify_pack(tampered, digest=digest)
    assert not report.ok and "differs from the pinned digest" in report.reasons[0]
    res = CliRunner().invoke(main, ["verify", str(tampered), "--digest", digest])
    assert res.exit_code == 1 and "pinned digest" in res.output
    res = CliRunner().invoke(main, ["verify", str(packed), "--digest", digest.upper()])
    assert res.exit_code == 0 and "matches the pinned digest" in res.output
    assert CliRunner().invoke(main, ["verify", str(packed), "--digest", "xyz"]).exit_code == 2
