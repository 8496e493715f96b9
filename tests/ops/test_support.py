"""The supported-modules table (``ntrace record --list-supported``, README) is read off the op
registry: every op users meet is in it, and the README shows exactly what the CLI prints."""

from __future__ import annotations

import re
from pathlib import Path
from typing import ClassVar

import pytest
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

from ntrace import ops
from ntrace.cli import main
from ntrace.ops import support
from ntrace.ops.base import PassthroughOp

README = Path(__file__).resolve().parents[2] / "README.md"


def test_the_readme_table_is_the_registrys() -> None:
    text = README.read_text()
    block = re.search(r"<!-- supported:begin -->\n(.*?)\n<!-- supported:end -->", text, re.S)
    assert block is not None, "README lacks the supported-modules markers"
    assert block.group(1) == support.markdown(), (
        "README's supported-modules table is stale: regenerate it from "
        "ntrace.ops.support.markdown()")


def test_every_labelled_op_and_its_forms_are_listed() -> None:
    out = CliRunner().invoke(main, ["record", "--list-supported"])
    assert out.exit_code == 0, out.output
    for op in ops.OPS:
        if op.label:
            assert op.label in out.output
            for m in op.modules:
                if m.__module__.startswith("torch."):
                    assert f"nn.{m.__name__}" in out.output
    for name in ("F.relu", "torch.relu", "Tensor.relu_", "F.max_pool2d", "F.dropout",
                 "F.gelu", "F.logsigmoid", "F.scaled_dot_product_attention"):
        assert name in out.output, name
    assert "--batchnorm fixed-stats" in out.output and "max_norm" in out.output
    assert "everything else" in out.output


def test_an_op_added_to_the_registry_appears(monkeypatch: pytest.MonkeyPatch) -> None:
    class Fold(PassthroughOp):
        label: ClassVar[str] = "Fold"
        notes: ClassVar[str] = "a test op"
        modules = (nn.Fold,)
        functions = (F.fold,)

    monkeypatch.setattr(ops, "OPS", (*ops.OPS, Fold))
    row = [r for r in support.rows() if r.label == "Fold"]
    assert row == [support.Support("Fold", ("nn.Fold",), ("F.fold",),
                                   support.RECORDED[ops.PASSTHROUGH], "a test op")]
