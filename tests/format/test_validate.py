"""validate_trace and open_trace on the example traces of spec/examples, and `ntrace validate`.

Every invalid example is pinned to the reason it must produce, so that a validator that
rejects it for another reason (or a new example without a test) fails here.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from ntrace.cli import main
from ntrace.errors import InvalidTraceError, TraceNotFoundError, UnsupportedVersionError
from ntrace.format.reader import open_trace
from ntrace.format.validate import validate_trace

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "spec" / "examples"
MAKE_EXAMPLES = REPO / "tools" / "make_examples.py"

VALID = ["tiny-mlp", "tiny-mlp-ce", "running-uncommitted-rows", "newer-minor-version"]

# the first reason validate_trace must give for each invalid example
REASON = {
    "missing-array": "layers/fc1/jacobian: array is missing",
    "wrong-dims": "layers/fc1/input: dimension_names ['taylor_round', 'sample', 'feature'], "
                  "expected ['taylor_round', 'sample', 'in_feature']",
    "wrong-dtype": "taylor/round_index: dtype int32, expected int64",
    "inconsistent-length": "taylor/sample_loss: holds 3 rows along taylor_round but the commit "
                           "record counts 4",
    "extra-rows-complete": "loss: 15 rows along round in a complete trace, expected exactly the "
                           "12 committed",
    "packed-length-mismatch": "layers/fc1/mask: shape (4, 2, 4), expected (N, 2, 1)",
    "unknown-major-version": "trace format version 2.0 is not readable by ntrace",
    "corrupt-chunk": "layers/fc1/weight: row 0 unreadable: ValueError: Stored and computed "
                     "checksum do not match",
    "corrupt-json": "layers/fc1/zarr.json: not a valid JSON document (JSONDecodeError: ",
    "empty-chunk": "layers/fc1/weight/c/0/0/0: chunk of 0 bytes is shorter than a blosc header "
                   "(truncated)",
    "wrong-size-chunk": "layers/fc1/bias/c/0/0: the chunk's blosc header declares a decoded "
                        "size other than the 512 bytes a chunk of this array holds",
    "schema-violation": "loss.id: expected one of mse, cross_entropy, bce_with_logits, nll, "
                        "found 'hinge'",
    "negative-taylor-every": "sampling.taylor_every: expected an integer >= 1, found -3",
    "world-size-indivisible": "sampling.samples_per_round: must be a multiple of world_size "
                              "(3), found 2",
    "group-attributes-missing": "taylor group: no 'ntrace' attribute",
    "mask-disagrees": "layers/fc1/mask: 1 states in Taylor round 0 disagree with W x + b > 0",
    "sample-loss-tampered": "taylor/sample_loss: Taylor round 1 disagrees with the mse loss",
    "pad-bits-set": "layers/fc1/mask: pad bits set in Taylor round 1",
    "round-index-breaks-policy": "taylor/round_index: round 4 breaks the sampling policy "
                                 "(every 3, offset 0)",
    "non-finite-weight": "layers/fc2/weight: non-finite value in Taylor round 2",
    "aborted-run": "run aborted: loss is nan at round 12",
    "tracked-unsorted": "layers/fc1/tracked: must be sorted, unique and in [0, 4)",
    "input-not-activation": "layers/fc2/input: Taylor round 0 is not the activation of the "
                            "previous layer's pre-activation",
    "target-out-of-range": "taylor/target: class index outside [0, 3) in Taylor round 0",
    "probe-size-mismatch": "probe/sample_index: holds 5 probe points but sampling.probe_size "
                           "is 6",
}

# open_trace checks metadata only: it must refuse these, and open the rest
STRUCTURAL = {"missing-array", "wrong-dims", "wrong-dtype", "inconsistent-length",
              "extra-rows-complete", "packed-length-mismatch", "unknown-major-version",
              "schema-violation", "negative-taylor-every", "world-size-indivisible",
              "group-attributes-missing",
              "corrupt-json",
              "probe-size-mismatch"}


def example(name: str) -> Path:
    sub = "valid" if name in VALID else "invalid"
    return EXAMPLES / sub / f"{name}.zarr"


def test_every_example_on_disk_is_pinned_here() -> None:
    on_disk = {p.stem for p in (EXAMPLES / "invalid").glob("*.zarr")}
    assert on_disk == set(REASON)
    assert {p.stem for p in (EXAMPLES / "valid").glob("*.zarr")} == set(VALID)
    assert set(STRUCTURAL) <= set(REASON)


def test_examples_are_small() -> None:
    total = sum(f.stat().st_size for f in EXAMPLES.rglob("*") if f.is_file())
    assert total < 1_000_000


# -- validate_trace --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", VALID)
def test_valid_examples_validate(name: str) -> None:
    report = validate_trace(example(name))
    assert report.reasons == []
    assert report.ok and report.attrs is not None
    assert report.checked_rows == report.attrs.commit.taylor_rounds + report.attrs.commit.snapshots


@pytest.mark.parametrize("name", sorted(REASON))
def test_invalid_examples_fail_with_their_reason(name: str) -> None:
    report = validate_trace(example(name))
    assert not report.ok
    assert REASON[name] in report.reasons[0], report.reasons
    assert len(report.reasons) <= 2, report.reasons  # one mutation, one (or two) findings


def test_quick_validation_skips_the_data() -> None:
    assert validate_trace(example("mask-disagrees"), deep=False).ok
    assert not validate_trace(example("wrong-dims"), deep=False).ok


def test_validate_reports_progress() -> None:
    seen: list[tuple[int, int]] = []
    validate_trace(example("tiny-mlp"), progress=lambda p: seen.append((p.done, p.total)))
    assert seen[-1] == (10, 10)  # 4 Taylor rounds + 6 snapshots


def test_missing_trace_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(TraceNotFoundError, match="does not exist"):
        validate_trace(tmp_path / "absent.zarr")
    with pytest.raises(TraceNotFoundError, match="holds no zarr.json"):
        validate_trace(tmp_path)


# -- open_trace ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", VALID)
def test_open_trace_reads_valid_examples(name: str) -> None:
    tr = open_trace(example(name))
    assert tr.read("loss").shape == (tr.rounds,)


def test_open_trace_reads_only_committed_rows() -> None:
    import numpy as np

    tr = open_trace(example("running-uncommitted-rows"))
    assert tr.attrs.status == "running" and (tr.rounds, tr.taylor_rounds, tr.snapshots) == (8, 3, 4)
    assert tr.zarr_array("loss").shape[0] == 12  # rows past the commit exist on disk ...
    loss = tr.read("loss")
    assert loss.shape == (8,) and np.isfinite(loss).all()  # ... and stay hidden
    assert tr.read("taylor/round_index").tolist() == [0, 3, 6]
    assert tr.read("probe/round_index").tolist() == [0, 2, 4, 6]
    with pytest.raises(IndexError):
        tr.read("taylor/sample_loss", 3)


@pytest.mark.parametrize("name", sorted(STRUCTURAL))
def test_open_trace_refuses_structurally_invalid_examples(name: str) -> None:
    with pytest.raises(InvalidTraceError) as info:
        open_trace(example(name))
    assert REASON[name] in str(info.value)
    assert REASON[name] in info.value.reasons[0]


@pytest.mark.parametrize("name", sorted(set(REASON) - STRUCTURAL))
def test_open_trace_opens_examples_broken_only_in_their_data(name: str) -> None:
    open_trace(example(name))  # opening reads metadata only; validate_trace finds the problem


def test_open_trace_refuses_a_newer_major_version_naming_the_upgrade() -> None:
    with pytest.raises(UnsupportedVersionError, match=r"needs a newer ntrace \(this is 0\.1\.0, "
                       r"which reads format 1\.x\): pip install -U ntrace"):
        open_trace(example("unknown-major-version"))


# -- consolidated metadata is never relied upon ----------------------------------------------------
@pytest.fixture
def stale_consolidated(tmp_path: Path) -> Path:
    """tiny-mlp (which keeps the recorder's consolidated metadata) with fc1/input's own
    zarr.json changed and the consolidated copy left as it was."""
    path = tmp_path / "stale.zarr"
    shutil.copytree(example("tiny-mlp"), path)
    assert "consolidated_metadata" in json.loads((path / "zarr.json").read_text())
    meta = path / "layers/fc1/input/zarr.json"
    doc = json.loads(meta.read_text())
    doc["dimension_names"] = ["taylor_round", "sample", "feature"]
    meta.write_text(json.dumps(doc, indent=2))
    return path


def test_validate_reads_the_nodes_not_consolidated_metadata(stale_consolidated: Path) -> None:
    reasons = validate_trace(stale_consolidated).reasons
    assert REASON["wrong-dims"] in reasons[0]
    assert any("consolidated metadata disagrees with the node documents of layers/fc1/input"
               in r for r in reasons)


def test_open_trace_reads_the_nodes_not_consolidated_metadata(stale_consolidated: Path) -> None:
    with pytest.raises(InvalidTraceError, match="dimension_names"):
        open_trace(stale_consolidated)


# -- ntrace validate -------------------------------------------------------------------------------
def test_cli_validate_accepts_a_valid_trace() -> None:
    result = CliRunner().invoke(main, ["validate", str(example("tiny-mlp"))])
    assert result.exit_code == 0, result.output
    assert "valid:" in result.stdout and "4 Taylor rounds, 6 snapshots" in result.stdout
    result = CliRunner().invoke(main, ["validate", str(example("running-uncommitted-rows"))])
    assert result.exit_code == 0 and "status running: committed prefix only" in result.stdout


@pytest.mark.parametrize("name", ["input-not-activation", "aborted-run", "corrupt-chunk",
                                  "unknown-major-version"])
def test_cli_validate_lists_every_reason_and_exits_1(name: str) -> None:
    result = CliRunner().invoke(main, ["validate", str(example(name))])
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[0].startswith(f"invalid: {example(name)}: ")
    listed = [line[4:] for line in lines if line.startswith("  - ")]
    assert listed == validate_trace(example(name)).reasons
    assert REASON[name] in listed[0]


def test_cli_validate_quick() -> None:
    result = CliRunner().invoke(main, ["validate", "--quick", str(example("mask-disagrees"))])
    assert result.exit_code == 0


def test_cli_validate_missing_trace(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["validate", str(tmp_path / "nope.zarr")])
    assert result.exit_code == TraceNotFoundError.exit_code
    assert result.stderr.strip().startswith("error: no trace at")
    assert "Traceback" not in result.output


# -- regenerating the examples gives the same verdicts ---------------------------------------------
def _ntrace_docs(trace: Path) -> dict[str, object]:
    out = {}
    for meta in sorted(trace.rglob("zarr.json")):
        try:
            doc = json.loads(meta.read_text())
        except ValueError:  # the corrupt-json example: compare the bytes instead
            out[meta.parent.relative_to(trace).as_posix()] = meta.read_bytes()
            continue
        out[meta.parent.relative_to(trace).as_posix()] = (doc.get("attributes") or {}).get(
            "ntrace")
    return out


def test_regenerated_examples_give_the_same_verdicts(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(MAKE_EXAMPLES), "--out", str(tmp_path)], check=True,
                   capture_output=True, timeout=120)
    assert (tmp_path / "README.md").read_text() == (EXAMPLES / "README.md").read_text()
    for name in [*VALID, *REASON]:
        sub = "valid" if name in VALID else "invalid"
        fresh = tmp_path / sub / f"{name}.zarr"
        report = validate_trace(fresh)
        if name in VALID:
            assert report.ok, (name, report.reasons)
        else:
            assert REASON[name] in report.reasons[0], (name, report.reasons)
        # the committed examples are what the script writes today (attribute documents and
        # node list; chunk bytes may differ with the torch version)
        assert _ntrace_docs(fresh) == _ntrace_docs(example(name)), name


# -- checks across documents, on one-change copies made here ---------------------------------------
def _tools() -> Any:
    """tools/make_examples.py, whose editing helpers made the examples."""
    import importlib.util

    if "make_examples" not in sys.modules:
        spec = importlib.util.spec_from_file_location("make_examples", MAKE_EXAMPLES)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["make_examples"] = module
        spec.loader.exec_module(module)
    return sys.modules["make_examples"]


def _in_features(p: Path) -> None:
    _tools().edit_attrs(p, "layers/fc2", lambda a: a.update(in_features=5))


def _output_size(p: Path) -> None:
    _tools().edit_attrs(p, "", lambda a: a.update(output_size=4))


def _identity_jacobian(p: Path) -> None:
    _tools().edit_attrs(p, "layers/fc1", lambda a: a.update(jacobian="identity"))


def _probe_units(p: Path) -> None:
    _tools().edit_attrs(p, "probe", lambda a: a["units"][0].update(count=3))


def _codec(p: Path) -> None:
    def f(doc: dict[str, Any]) -> None:
        doc["codecs"][1] = {"name": "zstd", "configuration": {"level": 0, "checksum": False}}
    _tools().edit_array_meta(p, "loss", f)


def _no_probe(p: Path) -> None:
    shutil.rmtree(p / "probe")


def _probe_input(p: Path) -> None:
    import numpy as np

    def f(x: np.ndarray) -> None:
        x[2, 3] = np.nan
    _tools().edit_rows(p, "probe/input", f)


CROSS = {
    "in-features": (_in_features, "layers/fc2: in_features 5 differs from out_features 4 of "
                                  "the previous layer fc1"),
    "output-size": (_output_size, "root output_size 4 differs from out_features 3 of the last "
                                  "layer fc2"),
    "identity-jacobian": (_identity_jacobian, "layers/fc1: jacobian 'identity' is only allowed "
                                              "on the last layer"),
    "probe-units": (_probe_units, "probe: units [('fc1', 3)] do not list every layer"),
    "codec": (_codec, "loss: codecs ['zstd'] are not Zarr v3 core codecs"),
    "no-probe": (_no_probe, "probe: group is missing but sampling.probe_size is 5"),
    "probe-input": (_probe_input, "probe/input: non-finite value"),
}


@pytest.mark.parametrize("case", sorted(CROSS))
def test_checks_across_documents(tmp_path: Path, case: str) -> None:
    mutate, reason = CROSS[case]
    path = tmp_path / f"{case}.zarr"
    shutil.copytree(example("tiny-mlp"), path)
    mutate(path)
    _tools().drop_consolidated(path)
    reasons = validate_trace(path).reasons
    assert any(reason in r for r in reasons), reasons


@pytest.mark.parametrize("opener", [open_trace, validate_trace])
def test_opening_parses_the_module_groups_once(opener: Any,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from ntrace.format import reader

    calls: list[str] = []
    real = reader.load_modules

    def counting(root: Any, attrs: Any) -> Any:
        calls.append("load_modules")
        return real(root, attrs)

    monkeypatch.setattr(reader, "load_modules", counting)
    result = opener(example("tiny-mlp"))
    if hasattr(result, "close"):
        result.close()
    assert len(calls) == 1
