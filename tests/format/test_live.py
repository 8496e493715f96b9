"""Reading a trace while it is being written: every reader sees a consistent committed prefix.

A child process records (committing every 20 ms, so commits, chunk rewrites, array growth,
the final trim and consolidation all happen while we read) and this test polls the trace
meanwhile with ``validate_trace`` (deep), ``open_trace`` plus reading every array,
``summarize``, and the ``ntrace info`` / ``ntrace validate`` commands. Before the trace is
published the path does not exist; from then on every poll must succeed, with commit counts
that never go back.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from click.testing import CliRunner

from ntrace.cli import main
from ntrace.errors import TraceNotFoundError
from ntrace.format.reader import open_trace
from ntrace.format.summary import summarize
from ntrace.format.validate import validate_trace

RECORDER = textwrap.dedent("""
    import sys, torch
    from torch import nn
    from ntrace.format.metadata import Sampling
    from ntrace.recording import record
    from ntrace.tasks.datasets import load_digits

    torch.manual_seed(0)
    torch.set_num_threads(1)
    x, y = load_digits()
    xs = torch.as_tensor(x)
    model = nn.Sequential(nn.Linear(64, 24), nn.ReLU(), nn.Linear(24, 12), nn.ReLU(),
                          nn.Linear(12, 64))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    rounds = int(sys.argv[2])
    with record(model, sys.argv[1], loss="mse", optimizer=opt,
                sampling=Sampling(taylor_every=2, samples_per_round=4), probe=xs[:40],
                probe_index=range(40), probe_every=3, expected_rounds=16,
                commit_seconds=0.02) as rec:
        for n in range(rounds):
            idx = torch.arange(n * 16, n * 16 + 16) % len(xs)
            out = model(xs[idx])
            loss = nn.functional.mse_loss(out, xs[idx])
            rec.step(loss, out, xs[idx], indices=idx)
            opt.zero_grad()
            loss.backward()
            opt.step()
""")


def test_readers_see_a_consistent_prefix_while_a_trace_is_written(tmp_path: Path) -> None:
    out = tmp_path / "live.zarr"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", RECORDER, str(out), "1500"], env=env,
                            stderr=subprocess.PIPE, text=True)
    runner = CliRunner()
    polls, last, seen = 0, (0, 0, 0), set()
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            done = proc.poll() is not None
            try:
                report = validate_trace(out)
            except TraceNotFoundError:
                assert not seen, "the trace disappeared after it was published"
                if done:
                    break
                time.sleep(0.01)
                continue
            assert report.ok, f"poll {polls}: {report.reasons}"
            a = report.attrs
            now = (a.commit.rounds, a.commit.taylor_rounds, a.commit.snapshots)
            assert all(x >= y for x, y in zip(now, last, strict=True)), (last, now)
            last = now
            seen.add(a.status)
            with open_trace(out) as tr:
                for path in tr.layouts:
                    rows = tr.read(path)
                    n = tr.committed(tr.layouts[path].append_dim)
                    assert n is None or len(rows) == n
            assert summarize(out).stored > 0
            if polls % 4 == 0:
                for cmd in (["info", str(out)], ["validate", str(out)]):
                    res = runner.invoke(main, cmd)
                    assert res.exit_code == 0, f"ntrace {cmd[0]}: {res.output}"
            polls += 1
            if done:
                break
    finally:
        if proc.poll() is None:
            proc.kill()
        _, err = proc.communicate()
    assert proc.returncode == 0, err[-2000:]
    final = validate_trace(out)
    assert final.ok and final.attrs.status == "complete" and final.attrs.commit.rounds == 1500
    assert "running" in seen and polls >= 5, (seen, polls)
