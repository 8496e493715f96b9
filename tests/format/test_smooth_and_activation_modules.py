"""Format 1.3's smooth activation kind and ``activation`` module kind: the dataclasses and the
JSON Schemas accept what the writer writes and refuse the same mistakes."""

from __future__ import annotations

import json
from typing import Any

import pytest

from ntrace.errors import InvalidTraceError
from ntrace.format.metadata import Activation, LayerAttrs, ModuleAttrs

from .test_schema import schema_errors


def _layer(act: dict[str, Any]) -> dict[str, Any]:
    la = LayerAttrs("fc2", 1, "linear", 16, 10, True, Activation("identity"), "stored")
    return {**la.to_dict(), "activation": act}


def _module(**extra: Any) -> dict[str, Any]:
    return {**ModuleAttrs("layer1.relu()", "maxpool", (4, 3)).to_dict(), **extra}


def test_smooth_activation_round_trips_and_validates() -> None:
    act = Activation("smooth", function="log_softmax")
    assert not act.has_mask
    doc = _layer(json.loads(json.dumps(act.to_dict())))
    assert schema_errors("layer", doc) == []
    assert LayerAttrs.from_dict(doc).activation == act


def test_activation_module_round_trips_and_validates() -> None:
    m = ModuleAttrs("relu()@1", "activation", (8, 4, 4), activation=Activation("leaky_relu", 0.1))
    doc = json.loads(json.dumps(m.to_dict()))
    assert schema_errors("module", doc) == []
    assert ModuleAttrs.from_dict(doc) == m


@pytest.mark.parametrize("doc, where", [
    (_layer({"kind": "smooth", "negative_slope": None}), "function"),
    (_module(kind="activation"), "activation"),
    (_module(kind="activation", activation={"kind": "smooth", "function": "tanh",
                                            "negative_slope": None}), "kind"),
])
def test_mistakes_are_refused_by_parser_and_schema(doc: dict[str, Any], where: str) -> None:
    parser = LayerAttrs if doc["node"] == "layer" else ModuleAttrs
    with pytest.raises(InvalidTraceError, match=where):
        parser.from_dict(doc)
    assert schema_errors(doc["node"], doc) != []
