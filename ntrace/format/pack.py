"""One-file sharing: pack a trace into a ``.zip`` with a checksum manifest, and verify one.

The archive uses zarr-python's ``ZipStore`` layout (each Zarr key is a member of the same
name, stored uncompressed since chunks are compressed already), so ``open_trace``,
``ntrace info`` and ``ntrace validate`` read it directly, and plain
``zarr.open_group(zarr.storage.ZipStore(path))`` does too. Its root ``zarr.json`` carries
consolidated metadata; the member ``ntrace-manifest.json`` lists every other member with its
size and SHA-256, the format version, status and commit of the trace. ``spec/sharing.md`` is
the normative description.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import signal
import struct
import threading
import uuid
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from ntrace.errors import InvalidTraceError, NtraceError, TraceExistsError, UsageError
from ntrace.format import limits
from ntrace.format.metadata import ATTR_KEY
from ntrace.format.safe import MANIFEST, PARTIAL, one_line, parse_document
from ntrace.format.store import Location, is_url, open_location
from ntrace.progress import OnProgress, Progress

MANIFEST_VERSION = 1
MAX_MANIFEST_BYTES = 256 * limits.MiB
ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # fixed member times: packing the same trace twice is identical
BLOCK = 1 << 20


@dataclass
class PackResult:
    """What ``pack_trace`` wrote: ``objects`` members besides the manifest, ``skipped`` keys of
    the source that belong to no node (stray files), ``bytes`` the archive size,
    ``manifest_sha256`` the digest of the manifest member (pin it: ``verify --digest``)."""

    path: Path
    objects: int
    bytes: int
    format_version: str
    status: str
    commit: dict[str, int]
    skipped: list[str] = field(default_factory=list)
    manifest_sha256: str = ""


@dataclass
class VerifyReport:
    """Outcome of ``verify_pack``: ``reasons`` is empty when every member matches."""

    path: str
    reasons: list[str] = field(default_factory=list)
    objects: int = 0
    manifest: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return not self.reasons


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _member(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=ZIP_DATE)
    info.compress_type = zipfile.ZIP_STORED
    info.external_attr = 0o644 << 16
    return info


def _check_output(out: Path, source: Location, overwrite: bool) -> None:
    if out.suffix != ".zip":
        raise UsageError(f"the packed trace must be a .zip file, found {out}")
    if source.kind == "dir":
        src = source.path.resolve()
        o = out.resolve()
        if src == o or src in o.parents:
            raise UsageError(f"refusing to write {out} inside the trace {source}")
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise TraceExistsError(f"{out} already exists; pass --overwrite to replace it")
        if not (out.is_file() and zipfile.is_zipfile(out) and _has_manifest(out)):
            raise UsageError(f"refusing to overwrite {out}: it is not a trace packed by ntrace; "
                             "remove it yourself or choose another output path")
    if not out.parent.is_dir():
        raise UsageError(f"cannot write {out}: directory {out.parent} does not exist")


def _has_manifest(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as zf:
            return MANIFEST in zf.namelist()
    except (OSError, zipfile.BadZipFile):
        return False


def pack_trace(trace: str | os.PathLike[str], out: str | os.PathLike[str], *,
               overwrite: bool = False, validate: bool = False,
               progress: OnProgress | None = None) -> PackResult:
    """Pack the trace at ``trace`` (directory, ``.zip`` or URL) into the zip ``out``.

    The trace must pass the structural checks every reader runs; with ``validate`` it must
    also pass the full validation. A trace still being written is packed as it is at the
    moment its root document is read: its commit record and the rows it counts (rows past
    the commit, which readers ignore, are copied as found). The archive is written to a
    temporary file and renamed into place, so ``out`` is never left half written.
    """
    from ntrace.format.reader import load_structure

    if is_url(out):
        raise UsageError(f"cannot write {out}: pack writes a local .zip file; upload it "
                         "afterwards")
    out_path = Path(out)
    if validate:
        from ntrace.format.validate import validate_trace

        report = validate_trace(trace)
        if not report.ok:
            raise InvalidTraceError(f"{trace} does not validate, not packing it: "
                                    f"{report.reasons[0]}", report.reasons)
    loc, root = open_location(trace, "r")
    try:
        _check_output(out_path, loc, overwrite)
        structure = load_structure(root, loc.text)
        attrs, reasons = structure.attrs, structure.reasons
        if reasons:
            raise InvalidTraceError(f"{loc} is not a valid trace, not packing it: {reasons[0]}",
                                    reasons)
        store = loc.store
        root_doc = store.documents.get(limits.DOCUMENT)  # the version whose commit we read
        if root_doc is None:
            raise InvalidTraceError(f"{loc}: the root zarr.json was not read")
        remove_stale_partials(out_path)
        tmp = out_path.parent / f".{out_path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}{PARTIAL}"
        try:
            with _terminate_as_exit():
                result = _write(store, root_doc, attrs, tmp, out_path, progress)
                os.replace(tmp, out_path)
        finally:
            tmp.unlink(missing_ok=True)
        result.bytes = out_path.stat().st_size
        return result
    finally:
        loc.close()


def remove_stale_partials(out: Path) -> list[Path]:
    """Delete the temporary ``.<name>.<pid>.<random>.partial`` files that packs of ``out``
    killed beyond any cleanup (SIGKILL, power loss) left next to it: those whose process is
    gone. Returns the files removed."""
    removed = []
    for f in out.parent.glob(f".{glob.escape(out.name)}.*{PARTIAL}"):
        pid = f.name[len(out.name) + 2:].split(".", 1)[0]
        if pid.isdigit() and not _alive(int(pid)) and not f.is_symlink() and f.is_file():
            f.unlink(missing_ok=True)
            removed.append(f)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        return True  # another user's process
    return True


@contextmanager
def _terminate_as_exit() -> Iterator[None]:
    """While packing in the main thread, SIGTERM (and SIGHUP) raise ``SystemExit`` instead of
    ending the process on the spot, so the temporary archive is removed on the way out."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    names = [n for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n)]
    old = {n: signal.getsignal(getattr(signal, n)) for n in names}
    for n in names:
        if old[n] in (signal.SIG_DFL, None):
            signal.signal(getattr(signal, n), stop)
    try:
        yield
    finally:
        for n in names:
            if old[n] in (signal.SIG_DFL, None):
                signal.signal(getattr(signal, n), old[n] or signal.SIG_DFL)


