"""Fuzzing the readers: every mutated trace ends in success or one ``NtraceError`` line.

Each case copies a tiny example trace (``spec/examples/valid``), applies one to three seeded
mutations (truncated, flipped, emptied, swapped or deleted chunks; deleted, garbled or
edited ``zarr.json`` documents; changed shapes, chunk shapes and dtypes, huge shapes;
oversized and deeply nested documents; stray ``.partial`` files and directories where files
belong), sometimes zips the result, and then runs ``open_trace``, ``validate_trace``,
``summarize`` and reads every array of the opened trace. Anything but success or an
``NtraceError`` whose message is one line counts as a failure, as does a case that runs past
its time limit or a worker that crashes or runs out of memory.

The cases run in a child process (this file run as a script) with an address-space limit,
so that a crash, a hang or a runaway allocation is reported, not suffered, by pytest. Run
more cases by hand with ``python tests/format/test_fuzz.py --cases 5000 --seed 7``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
TEMPLATES = [REPO / "spec/examples/valid/tiny-mlp.zarr",
             REPO / "spec/examples/valid/tiny-mlp-ce.zarr"]
CASES = 500
SEED = 20170806
CASE_SECONDS = 10.0
MEMORY_LIMIT = 4 << 30  # address space of the fuzzing process


# -- mutations: each takes (rng, trace dir) and returns a description ------------------------
def _files(root: Path, docs: bool) -> list[Path]:
    """Regular files only (never through a link a mutation made: it may lead to /dev/zero)."""
    out = [p for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()]
    return [p for p in out if (p.name == "zarr.json") == docs]


def _replace(path: Path, data: bytes) -> None:
    """Write ``data`` as a new file (never through a hard link to the template)."""
    path.unlink(missing_ok=True)
    path.write_bytes(data)


def _rel(root: Path, p: Path) -> str:
    return str(p.relative_to(root))


def m_chunk_truncate(rng: random.Random, root: Path) -> str:
    p = rng.choice(_files(root, False))
    raw = p.read_bytes()
    n = rng.randrange(len(raw)) if raw else 0
    _replace(p, raw[:n])
    return f"truncate {_rel(root, p)} to {n}"


def m_chunk_empty(rng: random.Random, root: Path) -> str:
    p = rng.choice(_files(root, False))
    _replace(p, b"")
    return f"empty {_rel(root, p)}"


def m_chunk_flip(rng: random.Random, root: Path) -> str:
    p = rng.choice(_files(root, False))
    raw = bytearray(p.read_bytes())
    for _ in range(rng.randint(1, 8)):
        if raw:
            raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
    _replace(p, bytes(raw))
    return f"flip bits in {_rel(root, p)}"


def m_chunk_header(rng: random.Random, root: Path) -> str:
    """Forge the blosc header (decoded size) or any of the first 16 bytes."""
    p = rng.choice(_files(root, False))
    raw = bytearray(p.read_bytes())
    if len(raw) >= 16:
        i = rng.randrange(16)
        raw[i] = rng.randrange(256)
        if rng.random() < 0.5:
            raw[4:8] = rng.choice([0, 1, 2**31 - 1, 2**32 - 1, len(raw) * 1000]).to_bytes(
                4, "little")
    _replace(p, bytes(raw))
    return f"forge header of {_rel(root, p)}"


def m_chunk_delete(rng: random.Random, root: Path) -> str:
    p = rng.choice(_files(root, False))
    p.unlink()
    return f"delete {_rel(root, p)}"


def m_chunk_garbage(rng: random.Random, root: Path) -> str:
    p = rng.choice(_files(root, False))
    _replace(p, rng.randbytes(rng.choice([1, 4, 15, 16, 17, 100, 5000])))
    return f"garbage in {_rel(root, p)}"


def m_chunk_swap(rng: random.Random, root: Path) -> str:
    files = _files(root, False)
    a, b = rng.choice(files), rng.choice(files)
    _replace(a, b.read_bytes())
    return f"copy {_rel(root, b)} over {_rel(root, a)}"


def m_doc_delete(rng: random.Random, root: Path) -> str:
    p = rng.choice(_files(root, True))
    p.unlink()
    return f"delete {_rel(root, p)}"


def m_doc_garble(rng: random.Random, root: Path) -> str:
    p = rng.choice(_files(root, True))
    raw = bytearray(p.read_bytes())
    how = rng.randrange(4)
    if how == 0:
        raw = raw[: rng.randrange(len(raw))]
    elif how == 1:
        for _ in range(rng.randint(1, 6)):
            raw[rng.randrange(len(raw))] = rng.randrange(256)
    elif how == 2:
        raw = bytearray(rng.choice([b"", b"null", b"[]", b"42", b'"x"', b"\xff\xfe", b"{",
                                    b'{"node_type": "array"}', b'{"node_type": "group"}',
                                    b'{"zarr_format": 2}', b"NaN"]))
    else:
        i = rng.randrange(len(raw))
        raw[i:i] = rng.choice([b",", b"}", b"]", b'"', b"\\", b"\x00", b"1e999"])
    _replace(p, bytes(raw))
    return f"garble {_rel(root, p)} ({how})"


WEIRD: list[Any] = [None, True, False, 0, -1, 1, 2**31, 2**63, 10**30, -(10**30), 0.5, 1e308,
                    -1e308, "", "x", "1.0", "2.0", "1.99", "9" * 50, "²", [], [0], [-1], {},
                    {"a": 1}, [[[[[]]]]], "NaN", "Infinity"]


def _walk(doc: Any, rng: random.Random, depth: int = 0) -> tuple[Any, Any] | None:
    """A random (container, key) inside ``doc``."""
    slots: list[tuple[Any, Any]] = []
    if isinstance(doc, dict):
        slots = [(doc, k) for k in doc]
    elif isinstance(doc, list):
        slots = [(doc, i) for i in range(len(doc))]
    if not slots:
        return None
    container, key = rng.choice(slots)
    child = container[key]
    if isinstance(child, dict | list) and child and rng.random() < 0.7:
        deeper = _walk(child, rng, depth + 1)
        if deeper is not None:
            return deeper
    return container, key


def _edit_json(p: Path, fn: Callable[[dict[str, Any]], str]) -> str:
    doc = json.loads(p.read_text())
    what = fn(doc)
    _replace(p, json.dumps(doc).encode())
    return what


def m_doc_edit(rng: random.Random, root: Path) -> str:
    p = rng.choice(_files(root, True))

    def edit(doc: dict[str, Any]) -> str:
        slot = _walk(doc, rng)
        if slot is None:
            return "nothing"
        container, key = slot
        if isinstance(container, dict) and rng.random() < 0.3:
            del container[key]
            return f"delete {key!r}"
        value = rng.choice(WEIRD)
        container[key] = value
        return f"set {key!r} = {value!r}"

    return f"edit {_rel(root, p)}: " + _edit_json(p, edit)


def m_attrs_edit(rng: random.Random, root: Path) -> str:
    """Edit the ntrace document of a group (most often the root)."""
    docs = [d for d in _files(root, True) if "node_type\": \"group" in d.read_text()
            or '"node_type": "group"' in d.read_text()]
    p = root / "zarr.json" if rng.random() < 0.6 else rng.choice(docs)

    def edit(doc: dict[str, Any]) -> str:
        nt = doc.get("attributes", {}).get("ntrace")
        if not isinstance(nt, dict):
            return "no ntrace"
        slot = _walk(nt, rng)
        if slot is None:
            return "nothing"
        container, key = slot
        old = container[key]
        if isinstance(old, int) and not isinstance(old, bool) and rng.random() < 0.6:
            value: Any = rng.choice([old + 1, old - 1, old * 1000, 2**40, 2**62, 0, -old])
        elif rng.random() < 0.2 and isinstance(container, dict):
            del container[key]
            return f"delete ntrace {key!r}"
        else:
            value = rng.choice(WEIRD)
        container[key] = value
        return f"set ntrace {key!r} = {value!r}"

    return f"edit {_rel(root, p)}: " + _edit_json(p, edit)


def _arrays(root: Path) -> list[Path]:
    return [d for d in _files(root, True) if '"node_type": "array"' in d.read_text()]


def m_shape(rng: random.Random, root: Path) -> str:
    p = rng.choice(_arrays(root))

    def edit(doc: dict[str, Any]) -> str:
        field = rng.choice(["shape", "chunks", "dtype", "dims", "codecs", "fill"])
        if field == "shape" and doc["shape"]:
            i = rng.randrange(len(doc["shape"]))
            doc["shape"][i] = rng.choice([0, doc["shape"][i] + 1, max(doc["shape"][i] - 1, 0),
                                          2**20, 2**28, 2**40, 2**62, 2**64, -1])
        elif field == "shape":
            doc["shape"] = [rng.choice([1, 2**40])]
        elif field == "chunks":
            cs = doc["chunk_grid"]["configuration"]["chunk_shape"]
            i = rng.randrange(len(cs))
            cs[i] = rng.choice([0, 1, cs[i] * 2, 2**30, 2**62, -1])
        elif field == "dtype":
            doc["data_type"] = rng.choice(["float64", "int32", "int64", "uint8", "float16",
                                           "complex128", "bool", "string", "garbage",
                                           {"name": "x"}, 3])
        elif field == "dims":
            doc["dimension_names"] = rng.choice([None, [], ["x"] * len(doc["shape"]),
                                                 doc["dimension_names"][::-1], 7])
        elif field == "codecs":
            doc["codecs"] = rng.choice([[], [{"name": "bytes"}], doc["codecs"][:2],
                                        doc["codecs"][::-1], [{"name": "pickle"}],
                                        doc["codecs"] + [{"name": "gzip",
                                                          "configuration": {"level": 1}}]])
        else:
            doc["fill_value"] = rng.choice([None, "x", 1e308, [1, 2], "Infinity"])
        return field

    return f"array {_rel(root, p)}: " + _edit_json(p, edit)


def m_node_type(rng: random.Random, root: Path) -> str:
    p = rng.choice(_files(root, True))

    def edit(doc: dict[str, Any]) -> str:
        doc["node_type"] = "group" if doc.get("node_type") == "array" else "array"
        return doc["node_type"]

    return f"node type of {_rel(root, p)}: " + _edit_json(p, edit)


def m_huge_doc(rng: random.Random, root: Path) -> str:
    p = rng.choice(_files(root, True))
    raw = p.read_bytes()
    if rng.random() < 0.5:
        _replace(p, raw + b" " * (17 << 20))
        return f"pad {_rel(root, p)} past the limit"
    nest = rng.choice([70, 5000, 200_000])
    doc = json.loads(raw)
    doc.setdefault("attributes", {})["deep"] = "@"
    text = json.dumps(doc).replace('"@"', "[" * nest + "]" * nest)
    _replace(p, text.encode())
    return f"nest {_rel(root, p)} {nest} deep"


def m_stray(rng: random.Random, root: Path) -> str:
    p = rng.choice(_files(root, rng.random() < 0.3))
    how = rng.randrange(3)
    if how == 0:
        (p.parent / f"{p.name}.deadbeef.partial").write_bytes(rng.randbytes(10))
        return f"partial file next to {_rel(root, p)}"
    if how == 1:
        p.unlink()
        p.mkdir()
        return f"directory instead of {_rel(root, p)}"
    (p.parent / "zarr.json.deadbeef.partial").write_bytes(b"{")
    (p.parent / "junk").write_bytes(b"junk")
    return f"junk next to {_rel(root, p)}"


def m_consolidated(rng: random.Random, root: Path) -> str:
    p = root / "zarr.json"

    def edit(doc: dict[str, Any]) -> str:
        cm = doc.get("consolidated_metadata")
        if not isinstance(cm, dict):
            doc["consolidated_metadata"] = rng.choice([None, 1, {"metadata": {"../x": {}}}])
            return "set"
        md = cm.get("metadata") or {}
        if md:
            key = rng.choice(sorted(md))
            md[key] = rng.choice(WEIRD)
            md["../../etc"] = {}
        return "edit entries"

    return "consolidated: " + _edit_json(p, edit)


def m_link(rng: random.Random, root: Path) -> str:
    """Replace a document, chunk or directory by a link (outside, to /dev/zero, to a file of
    the trace), a FIFO or an empty directory link loop."""
    p = rng.choice(_files(root, rng.random() < 0.3))
    if rng.random() < 0.3 and p.parent != root:
        p = p.parent  # a whole directory
    outside = root.parent / f"{root.name}-outside"
    outside.mkdir(exist_ok=True)
    (outside / "secret").write_bytes(b"secret " * 64)
    target = rng.choice(["/dev/zero", str(outside / "secret"), str(outside), "/etc/passwd",
                         "fifo", str(root / "zarr.json"), "loop"])
    if p.is_dir():
        shutil.rmtree(p)
    else:
        p.unlink()
    if target == "fifo":
        os.mkfifo(p)
    elif target == "loop":
        os.symlink(p.name, p)
    else:
        os.symlink(target, p)
    return f"{_rel(root, p)} → {target}"


MUTATIONS: list[Callable[[random.Random, Path], str]] = [
    m_chunk_truncate, m_chunk_empty, m_chunk_flip, m_chunk_header, m_chunk_delete,
    m_chunk_garbage, m_chunk_swap, m_doc_delete, m_doc_garble, m_doc_edit, m_doc_edit,
    m_attrs_edit, m_attrs_edit, m_attrs_edit, m_shape, m_shape, m_shape, m_node_type,
    m_huge_doc, m_stray, m_consolidated, m_link, m_link,
]


# -- zip variants --------------------------------------------------------------------------------
def zip_dir(src: Path, out: Path, rng: random.Random) -> str:
    """Zip a (mutated) trace directory in ZipStore layout, sometimes breaking the zip."""
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zf:
        for p in sorted(src.rglob("*")):
            if p.is_file() and not p.is_symlink():
                zf.write(p, str(p.relative_to(src)))
        how = rng.randrange(6)
        if how == 0:
            zf.writestr("../evil", b"x")
        elif how == 1:
            zf.writestr("/abs/zarr.json", b"{}")
    raw = bytearray(out.read_bytes())
    if how == 2:
        raw = raw[: rng.randrange(len(raw))]
    elif how == 3:
        for _ in range(rng.randint(1, 8)):
            raw[rng.randrange(len(raw))] ^= 0xFF
    out.write_bytes(bytes(raw))
    return f"zipped ({how})"


# -- running one case ----------------------------------------------------------------------------
class CaseTimeout(BaseException):
    """Raised by the alarm when a case runs past ``CASE_SECONDS``."""


def _on_alarm(signum: int, frame: Any) -> None:
    raise CaseTimeout()


def _check(label: str, fn: Callable[[], Any], problems: list[str]) -> Any:
    from ntrace.errors import NtraceError

    try:
        return fn()
    except NtraceError as exc:
        msg = str(exc)
        if "\n" in msg or not msg:
            problems.append(f"{label}: NtraceError message is not one line: {msg!r}")
        return None
    except CaseTimeout:
        raise
    except BaseException as exc:  # noqa: BLE001 - what the fuzzer looks for
        tb = traceback.format_exc(limit=-4)
        problems.append(f"{label}: {type(exc).__name__}: {exc}\n{tb}")
        return None


def run_case(index: int, seed: int, work: Path, templates: list[Path]) -> dict[str, Any]:
    from ntrace.format.reader import open_trace
    from ntrace.format.summary import summarize
    from ntrace.format.validate import validate_trace

    rng = random.Random(seed * 1_000_003 + index)
    template = templates[index % len(templates)]
    case = work / f"case{index}.zarr"
    shutil.copytree(template, case, copy_function=os.link)
    steps = []
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        mutation = rng.choice(MUTATIONS)
        try:
            steps.append(mutation(rng, case))
        except (IndexError, KeyError, TypeError, ValueError, AttributeError, OSError):
            steps.append(f"{mutation.__name__} not applicable")
    target: Path = case
    if rng.random() < 0.2:
        target = work / f"case{index}.zip"
        steps.append(zip_dir(case, target, rng))
    problems: list[str] = []
    report = None
    signal.setitimer(signal.ITIMER_REAL, CASE_SECONDS)
    start = time.perf_counter()
    try:
        report = _check("validate_trace", lambda: validate_trace(target), problems)
        if report is not None:
            for reason in report.reasons:
                if "\n" in reason:
                    problems.append(f"validate_trace: reason is not one line: {reason!r}")
        _check("summarize", lambda: summarize(target), problems)
        tr = _check("open_trace", lambda: open_trace(target), problems)
        if tr is not None:
            for path in tr.layouts:
                _check(f"read {path}", lambda p=path: tr.read(p), problems)
            tr.close()
    except CaseTimeout:
        problems.append(f"timeout: still running after {CASE_SECONDS} s")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    shutil.rmtree(case, ignore_errors=True)
    shutil.rmtree(work / f"case{index}.zarr-outside", ignore_errors=True)
    if target != case:
        target.unlink(missing_ok=True)
    return {"case": index, "steps": steps, "problems": problems,
            "seconds": time.perf_counter() - start, "verdict": (
                "invalid" if report is not None and not report.ok else
                "valid" if report is not None else "refused")}


def fuzz(cases: int, seed: int, out: Any = None) -> dict[str, Any]:
    signal.signal(signal.SIGALRM, _on_alarm)
    failures, verdicts = [], {"valid": 0, "invalid": 0, "refused": 0}
    start = time.perf_counter()
    shm = Path("/dev/shm")  # many small directories: tmpfs makes them cheap
    base = shm if shm.is_dir() and os.access(shm, os.W_OK) else None
    with tempfile.TemporaryDirectory(prefix="ntrace-fuzz-", dir=base) as tmp:
        templates = []
        for t in TEMPLATES:  # cases hard-link these copies (same file system)
            templates.append(Path(tmp) / f"template-{t.name}")
            shutil.copytree(t, templates[-1])
        for i in range(cases):
            if out is not None:  # which case is running, in case the process dies in it
                print(json.dumps({"running": i}), file=out, flush=True)
            result = run_case(i, seed, Path(tmp), templates)
            verdicts[result["verdict"]] += 1
            if result["problems"]:
                failures.append(result)
    return {"cases": cases, "seed": seed, "failures": failures, "verdicts": verdicts,
            "seconds": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=CASES)
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--memory", type=int, default=MEMORY_LIMIT, help="address-space limit")
    args = ap.parse_args(argv)
    if args.memory:
        resource.setrlimit(resource.RLIMIT_AS, (args.memory, args.memory))
    summary = fuzz(args.cases, args.seed, sys.stdout)
    print(json.dumps({"summary": summary}), flush=True)
    return 1 if summary["failures"] else 0


# -- the test ------------------------------------------------------------------------------------
def test_fuzzed_traces_fail_only_with_one_line_ntrace_errors(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, __file__, "--cases", str(CASES), "--seed", str(SEED)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    lines = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    done = [x["summary"] for x in lines if "summary" in x]
    if not done:
        running = [x["running"] for x in lines if "running" in x]
        raise AssertionError(f"the fuzzing process died (exit {proc.returncode}) in case "
                             f"{running[-1] if running else '?'}: {proc.stderr[-3000:]}")
    summary = done[0]
    shown = "\n\n".join(f"case {f['case']} {f['steps']}:\n" + "\n".join(f["problems"])
                        for f in summary["failures"][:5])
    assert not summary["failures"], f"{len(summary['failures'])} failing cases:\n{shown}"
    assert summary["cases"] >= 500
    v = summary["verdicts"]
    assert v["invalid"] + v["refused"] > summary["cases"] // 2, v  # the mutations bite


if __name__ == "__main__":
    sys.exit(main())


# -- targeted cases, pinned (candidates for spec/examples/invalid) --------------------------------
def _corrupt_json(p: Path) -> None:
    doc = p / "layers/fc1/zarr.json"
    _replace(doc, doc.read_bytes()[:-20])


def _empty_chunk(p: Path) -> None:
    _replace(p / "layers/fc1/weight/c/0/0/0", b"")


def _wrong_size_chunk(p: Path) -> None:
    # a well-formed chunk (valid blosc, valid crc32c) of another array: wrong decoded size
    _replace(p / "layers/fc1/bias/c/0/0", (p / "layers/fc2/weight/c/0/0/0").read_bytes())


TARGETED = {
    "corrupt-json": (_corrupt_json, True, "layers/fc1/zarr.json: not a valid JSON document "
                                          "(JSONDecodeError: "),
    "empty-chunk": (_empty_chunk, False, "layers/fc1/weight/c/0/0/0: chunk of 0 bytes is "
                                         "shorter than a blosc header (truncated)"),
    "wrong-size-chunk": (_wrong_size_chunk, False, "layers/fc1/bias/c/0/0: the chunk's blosc "
                                                   "header declares a decoded size other than "
                                                   "the 512 bytes a chunk of this array holds"),
}


def test_targeted_cases_give_pinned_reasons(tmp_path: Path) -> None:
    import pytest

    from ntrace.errors import InvalidTraceError
    from ntrace.format.reader import open_trace
    from ntrace.format.validate import validate_trace

    for name, (mutate, structural, reason) in TARGETED.items():
        t = tmp_path / f"{name}.zarr"
        shutil.copytree(TEMPLATES[0], t)
        doc = json.loads((t / "zarr.json").read_text())
        del doc["consolidated_metadata"]  # as the spec examples: the change is the only one
        (t / "zarr.json").write_text(json.dumps(doc))
        mutate(t)
        reasons = validate_trace(t).reasons
        assert reasons and reason in reasons[0], (name, reasons)
        if structural:
            with pytest.raises(InvalidTraceError, match=r"layers/fc1/zarr\.json"):
                open_trace(t)
        else:
            with open_trace(t) as tr:
                path = reason.split("/c/")[0]
                with pytest.raises(InvalidTraceError, match=reason.split(": ")[1][:30]):
                    tr.read(path)
