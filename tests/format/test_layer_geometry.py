"""Format 1.3's layers on extra axes in the layer document: a linear layer's stored geometry
(positions) and an embedding's ``padding_idx`` round-trip, validate against the schema, and
inconsistent ones are refused with the field named; a linear layer without geometry reads as
in 1.0."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from jsonschema import Draft202012Validator

from ntrace.errors import InvalidTraceError
from ntrace.format.layout import layer_arrays
from ntrace.format.metadata import (
    Activation,
    Geometry,
    LayerAttrs,
    LossSpec,
    Sampling,
    TraceAttrs,
)
from ntrace.format.validate import validate_trace
from ntrace.format.writer import TraceWriter

SCHEMA = json.loads((Path(__file__).resolve().parents[2] / "spec" / "schema" / "layer.json")
                    .read_text())
RELU = Activation("relu")


def positional() -> LayerAttrs:
    return LayerAttrs("proj", 1, "linear", 5, 6, True, RELU, "stored",
                      Geometry((7, 5), (6, 7), (6, 5)))


def padded() -> LayerAttrs:
    return LayerAttrs("emb", 0, "embedding", 11, 5, False, Activation("identity"), "stored",
                      Geometry((7,), (5, 7), (11, 5), padding_idx=0))


@pytest.mark.parametrize("la", [positional(), padded()], ids=["linear", "embedding"])
def test_round_trip_and_schema(la: LayerAttrs) -> None:
    doc = json.loads(json.dumps(la.to_dict()))
    Draft202012Validator(SCHEMA).validate(doc)
    assert LayerAttrs.from_dict(doc) == la


def test_padding_idx_is_written_only_where_set() -> None:
    assert padded().to_dict()["geometry"]["padding_idx"] == 0
    plain = LayerAttrs("e", 0, "embedding", 11, 5, False, Activation("identity"), "stored",
                       Geometry((7,), (5, 7), (11, 5)))
    assert "padding_idx" not in plain.to_dict()["geometry"]


def test_a_linear_layer_without_geometry_has_no_positions() -> None:
    la = LayerAttrs("fc", 0, "linear", 5, 6, True, RELU, "stored")
    assert "geometry" not in la.to_dict()
    assert la.shape == Geometry((5,), (6,), (6, 5)) and la.shape.positions == ()


def test_arrays_of_a_linear_layer_on_positions() -> None:
    attrs = TraceAttrs(loss=LossSpec("mse"), structure="graph", output_size=3,
                       layers=("proj",), sampling=Sampling(samples_per_round=4))
    lay = {a.path: a for a in layer_arrays(attrs, positional(), 6)}
    assert lay["layers/proj/input"].dims[-3:] == ("sample", "x0", "in_feature")
    assert lay["layers/proj/input"].tail == (4, 7, 5)
    assert lay["layers/proj/jacobian"].tail == (4, 3, 6, 7)
    plain = LayerAttrs("fc", 0, "linear", 5, 6, True, RELU, "stored")
    assert {a.path: a for a in layer_arrays(attrs, plain, 6)}["layers/fc/input"].dims[-2:] == \
        ("sample", "in_feature")


@pytest.mark.parametrize(("la", "geometry", "match"), [
    (positional(), {"input_shape": [7, 4], "output_shape": [6, 7], "weight_shape": [6, 5]},
     r"layer attributes\.geometry: a linear layer's geometry is input_shape"),
    (positional(), {"input_shape": [7, 5], "output_shape": [6, 7], "weight_shape": [6, 5],
                    "padding_idx": 0}, r"geometry\.padding_idx: must be a vocabulary entry"),
    (padded(), {"input_shape": [7], "output_shape": [5, 7], "weight_shape": [11, 5],
                "padding_idx": 11}, r"geometry\.padding_idx: must be a vocabulary entry"),
    (padded(), {"input_shape": [7], "output_shape": [5, 7], "weight_shape": [11, 5],
                "padding_idx": -1}, r"geometry\.padding_idx: expected an integer >= 0"),
])
def test_inconsistent_geometry_is_refused(la: LayerAttrs, geometry: dict, match: str) -> None:
    doc = la.to_dict()
    doc["geometry"] = geometry
    with pytest.raises(InvalidTraceError, match=match):
        LayerAttrs.from_dict(doc)


def test_a_chain_trace_refuses_a_linear_layer_with_positions(tmp_path: Path) -> None:
    attrs = TraceAttrs(loss=LossSpec("mse"), structure="chain", output_size=3,
                       layers=("proj",), sampling=Sampling(samples_per_round=4))
    la = LayerAttrs("proj", 0, "linear", 5, 6, True, RELU, "stored",
                    Geometry((7, 5), (6, 7), (6, 5)))
    TraceWriter.create(tmp_path / "c.zarr", attrs, [la], {"proj": np.arange(6)}).close()
    reasons = validate_trace(tmp_path / "c.zarr").reasons
    assert any("layers/proj: a linear layer with positions needs structure 'graph'" in r
               for r in reasons), reasons
