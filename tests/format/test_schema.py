"""The attribute documents against the JSON Schemas of spec/schema and the parsers of
ntrace.format.metadata: both must accept what the writer writes and refuse the same mistakes."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from ntrace.errors import InvalidTraceError, UnsupportedVersionError
from ntrace.format.metadata import (
    FORMAT_VERSION,
    Activation,
    Commit,
    LayerAttrs,
    LossSpec,
    ModuleAttrs,
    ProbeUnits,
    Sampling,
    TraceAttrs,
)
from ntrace.format.reader import open_trace

REPO = Path(__file__).resolve().parents[2]
SCHEMA_DIR = REPO / "spec" / "schema"
VALID = sorted((REPO / "spec" / "examples" / "valid").glob("*.zarr"))
KINDS = ("trace", "layer", "probe", "group", "module", "checkpoint")
PARSERS: dict[str, Any] = {"trace": TraceAttrs, "layer": LayerAttrs, "probe": ProbeUnits,
                          "module": ModuleAttrs}


def _validator(kind: str) -> Draft202012Validator:
    schema = json.loads((SCHEMA_DIR / f"{kind}.json").read_text())
    return Draft202012Validator(schema)


VALIDATORS = {kind: _validator(kind) for kind in KINDS}


def schema_errors(kind: str, doc: Any) -> list[str]:
    return [e.message for e in VALIDATORS[kind].iter_errors(doc)]


def node_docs(trace: Path) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(node path, schema kind, 'ntrace' document) of every group of a trace on disk, read
    from the nodes' own zarr.json files."""
    for meta in sorted(trace.rglob("zarr.json")):
        doc = json.loads(meta.read_text())
        if doc.get("node_type") != "group":
            continue
        node = meta.parent.relative_to(trace).as_posix()
        attrs = doc["attributes"]["ntrace"]
        kind = {"trace": "trace", "layer": "layer", "probe": "probe", "module": "module",
                "checkpoint": "checkpoint"}.get(attrs["node"], "group")
        yield ("" if node == "." else node), kind, attrs


def trace_doc() -> dict[str, Any]:
    return copy.deepcopy(json.loads((VALID[0] / "zarr.json").read_text())["attributes"]["ntrace"])


def layer_doc() -> dict[str, Any]:
    return copy.deepcopy(json.loads((VALID[0] / "layers/fc1/zarr.json").read_text())
                         ["attributes"]["ntrace"])


def probe_doc() -> dict[str, Any]:
    return copy.deepcopy(json.loads((VALID[0] / "probe/zarr.json").read_text())
                         ["attributes"]["ntrace"])


DOCS = {"trace": trace_doc, "layer": layer_doc, "probe": probe_doc}


def test_examples_exist() -> None:
    assert {p.name for p in VALID} >= {"tiny-mlp.zarr", "tiny-mlp-ce.zarr"}


# -- the schemas themselves ------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_schema_is_a_versioned_draft_2020_12_schema(kind: str) -> None:
    schema = json.loads((SCHEMA_DIR / f"{kind}.json").read_text())
    Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$id"] == f"https://ntrace.dev/schema/{FORMAT_VERSION}/{kind}.json"
    assert schema.get("additionalProperties", True) is True  # minor versions may add keys


# -- what the writer writes validates --------------------------------------------------------------
@pytest.mark.parametrize("trace", VALID, ids=lambda p: p.name)
def test_valid_example_documents_match_the_schemas(trace: Path) -> None:
    seen = set()
    for node, kind, doc in node_docs(trace):
        assert schema_errors(kind, doc) == [], f"{trace.name}:{node or '/'}"
        seen.add(kind)
    assert seen == set(KINDS) - {"module", "checkpoint"}  # no pooling, dropout, checkpoints


