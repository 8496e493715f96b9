"""Layers on extra axes (format 1.3): ``nn.Linear`` on (batch, *positions, features) and a padded
``nn.Embedding`` record in either Jacobian mode, validate and conform (the recorded loss is the
Taylor loss at the recorded weights, whose gradient from the stored factors is autograd's, the
padding row's excluded); ReLU states after a positional linear are stored neurons first."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from torch import nn

from ntrace.errors import UnsupportedModelError
from ntrace.format.bits import unpack
from ntrace.format.reader import open_trace
from ntrace.format.validate import validate_trace

from .graph_conformance import check_graph_trace
from .test_graph import record_graph


class Tagger(nn.Module):
    """Embedding(11, 5, padding_idx=0) → Linear(5, 6) on (batch, 7, 5) → ReLU → Linear(6, 3)
    on positions → ReLU → mean over positions → Linear(3, 4)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 5, padding_idx=0)
        self.proj = nn.Linear(5, 6)
        self.act = nn.ReLU()
        self.mix = nn.Linear(6, 3)
        self.act2 = nn.ReLU()
        self.head = nn.Linear(3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act2(self.mix(self.act(self.proj(self.emb(x)))))
        return self.head(h.mean(1))


def tokens() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(6)
    x = torch.randint(1, 11, (96, 7), generator=g)
    x[:, 4:] *= torch.rand(96, 3, generator=g) > 0.5  # padded tails
    return x, torch.randint(0, 4, (96,), generator=g)


@pytest.mark.parametrize("mode", ["forward", "reverse"])
def test_positional_linear_and_padded_embedding_conform(tmp_path: Path, mode: str) -> None:
    x_all, y_all = tokens()
    torch.manual_seed(3)
    path = tmp_path / f"tagger-{mode}.zarr"
    record_graph(path, Tagger(), rounds=6, data=(x_all, y_all), batch=8, lr=0.2,
                 jacobian_mode=mode, probe=None, probe_every=0)
    report = validate_trace(path)  # includes the masks of proj and mix against W x + b
    assert report.ok, report.reasons
    tr = open_trace(path)
    assert tr.attrs.structure == "graph" and tr.attrs.format_version == "1.3"
    assert tr.layers["emb"].geometry.padding_idx == 0
    assert tr.layers["proj"].geometry.input_shape == (7, 5)
    assert tr.layers["proj"].geometry.output_shape == (6, 7)
    assert tr.layers["head"].geometry is None  # a plain Linear stores none, as in 1.0
    g = zarr.open_group(str(path), mode="r")
    assert g["layers/proj/input"].shape[1:] == (4, 7, 5)
    assert g["layers/proj/jacobian"].shape[1:] == (4, 4, 4, 7)  # (s, p, tracked, position)
    # the ReLU states after proj: neuron first, then position
    W, b = g["layers/proj/weight"][0], g["layers/proj/bias"][0]
    pre = np.einsum("sqi,ni->snq", g["layers/proj/input"][0].astype(np.float64), W) + b[:, None]
    np.testing.assert_array_equal(unpack(g["layers/proj/mask"][0], 42).reshape(4, 6, 7),
                                  pre > 0)
    checked = check_graph_trace(path, Tagger(), lambda gr, t: x_all[gr["taylor/sample_index"][t]])
    assert checked == 3 * 4


def test_max_norm_is_refused_with_the_reason(tmp_path: Path) -> None:
    x_all, y_all = tokens()
    model = nn.Sequential(nn.Embedding(11, 5, max_norm=1.0), nn.Flatten(), nn.Linear(35, 4))
    with pytest.raises(UnsupportedModelError, match=r"module 0 \(Embedding\) uses max_norm, "
                                                    r"which rescales .*remove max_norm"):
        record_graph(tmp_path / "m.zarr", model, data=(x_all, y_all), probe=None,
                     probe_every=0)
