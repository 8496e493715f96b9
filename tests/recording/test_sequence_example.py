"""``tools/examples/sequence_classifier.py`` (padded embedding → Linear on (batch, seq, dim) →
GELU → LayerNorm → masked mean → Linear head, AdamW) recorded unmodified by ``ntrace record --
python …``: it validates, conforms (Taylor loss at W_n = recorded loss, its gradient from the
stored factors = autograd's) and analyses end to end."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch.utils.data import DataLoader, TensorDataset

from ntrace.analyze import open_results
from ntrace.cli import main
from ntrace.format.reader import open_trace
from ntrace.format.validate import validate_trace

from .graph_conformance import check_graph_trace

SCRIPT = Path(__file__).resolve().parents[2] / "tools" / "examples" / "sequence_classifier.py"


def example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("sequence_classifier", SCRIPT)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def replay(ex: ModuleType, steps: int) -> list[dict[str, torch.Tensor]]:
    """The model's state before each step of the script's own loop (defaults, one epoch),
    replayed here: the LayerNorm's trained scale and shift are not in the trace."""
    torch.manual_seed(0)
    tokens, labels = ex.make_sentences(512, 40, 12, 0)
    loader = DataLoader(TensorDataset(tokens, labels), batch_size=32, shuffle=True,
                        drop_last=True)
    model = ex.SequenceClassifier(40, 16, 24, classes=3)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    states = []
    for batch, target in loader:
        states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(batch), target).backward()
        opt.step()
    assert len(states) == steps
    return states


def test_sequence_classifier_records_validates_conforms_and_analyses(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    trace = tmp_path / "seq.zarr"
    res = CliRunner().invoke(main, ["record", "--out", str(trace), "--taylor-every", "4",
                                    "--samples-per-round", "4", "--",
                                    "python", str(SCRIPT), "--epochs", "1"])
    assert res.exit_code == 0, res.stdout + res.stderr
    assert validate_trace(trace).ok
    tr = open_trace(trace)
    assert tr.attrs.structure == "graph" and tr.attrs.loss.id == "cross_entropy"
    assert [la.kind for la in tr.layers.values()] == ["embedding", "linear", "linear"]
    assert tr.layers["embed"].geometry.padding_idx == 0
    assert tr.layers["proj"].geometry.input_shape == (12, 16)  # Linear on (batch, seq, dim)
    assert tr.layers["head"].geometry is None
    ex = example()
    states = replay(ex, tr.rounds)
    rounds = tr.read("taylor/round_index")
    model = ex.SequenceClassifier(40, 16, 24, classes=3)

    def model_input(g, t: int) -> torch.Tensor:
        state = states[int(rounds[t])]  # the replay trained what was recorded
        for name in tr.layers:
            np.testing.assert_allclose(g[f"layers/{name}/weight"][t],
                                       state[f"{name}.weight"].numpy(), rtol=1e-6, atol=1e-7)
        model.norm.load_state_dict({"weight": state["norm.weight"], "bias": state["norm.bias"]})
        return torch.as_tensor(g["layers/embed/input"][t])

    assert check_graph_trace(trace, model, model_input) == tr.taylor_rounds * 3
    out = tmp_path / "an"
    res = CliRunner().invoke(main, ["analyze", str(trace), "--out", str(out), "--checkpoints",
                                    "2"])
    assert res.exit_code == 0, res.stdout + res.stderr
    ds = open_results(out / "results.zarr")
    assert set(ds.attrs["ntrace"]["scales"]) == {"network", "layer", "neuron"}
    assert np.isfinite(ds.layer_optimum.values).all()
    assert np.isfinite(ds.neuron_regret.values).all()