def _list_keys(store: Any) -> list[str]:
    async def collect() -> list[str]:
        return [k async for k in store.list()]

    return sorted(sync(collect()))


def _get(store: Any, key: str) -> bytes | None:
    buf = sync(store.get(key, default_buffer_prototype()))
    return None if buf is None else buf.to_bytes()


def _write(store: Any, root_doc: dict[str, Any], attrs: Any, tmp: Path, out: Path,
           progress: OnProgress | None) -> PackResult:
    keys = [k for k in _list_keys(store) if k != MANIFEST and k != limits.DOCUMENT]
    docs = [k for k in keys if k.rsplit("/", 1)[-1] == limits.DOCUMENT]
    nodes: dict[str, dict[str, Any]] = {}
    arrays: set[str] = set()
    for key in docs:
        raw = _get(store, key)
        if raw is None:
            continue  # removed meanwhile
        doc = parse_document(key, raw)
        path = key[: -len(limits.DOCUMENT) - 1]
        nodes[path] = doc
        if doc.get("node_type") == "array":
            arrays.add(path)
    chunks: list[str] = []
    skipped: list[str] = []
    for key in keys:
        if key in docs:
            continue
        parts = key.split("/")
        inside = any("/".join(parts[:n]) in arrays for n in range(1, len(parts)))
        (chunks if inside else skipped).append(key)
    consolidated = {"kind": "inline", "must_understand": False,
                    "metadata": {p: {k: v for k, v in d.items() if k != "consolidated_metadata"}
                                 for p, d in sorted(nodes.items())}}
    top = {**root_doc, "consolidated_metadata": consolidated}
    objects: dict[str, dict[str, Any]] = {}
    total = len(nodes) + len(chunks) + 1
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:

        def put(key: str, data: bytes) -> None:
            zf.writestr(_member(key), data)
            objects[key] = {"size": len(data), "sha256": _sha256(data)}
            if progress is not None:
                progress(Progress("packing", len(objects), total))

        for path, doc in sorted(nodes.items()):
            put(f"{path}/{limits.DOCUMENT}", _dumps(doc, f"{path}/{limits.DOCUMENT}"))
        for key in chunks:
            data = _get(store, key)
            if data is not None:  # a chunk past the commit removed meanwhile by a live writer
                put(key, data)
        put(limits.DOCUMENT, _dumps(top, limits.DOCUMENT))
        ntrace = root_doc.get("attributes", {}).get(ATTR_KEY, {})
        manifest = {
            "ntrace_manifest": MANIFEST_VERSION,
            "format_version": attrs.format_version,
            "status": attrs.status,
            "commit": attrs.commit.to_dict(),
            "packed_by": f"ntrace {_version()}",
            "created": ntrace.get("created"),
            "algorithm": "sha256",
            "objects": objects,
        }
        raw = _dumps(manifest, MANIFEST)
        zf.writestr(_member(MANIFEST), raw)
    return PackResult(out, len(objects), 0, attrs.format_version, attrs.status,
                      attrs.commit.to_dict(), skipped, _sha256(raw))


