"""The curated top-level API: ``ntrace.record(...)`` works on every call and whichever of the
function or the ``ntrace.record`` package was imported first (fresh interpreters)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = """
import sys
{first}
import torch
import ntrace
from torch import nn
for k in range(2):
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 3), torch.randn(8, 2)
    with ntrace.record(model, sys.argv[1] + f"/run{{k}}.zarr", loss="mse", optimizer=opt) as rec:
        out = model(x)
        loss = nn.functional.mse_loss(out, y)
        rec.step(loss, out, y)
        loss.backward()
        opt.step()
    assert ntrace.validate_trace(sys.argv[1] + f"/run{{k}}.zarr").ok
print("ok")
"""


@pytest.mark.parametrize("first", ["", "import ntrace.record.recorder",
                                   "from ntrace.record import record"])
def test_record_is_callable_on_every_call(tmp_path: Path, first: str) -> None:
    res = subprocess.run([sys.executable, "-c", SCRIPT.format(first=first), str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]
