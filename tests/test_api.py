"""The curated top-level API: ``ntrace.record`` is a plain function, the same object however
the recording package was imported first, and works on every call (fresh interpreters)."""

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
import types
from ntrace.recording.recorder import record
assert isinstance(ntrace.record, types.FunctionType) and ntrace.record is record
print("ok")
"""


@pytest.mark.parametrize("first", ["", "import ntrace.recording.recorder",
                                   "from ntrace.recording import record",
                                   "import ntrace.recording"])
def test_record_is_callable_on_every_call(tmp_path: Path, first: str) -> None:
    res = subprocess.run([sys.executable, "-c", SCRIPT.format(first=first), str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]