def _dumps(doc: Any, key: str) -> bytes:
    """Standard JSON only: a document holding NaN or Infinity (which Python's parser accepts
    but JSON does not) is refused, since other readers of the archive would fail on it."""
    try:
        return json.dumps(doc, indent=2, allow_nan=False).encode()
    except ValueError:
        raise InvalidTraceError(f"{key}: holds NaN or Infinity, which JSON does not allow; "
                                "ntrace pack writes standard JSON only (store such values as "
                                "strings, as Zarr does for fill values)") from None


def _version() -> str:
    from ntrace import __version__

    return __version__


# -- verifying -------------------------------------------------------------------------------
def verify_pack(path: str | os.PathLike[str],
                progress: OnProgress | None = None,
                digest: str | None = None) -> VerifyReport:
    """Check every member of a packed trace against its manifest entry (size and SHA-256),
    that no member is missing or unlisted, and that the manifest describes the root. This
    finds accidents (a truncated download, a flipped bit), not tampering: whoever edits a
    member can rewrite the manifest too. ``digest`` pins the manifest: the SHA-256 that
    ``ntrace pack`` printed, obtained from someone you trust; then no member can change."""
    report = VerifyReport(str(path))
    if digest is not None and not (len(digest) == 64 and all(
            c in "0123456789abcdef" for c in digest.lower())):
        raise UsageError(f"--digest must be 64 hexadecimal digits (a SHA-256), found "
                         f"{digest!r}")
    p = Path(path)
    if not p.exists():
        from ntrace.errors import TraceNotFoundError

        raise TraceNotFoundError(f"no packed trace at {p}: the path does not exist")
    if not p.is_file():
        raise UsageError(f"{p} is not a file: verify checks a .zip made by `ntrace pack`")
    try:
        with zipfile.ZipFile(p) as zf:
            infos = zf.infolist()
            try:
                limits.check_zip_members(infos, str(p))
            except InvalidTraceError as exc:
                report.reasons.append(str(exc))
                return report
            _verify(zf, {i.filename: i for i in infos}, report, progress,
                    None if digest is None else digest.lower())
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, struct.error,
            NotImplementedError) as exc:
        report.reasons.append(f"{p}: not a readable zip archive ({one_line(exc)})")
    return report


def _read_member(zf: zipfile.ZipFile, name: str) -> bytes:
    with zf.open(name) as f:
        return f.read()


