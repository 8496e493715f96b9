"""Running ``ntrace view`` and a recorder as child processes, as a user would."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

RECORDER = textwrap.dedent("""
    import sys, time, torch
    from pathlib import Path
    from torch import nn
    from ntrace.format.metadata import Sampling
    from ntrace.recording import record
    from ntrace.tasks.datasets import load_digits

    torch.manual_seed(0)
    torch.set_num_threads(1)
    x, y = load_digits()
    xs = torch.as_tensor(x)[:, ::4]  # 16 of the 64 pixels: a model the page keeps up with
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(),
                          nn.Linear(6, 16))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    stop = Path(sys.argv[2])
    with record(model, sys.argv[1], loss="mse", optimizer=opt,
                sampling=Sampling(taylor_every=2, samples_per_round=4), probe=xs[:40],
                probe_index=range(40), probe_every=4, expected_rounds=4000,
                commit_seconds=float(sys.argv[3])) as rec:
        for n in range(100000):
            if stop.exists():
                break
            idx = torch.arange(n * 16, n * 16 + 16) % len(xs)
            out = model(xs[idx])
            loss = nn.functional.mse_loss(out, xs[idx])
            rec.step(loss, out, xs[idx], indices=idx)
            opt.zero_grad()
            loss.backward()
            opt.step()
            time.sleep(float(sys.argv[4]))
""")


def env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def start_recorder(out: Path, stop: Path, commit_seconds: float = 1.0,
                   pause: float = 0.01) -> subprocess.Popen:
    """Record a 16-8-6-16 autoencoder on the digits into ``out`` until ``stop`` exists,
    pausing ``pause`` s after each round (a training step that takes a while)."""
    return subprocess.Popen([sys.executable, "-c", RECORDER, str(out), str(stop),
                             str(commit_seconds), str(pause)], env=env(),
                            stderr=subprocess.PIPE, text=True)


def start_view(*args: str) -> tuple[subprocess.Popen, str]:
    """``ntrace view ARGS --port 0``: the process and the URL it printed."""
    proc = subprocess.Popen([sys.executable, "-c", "from ntrace.cli import main; main()",
                             "view", *args, "--port", "0"], env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    m = re.search(r"(http://\S+)", line)
    if m is None:
        proc.kill()
        raise AssertionError(f"ntrace view printed {line!r}; stderr: {proc.stderr.read()}")
    return proc, m.group(1)


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def wait_for(cond, timeout: float, what: str, every: float = 0.05):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")
