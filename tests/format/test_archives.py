"""Version policy (spec §10): golden traces of every released format version stay readable;
newer minors are read, newer majors refused naming the ntrace needed.

``tests/data/archives/README.md`` says how each golden trace was made.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from ntrace import __version__
from ntrace.cli import main
from ntrace.errors import UnsupportedVersionError
from ntrace.format.metadata import ATTR_KEY, FORMAT_MAJOR, FORMAT_MINOR
from ntrace.format.pack import pack_trace, verify_pack
from ntrace.format.reader import open_trace
from ntrace.format.summary import summarize
from ntrace.format.validate import validate_trace

ARCHIVES = Path(__file__).resolve().parents[1] / "data" / "archives"
# every released format version; add one (and its archive) per release
RELEASED = ["1.0", "1.1", "1.2", "1.3"]
NEWER_MAJOR = (f"needs a newer ntrace (this is {__version__}, which reads format "
               f"{FORMAT_MAJOR}.x): pip install -U ntrace")


def archive(version: str) -> Path:
    return ARCHIVES / f"format-{version}.zarr"


def test_every_released_version_has_an_archive_and_every_archive_is_tested() -> None:
    on_disk = sorted(p.name for p in ARCHIVES.glob("format-*.zarr"))
    assert on_disk == sorted(archive(v).name for v in RELEASED)
    assert (ARCHIVES / "README.md").is_file() and (ARCHIVES / "make_archive.py").is_file()
    for v in RELEASED:
        assert v in (ARCHIVES / "README.md").read_text()


@pytest.mark.parametrize("version", RELEASED)
def test_an_archived_trace_reads_and_validates(version: str, tmp_path: Path) -> None:
    path = archive(version)
    report = validate_trace(path)
    assert report.ok, report.reasons
    assert report.attrs.format_version == version and report.attrs.status == "complete"
    with open_trace(path) as tr:
        rows = {p: tr.read(p) for p in tr.layouts}
        assert tr.rounds == len(rows["loss"]) > 0 and tr.taylor_rounds > 0
        assert np.all(np.isfinite(rows["loss"]))
        assert tr.datatree()["loss"].size == tr.rounds
    assert dict(summarize(path).header)["format"].startswith(version)
    packed = pack_trace(path, tmp_path / f"{version}.zip").path
    assert verify_pack(packed).ok and validate_trace(packed).ok


def _set_versions(path: Path, version: str, extra: bool) -> None:
    for doc_path in path.rglob("zarr.json"):
        doc = json.loads(doc_path.read_text())
        doc.pop("consolidated_metadata", None)
        nt = (doc.get("attributes") or {}).get(ATTR_KEY)
        if isinstance(nt, dict):
            nt["format_version"] = version
            if extra:
                nt["added_in_a_later_minor"] = {"anything": [1, 2, 3]}
        doc_path.write_text(json.dumps(doc))


def test_a_newer_minor_is_read(tmp_path: Path) -> None:
    t = tmp_path / "newer-minor.zarr"
    shutil.copytree(archive(RELEASED[-1]), t)
    _set_versions(t, f"{FORMAT_MAJOR}.{FORMAT_MINOR + 7}", extra=True)
    assert validate_trace(t).ok
    with open_trace(t) as tr:
        assert tr.read("loss").shape == (tr.rounds,)


@pytest.mark.parametrize("version", [f"{FORMAT_MAJOR + 1}.0", f"{FORMAT_MAJOR + 7}.3"])
def test_a_newer_major_is_refused_naming_the_ntrace_needed(tmp_path: Path,
                                                           version: str) -> None:
    t = tmp_path / "newer-major.zarr"
    shutil.copytree(archive(RELEASED[-1]), t)
    _set_versions(t, version, extra=False)
    with pytest.raises(UnsupportedVersionError) as info:
        open_trace(t)
    msg = str(info.value)
    assert f"trace format version {version}" in msg and msg.endswith(NEWER_MAJOR), msg
    assert validate_trace(t).reasons[0].endswith(NEWER_MAJOR)
    runner = CliRunner()
    for cmd in ("info", "validate"):
        res: Any = runner.invoke(main, [cmd, str(t)])
        assert res.exit_code in (1, 5) and NEWER_MAJOR in res.output, res.output
    zipped = pack_trace(archive(RELEASED[-1]), tmp_path / "ok.zip").path
    assert validate_trace(zipped).ok  # the same refusal applies to packed traces:
    bad_zip = tmp_path / "newer.zip"
    import zipfile

    with zipfile.ZipFile(zipped) as zin, zipfile.ZipFile(bad_zip, "w") as zout:
        for info_ in zin.infolist():
            data = zin.read(info_)
            if info_.filename == "zarr.json":
                doc = json.loads(data)
                doc["attributes"][ATTR_KEY]["format_version"] = version
                data = json.dumps(doc).encode()
            zout.writestr(info_, data)
    with pytest.raises(UnsupportedVersionError, match=NEWER_MAJOR.replace("(", r"\(")
                       .replace(")", r"\)").replace(".", r"\.")):
        open_trace(bad_zip)