def _verify(zf: zipfile.ZipFile, infos: dict[str, zipfile.ZipInfo], report: VerifyReport,
            progress: OnProgress | None, digest: str | None) -> None:
    r = report.reasons
    if MANIFEST not in infos:
        r.append(f"no {MANIFEST}: this zip was not made by `ntrace pack` (nothing to verify "
                 "against)")
        return
    if infos[MANIFEST].file_size > MAX_MANIFEST_BYTES:
        r.append(f"{MANIFEST}: larger than {MAX_MANIFEST_BYTES >> 20} MiB; refusing to read it")
        return
    try:
        raw = _read_member(zf, MANIFEST)
    except (zipfile.BadZipFile, EOFError, NotImplementedError, RuntimeError, zlib.error,
            ValueError) as exc:
        r.append(f"{MANIFEST}: unreadable member ({one_line(exc)})")
        return
    if digest is not None and _sha256(raw) != digest:
        r.append(f"{MANIFEST}: sha256 {_sha256(raw)[:16]}… differs from the pinned digest "
                 f"{digest[:16]}… (this is not the archive that was packed)")
        return
    try:
        manifest = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        r.append(f"{MANIFEST}: not a valid JSON document ({one_line(exc)})")
        return
    if not isinstance(manifest, dict):
        r.append(f"{MANIFEST}: expected a JSON object")
        return
    report.manifest = manifest
    version = manifest.get("ntrace_manifest")
    if not isinstance(version, int) or isinstance(version, bool):
        r.append(f"{MANIFEST}: 'ntrace_manifest' must be an integer, found {version!r}")
        return
    if version > MANIFEST_VERSION:
        r.append(f"{MANIFEST}: manifest version {version} needs a newer ntrace (this is "
                 f"{_version()}, which reads manifest version {MANIFEST_VERSION}): "
                 "pip install -U ntrace")
        return
    if manifest.get("algorithm") != "sha256":
        r.append(f"{MANIFEST}: unknown checksum algorithm {manifest.get('algorithm')!r}")
        return
    objects = manifest.get("objects")
    if not isinstance(objects, dict):
        r.append(f"{MANIFEST}: 'objects' must map member names to size and sha256")
        return
    names = sorted(objects)
    for n, name in enumerate(names):
        entry = objects[name]
        if progress is not None:
            progress(Progress("verifying", n + 1, len(names)))
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
            r.append(f"{MANIFEST}: entry for {name!r} has no sha256")
            continue
        info = infos.get(name)
        if info is None:
            r.append(f"{name}: listed in the manifest but missing from the zip")
            continue
        if entry.get("size") != info.file_size:
            r.append(f"{name}: {info.file_size} bytes, the manifest says {entry.get('size')}")
            continue
        digest = hashlib.sha256()
        try:
            with zf.open(info) as f:
                while block := f.read(BLOCK):
                    digest.update(block)
        except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError, RuntimeError,
                ValueError, zlib.error) as exc:
            r.append(f"{name}: unreadable member ({one_line(exc)})")
            continue
        if digest.hexdigest() != entry["sha256"]:
            r.append(f"{name}: sha256 {digest.hexdigest()[:16]}… differs from the manifest's "
                     f"{entry['sha256'][:16]}… (the member was changed or corrupted)")
        if len(r) > 50:
            r.append("too many problems; stopping")
            return
    report.objects = len(names)
    unlisted = sorted(set(infos) - set(objects) - {MANIFEST})
    if unlisted:
        more = f" and {len(unlisted) - 3} more" if len(unlisted) > 3 else ""
        r.append(f"members not listed in the manifest: {', '.join(unlisted[:3])}{more}")
    _check_root(zf, infos, manifest, r)


def _check_root(zf: zipfile.ZipFile, infos: dict[str, zipfile.ZipInfo],
                manifest: dict[str, Any], r: list[str]) -> None:
    info = infos.get(limits.DOCUMENT)
    if info is None:
        r.append("zarr.json: the zip holds no root document")
        return
    if info.file_size > limits.MAX_ROOT_DOCUMENT_BYTES:
        r.append("zarr.json: larger than ntrace reads (spec/security.md)")
        return
    try:
        doc = parse_document(limits.DOCUMENT, _read_member(zf, limits.DOCUMENT))
    except (NtraceError, zipfile.BadZipFile, EOFError, NotImplementedError, RuntimeError,
            zlib.error) as exc:
        r.append(str(exc))
        return
    attrs = (doc.get("attributes") or {}).get(ATTR_KEY) if isinstance(
        doc.get("attributes"), dict) else None
    if not isinstance(attrs, dict):
        r.append("zarr.json: the root carries no 'ntrace' attributes")
        return
    for key in ("format_version", "status", "commit"):
        if attrs.get(key) != manifest.get(key):
            r.append(f"{MANIFEST}: {key} {manifest.get(key)!r} differs from the root's "
                     f"{attrs.get(key)!r}")