def test_graph_trace_documents_match_the_schemas(tmp_path: Path) -> None:
    """A recorded convnet with pooling and dropout: conv geometry, modules, structure."""
    import torch
    from torch import nn

    from ntrace.recording import record

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Dropout(0.5), nn.Linear(16, 3), nn.PReLU(),
                          nn.Linear(3, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with record(model, tmp_path / "g.zarr", loss="cross_entropy", optimizer=opt,
                sampling=Sampling(taylor_every=1, samples_per_round=2),
                probe=torch.randn(5, 1, 4, 4), probe_every=2) as rec:
        for _ in range(3):
            x, y = torch.randn(4, 1, 4, 4), torch.randint(0, 2, (4,))
            out = model(x)
            loss = torch.nn.functional.cross_entropy(out, y)
            rec.step(loss, out, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    seen = set()
    for node, kind, doc in node_docs(tmp_path / "g.zarr"):
        assert schema_errors(kind, doc) == [], node
        seen.add(kind)
        if kind in PARSERS:
            assert PARSERS[kind].from_dict(doc).to_dict() == doc
    assert seen == set(KINDS) - {"checkpoint"}


def test_fresh_recordings_match_the_schemas(ae_trace: Path, ce_trace: Path) -> None:
    """The shared session traces: a ReLU autoencoder (task runner, MSE) and a LeakyReLU
    classifier (Python API, cross-entropy, a sample of tracked neurons)."""
    slopes = []
    for trace in (ae_trace, ce_trace):
        for node, kind, doc in node_docs(trace):
            assert schema_errors(kind, doc) == [], f"{trace.name}:{node or '/'}"
            if kind == "layer":
                slopes.append(doc["activation"]["negative_slope"])
    assert 0.1 in slopes and None in slopes  # both branches of the activation schema ran


def test_every_document_the_dataclasses_write_validates() -> None:
    attrs = TraceAttrs(loss=LossSpec("cross_entropy"),
                       sampling=Sampling(taylor_every=5, taylor_offset=4, neurons=7,
                                         neuron_seed=3, probe_every=2, probe_size=9),
                       layers=("encoder.0", "encoder.2"), output_size=10, status="aborted",
                       status_reason="loss is nan at round 3", commit=Commit(9, 2, 5),
                       created="2017-08-06T00:00:00+00:00", producer={"ntrace": "0.1.0"},
                       run={"anything": [1, {"nested": None}]})
    layers = [LayerAttrs("encoder.0", 0, "linear", 5, 4, False,
                         Activation("leaky_relu", 0.01), "stored"),
              LayerAttrs("encoder.2", 1, "linear", 4, 10, True, Activation("identity"),
                         "identity")]
    for kind, doc in [("trace", attrs.to_dict()), ("trace", TraceAttrs(
            loss=LossSpec("mse"), sampling=Sampling(), layers=("a",), output_size=1).to_dict()),
            *[("layer", la.to_dict()) for la in layers],
            ("probe", ProbeUnits(("encoder.0",), (4,)).to_dict())]:
        assert schema_errors(kind, json.loads(json.dumps(doc))) == []


# -- round trips -----------------------------------------------------------------------------------
@pytest.mark.parametrize("trace", VALID, ids=lambda p: p.name)
def test_from_dict_to_dict_round_trips(trace: Path) -> None:
    for _node, kind, doc in node_docs(trace):
        if kind == "group":
            continue
        parsed = PARSERS[kind].from_dict(doc)
        again = PARSERS[kind].from_dict(json.loads(json.dumps(parsed.to_dict())))
        assert again == parsed
        if doc["format_version"] == FORMAT_VERSION:
            assert parsed.to_dict() == {k: v for k, v in doc.items()}


def test_round_trip_of_constructed_attributes() -> None:
    attrs = TraceAttrs(loss=LossSpec("mse"), sampling=Sampling(neurons=3, probe_every=4,
                                                                probe_size=2),
                       layers=("x", "y"), output_size=2, commit=Commit(4, 1, 1))
    assert TraceAttrs.from_dict(json.loads(json.dumps(attrs.to_dict()))) == attrs
    la = LayerAttrs("x", 0, "linear", 3, 2, True, Activation("leaky_relu", 0.2), "stored")
    assert LayerAttrs.from_dict(la.to_dict()) == la
    pu = ProbeUnits(("x", "y"), (2, 5))
    assert ProbeUnits.from_dict(pu.to_dict()) == pu
    assert pu.total == 7 and pu.offsets() == (0, 2)


def test_open_trace_reads_what_the_documents_say() -> None:
    tr = open_trace(VALID[0])
    assert tr.attrs == TraceAttrs.from_dict(trace_doc())
    assert tr.layers["fc1"] == LayerAttrs.from_dict(layer_doc())
    assert tr.probe_units == ProbeUnits.from_dict(probe_doc())


# -- unknown keys are ignored ----------------------------------------------------------------------
def _with_extra_keys(kind: str) -> dict[str, Any]:
    doc = DOCS[kind]()
    doc["added_in_1_3"] = {"any": ["thing"]}
    if kind == "trace":
        doc["loss"]["label_smoothing"] = 0.0
        doc["sampling"]["new_policy_knob"] = 1
        doc["commit"]["bytes"] = 123
    elif kind == "layer":
        doc["activation"]["threshold"] = 0.0
    else:
        doc["units"][0]["kind"] = "relu"
    return doc


@pytest.mark.parametrize("kind", ["trace", "layer", "probe"])
def test_unknown_keys_are_ignored(kind: str) -> None:
    doc = _with_extra_keys(kind)
    assert PARSERS[kind].from_dict(doc) == PARSERS[kind].from_dict(DOCS[kind]())
    assert schema_errors(kind, doc) == []


# -- versions --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["trace", "layer", "probe"])
def test_newer_major_version_is_refused_naming_the_upgrade(kind: str) -> None:
    doc = DOCS[kind]()
    doc["format_version"] = "2.0"
    with pytest.raises(UnsupportedVersionError) as info:
        PARSERS[kind].from_dict(doc)
    msg = str(info.value)
    assert "2.0" in msg and "needs a newer ntrace" in msg and "pip install -U ntrace" in msg
    assert "1.x" in msg
    assert isinstance(info.value, InvalidTraceError)
    assert schema_errors(kind, doc) != []


def test_older_major_version_is_refused_naming_the_conversion() -> None:
    doc = trace_doc()
    doc["format_version"] = "0.9"
    with pytest.raises(UnsupportedVersionError, match="older ntrace"):
        TraceAttrs.from_dict(doc)


@pytest.mark.parametrize("version", ["1.1", "1.10", "1.0"])
def test_any_minor_of_major_1_is_read(version: str) -> None:
    doc = trace_doc()
    doc["format_version"] = version
    assert TraceAttrs.from_dict(doc).format_version == version
    assert schema_errors("trace", doc) == []


@pytest.mark.parametrize("version", ["1", "1.0.0", "v1.0", "1.x", 1.0, None])
def test_malformed_version_is_refused(version: Any) -> None:
    doc = trace_doc()
    doc["format_version"] = version
    with pytest.raises(InvalidTraceError, match="format_version"):
        TraceAttrs.from_dict(doc)
    assert schema_errors("trace", doc) != []


# -- each parse failure names the field; the schema refuses the same document ----------------------
DELETE = object()
BAD: list[tuple[str, tuple[Any, ...], Any, str, bool]] = [
    # (kind, path to the field, bad value or DELETE, field named in the message, schema refuses)
    ("trace", ("node",), "layer", ".node", True),
    ("trace", ("status",), "done", ".status", True),
    ("trace", ("status_reason",), 3, ".status_reason", True),
    ("trace", ("created",), None, ".created", True),
    ("trace", ("producer",), ["torch"], ".producer", True),
    ("trace", ("run",), "free text", ".run", True),
    ("trace", ("loss",), "mse", ".loss", True),
    ("trace", ("loss", "id"), "hinge", ".loss.id", True),
    ("trace", ("loss", "reduction"), "sum", ".loss.reduction", True),
    ("trace", ("sampling", "taylor_every"), -3, ".sampling.taylor_every", True),
    ("trace", ("sampling", "taylor_every"), 0, ".sampling.taylor_every", True),
    ("trace", ("sampling", "taylor_every"), "10", ".sampling.taylor_every", True),
    ("trace", ("sampling", "taylor_offset"), 3, ".sampling.taylor_offset", False),
    ("trace", ("sampling", "samples_per_round"), 0, ".sampling.samples_per_round", True),
    ("trace", ("sampling", "sample_policy"), "random", ".sampling.sample_policy", True),
    ("trace", ("sampling", "neurons"), 0, ".sampling.neurons", True),
    ("trace", ("sampling", "neurons"), "some", ".sampling.neurons", True),
    ("trace", ("sampling", "neurons"), True, ".sampling.neurons", True),
    ("trace", ("sampling", "neuron_seed"), -1, ".sampling.neuron_seed", True),
    ("trace", ("sampling", "probe_every"), -2, ".sampling.probe_every", True),
    ("trace", ("sampling", "probe_size"), 2.5, ".sampling.probe_size", True),
    ("trace", ("sampling", "probe_size"), DELETE, "missing required key 'probe_size'", True),
    ("trace", ("layers",), "fc1", ".layers", True),
    ("trace", ("layers",), ["fc1", "fc1"], ".layers", True),
    ("trace", ("layers", 0), 7, ".layers[0]", True),
    ("trace", ("output_size",), 0, ".output_size", True),
    ("trace", ("output_size",), False, ".output_size", True),
    ("trace", ("commit", "rounds"), -1, ".commit.rounds", True),
    ("trace", ("commit", "snapshots"), DELETE, "missing required key 'snapshots'", True),
    ("trace", ("commit",), DELETE, "missing required key 'commit'", True),
    ("layer", ("node",), "trace", ".node", True),
    ("layer", ("name",), None, ".name", True),
    ("layer", ("index",), -1, ".index", True),
    ("layer", ("kind",), "conv2d", ".kind", True),
    ("layer", ("in_features",), 0, ".in_features", True),
    ("layer", ("out_features",), "4", ".out_features", True),
    ("layer", ("bias",), 1, ".bias", True),
    ("layer", ("activation",), "relu", ".activation", True),
    ("layer", ("activation", "kind"), "tanh", ".activation.kind", True),
    ("layer", ("activation", "negative_slope"), 0.1, ".activation.negative_slope", True),
    ("layer", ("jacobian",), "none", ".jacobian", True),
    ("layer", ("jacobian",), DELETE, "missing required key 'jacobian'", True),
    ("probe", ("node",), "layer", ".node", True),
    ("probe", ("units",), {"fc1": 4}, ".units", True),
    ("probe", ("units", 0), ["fc1", 4], ".units[0]", True),
    ("probe", ("units", 0, "layer"), 1, ".units[0].layer", True),
    ("probe", ("units", 0, "count"), 0, ".units[0].count", True),
    ("probe", ("units", 0, "count"), DELETE, "missing required key 'count'", True),
]


def _set(doc: Any, path: tuple[Any, ...], value: Any) -> None:
    for key in path[:-1]:
        doc = doc[key]
    if value is DELETE:
        del doc[path[-1]]
    else:
        doc[path[-1]] = value


@pytest.mark.parametrize(("kind", "path", "value", "needle", "schema_refuses"), BAD,
                         ids=[f"{k}:{'.'.join(map(str, p))}={v!r}" for k, p, v, *_ in BAD])
def test_each_parse_failure_names_the_field(kind: str, path: tuple[Any, ...], value: Any,
                                            needle: str, schema_refuses: bool) -> None:
    doc = DOCS[kind]()
    _set(doc, path, value)
    with pytest.raises(InvalidTraceError) as info:
        PARSERS[kind].from_dict(doc)
    assert needle in str(info.value)
    assert not isinstance(info.value, UnsupportedVersionError)
    assert bool(schema_errors(kind, doc)) is schema_refuses


def test_leaky_relu_needs_its_slope() -> None:
    doc = layer_doc()
    doc["activation"] = {"kind": "leaky_relu", "negative_slope": None}
    with pytest.raises(InvalidTraceError, match="activation.negative_slope"):
        LayerAttrs.from_dict(doc)
    assert schema_errors("layer", doc)
    doc["activation"] = {"kind": "leaky_relu"}
    assert schema_errors("layer", doc)
    doc["activation"]["negative_slope"] = 0.01
    assert LayerAttrs.from_dict(doc).activation == Activation("leaky_relu", 0.01)
    assert schema_errors("layer", doc) == []


def test_sampling_constructor_uses_the_same_messages() -> None:
    with pytest.raises(InvalidTraceError, match="sampling.taylor_every: expected an integer >= 1"):
        Sampling(taylor_every=0)
    with pytest.raises(InvalidTraceError, match="sampling.taylor_offset: must be < taylor_every"):
        Sampling(taylor_every=2, taylor_offset=2)


def test_group_schema() -> None:
    assert schema_errors("group", {"format_version": "1.0", "node": "taylor"}) == []
    assert schema_errors("group", {"format_version": "1.0", "node": "layers", "x": 1}) == []
    assert schema_errors("group", {"format_version": "1.0", "node": "probe"})
    assert schema_errors("group", {"node": "taylor"})


@pytest.mark.parametrize("kind", ["trace", "layer", "probe"])
def test_layer_names_with_a_slash_are_refused(kind: str) -> None:
    doc = DOCS[kind]()
    if kind == "trace":
        doc["layers"][0] = "encoder/0"
    elif kind == "layer":
        doc["name"] = "encoder/0"
    else:
        doc["units"][0]["layer"] = "encoder/0"
    assert schema_errors(kind, doc)
    with pytest.raises(InvalidTraceError, match="/"):
        PARSERS[kind].from_dict(doc)
