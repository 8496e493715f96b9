"""Structured model outputs (dict, tuple, dataclass, ``ModelOutput``) and losses computed
inside the model's forward (``model(x, labels=y).loss``), in the Python API and the zero-code
wrapper: the recorded output is the tensor the loss is computed from."""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ntrace
from ntrace.errors import UnsupportedModelError, UsageError
from ntrace.format.reader import open_trace
from ntrace.format.validate import validate_trace
from ntrace.recording.wrap import WrapOptions, run_wrapped


@dataclass
class Out:
    loss: torch.Tensor | None
    logits: torch.Tensor
    hidden: torch.Tensor


class Net(nn.Module):
    """Returns ``kind``: a dict, a tuple or a dataclass of loss, logits and hidden state."""

    def __init__(self, kind: str = "dict") -> None:
        super().__init__()
        self.kind = kind
        self.fc1, self.act, self.fc2 = nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None):  # type: ignore[no-untyped-def]
        h = self.act(self.fc1(x))
        logits = self.fc2(h)
        loss = None if labels is None else F.cross_entropy(logits.view(-1, 3), labels.view(-1))
        if self.kind == "dict":
            return {"loss": loss, "logits": logits, "hidden": h}
        if self.kind == "tuple":
            return (loss, logits, h) if loss is not None else (logits, h)
        return Out(loss, logits, h)


def _train(path: Path, kind: str, field: str | None = None, inner: bool = True) -> None:
    torch.manual_seed(0)
    model = Net(kind)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with ntrace.record(model, path, loss="cross_entropy", optimizer=opt) as rec:
        for _ in range(3):
            x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
            out = model(x, labels=y) if inner else model(x)
            if inner:
                loss = out["loss"] if kind == "dict" else out[0] if kind == "tuple" else out.loss
            else:
                logits = out["logits"] if kind == "dict" else out[0] if kind == "tuple" \
                    else out.logits
                loss = F.cross_entropy(logits, y)
            opt.zero_grad()
            loss.backward()
            rec.step(loss, out, y, field=field)
            opt.step()


@pytest.mark.parametrize("kind", ["dict", "tuple", "dataclass"])
def test_python_api_finds_the_logits_of_a_structured_output(tmp_path: Path, kind: str) -> None:
    trace = tmp_path / "t.zarr"
    _train(trace, kind)
    assert validate_trace(trace).ok
    tr = open_trace(trace)
    assert tr.attrs.output_size == 3 and tr.layers["fc2"] is not None


def test_python_api_takes_the_named_field(tmp_path: Path) -> None:
    trace = tmp_path / "t.zarr"
    _train(trace, "dict", field="logits", inner=False)
    assert validate_trace(trace).ok
    with pytest.raises(UsageError, match="output.nope"):
        _train(tmp_path / "u.zarr", "dict", field="nope", inner=False)


def _script(tmp_path: Path, body: str) -> Path:
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent('''
        import torch
        import torch.nn.functional as F
        from torch import nn

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.emb, self.pos = nn.Embedding(10, 6), nn.Embedding(5, 6)
                self.fc1, self.act, self.fc2 = nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 3)

            def forward(self, past=None, input_ids=None, labels=None):
                positions = torch.arange(input_ids.shape[1])[None]  # (1, T): shared
                h = self.emb(input_ids) + self.pos(positions)
                logits = self.fc2(self.act(self.fc1(h))).mean(1)
                loss = None
                if labels is not None:
                    loss = F.cross_entropy(logits.view(-1, 3), labels.view(-1))
                return {"loss": loss, "logits": logits}

        torch.manual_seed(0)
        model = Net()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        for step in range(4):
            ids, y = torch.randint(0, 10, (8, 5)), torch.randint(0, 3, (8,))
        ''') + textwrap.indent(textwrap.dedent(body), "    "))
    return script


def _wrap(script: Path) -> None:
    res = run_wrapped(["python", str(script)], WrapOptions(out=str(script.parent / "w.zarr"),
                                                          probe_size=0))
    assert res.rounds == 4
    assert validate_trace(script.parent / "w.zarr").ok


def test_wrapper_records_the_loss_computed_inside_the_model(tmp_path: Path) -> None:
    """Keyword inputs only, the first of them None; a position embedding shared by the batch
    is not tracked (a warning)."""
    script = _script(tmp_path, '''
        outputs = model(past=None, input_ids=ids, labels=y)
        outputs["loss"].backward()
        opt.step()
        opt.zero_grad()
        ''')
    with pytest.warns(UserWarning, match="layer pos .* without the batch axis"):
        _wrap(script)
    tr = open_trace(tmp_path / "w.zarr")
    assert tr.attrs.loss.id == "cross_entropy" and tr.attrs.output_size == 3
    assert list(tr.layers) == ["emb", "fc1", "fc2"]


def test_wrapper_links_an_outside_loss_to_a_field_of_the_output(tmp_path: Path) -> None:
    script = _script(tmp_path, '''
        logits = model(input_ids=ids)["logits"]
        loss = F.cross_entropy(logits.view(-1, 3), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        ''')
    _wrap(script)


def test_a_loss_per_position_is_refused_naming_the_field(tmp_path: Path) -> None:
    script = tmp_path / "lm.py"
    script.write_text(textwrap.dedent('''
        import torch
        import torch.nn.functional as F
        from torch import nn
        model = nn.Sequential(nn.Embedding(10, 6), nn.Linear(6, 10))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        ids = torch.randint(0, 10, (4, 7))
        logits = model(ids)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, 10), ids[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        '''))
    with pytest.raises(UnsupportedModelError):
        run_wrapped(["python", str(script)], WrapOptions(out=str(tmp_path / "w.zarr"),
                                                          probe_size=0))
    script.write_text(script.read_text().replace("logits[:, :-1].reshape(-1, 10)",
                                                 "logits.view(-1, 10)").replace(
        "ids[:, 1:].reshape(-1)", "ids.view(-1)"))
    with pytest.raises(UnsupportedModelError, match=r"output \(4, 7, 10\) as \(28, 10\)"):
        run_wrapped(["python", str(script)], WrapOptions(out=str(tmp_path / "w.zarr"),
                                                          probe_size=0, overwrite=True))
