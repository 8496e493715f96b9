"""The commit protocol survives a writer killed at any instant (spec 'Commit protocol').

Two complementary proofs:

- *every write boundary*: a small recording is made in-process with every store write,
  delete and the final rename of the new trace logged; the log is then replayed one
  operation at a time into a fresh directory, and after each operation the trace must be
  absent (not yet published) or validate, commit no fewer rounds than before, and hold in
  its committed rows exactly what the finished trace holds. Since every key is written
  atomically (temporary file, then rename), the state a SIGKILL leaves is one of these
  prefixes, plus ``*.partial`` files, which readers ignore;
- *real kills*: ``tools/crash_test.py`` SIGKILLs real recordings of the default task at
  random instants (a few here; ``python tools/crash_test.py`` runs 50).
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import zarr.storage
from torch import nn

import ntrace.format.writer as writer_module
from ntrace.format.metadata import Sampling
from ntrace.format.reader import open_trace
from ntrace.format.store import prepare_output
from ntrace.format.summary import summarize
from ntrace.format.validate import validate_trace
from ntrace.recording import record

REPO = Path(__file__).resolve().parents[2]
ROUNDS, BATCH = 9, 4


def _tiny_recording(path: Path) -> None:
    """A 6→4→3 ReLU MLP, 12 SGD rounds; Taylor data every 3 rounds, a probe every 2, and a
    commit after every round (commit_seconds=0) so that every commit boundary is exercised."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((ROUNDS * BATCH, 6)).astype(np.float32))
    y = torch.tanh(x @ torch.from_numpy(rng.standard_normal((6, 3)).astype(np.float32)))
    model = nn.Sequential(OrderedDict(fc1=nn.Linear(6, 4), relu1=nn.ReLU(),
                                      fc2=nn.Linear(4, 3)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with record(model, path, loss="mse", optimizer=opt,
                sampling=Sampling(taylor_every=3, samples_per_round=2), probe=x[:5],
                probe_index=range(5), probe_every=2, expected_rounds=4, overwrite=True,
                commit_seconds=0.0) as rec:
        for n in range(ROUNDS):
            xb, yb = x[n * BATCH:(n + 1) * BATCH], y[n * BATCH:(n + 1) * BATCH]
            out = model(xb)
            loss = torch.nn.functional.mse_loss(out, yb)
            rec.step(loss, out, yb, indices=range(n * BATCH, (n + 1) * BATCH))
            opt.zero_grad()
            loss.backward()
            opt.step()


@pytest.fixture(scope="module")
def write_log(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[tuple[Any, ...]]]:
    """Record the tiny trace, logging (op, store root, key, bytes) for every store change."""
    log: list[tuple[Any, ...]] = []
    mp = pytest.MonkeyPatch()
    original = {name: getattr(zarr.storage.LocalStore, name)
                for name in ("set", "set_if_not_exists", "delete")}

    async def set_(self: Any, key: str, value: Any) -> None:
        await original["set"](self, key, value)
        log.append(("put", Path(self.root), key, value.to_bytes()))

    async def set_if_not_exists(self: Any, key: str, value: Any) -> None:
        if not await self.exists(key):
            await set_(self, key, value)

    async def delete(self: Any, key: str) -> None:
        await original["delete"](self, key)
        log.append(("delete", Path(self.root), key, None))

    publish = writer_module.publish

    def publish_(staging: Path, final: Any) -> Path:
        out = publish(staging, final)
        log.append(("publish", Path(staging), str(final), None))
        return out

    mp.setattr(zarr.storage.LocalStore, "set", set_)
    mp.setattr(zarr.storage.LocalStore, "set_if_not_exists", set_if_not_exists)
    mp.setattr(zarr.storage.LocalStore, "delete", delete)
    mp.setattr(writer_module, "publish", publish_)
    path = tmp_path_factory.mktemp("crash") / "tiny.zarr"
    try:
        _tiny_recording(path)
    finally:
        mp.undo()
    return path, log


def _committed_rows(tr: Any) -> dict[str, np.ndarray]:
    return {p: tr.read(p) for p in ("loss", "taylor/round_index", "taylor/output",
                                    "layers/fc1/weight", "layers/fc2/input", "probe/config")}


def test_every_write_boundary_leaves_a_valid_committed_prefix(
        write_log: tuple[Path, list[tuple[Any, ...]]], tmp_path: Path) -> None:
    final, log = write_log
    publishes = [i for i, ev in enumerate(log) if ev[0] == "publish"]
    assert len(publishes) == 1, "the writer renames the created trace into place once"
    assert all(ev[1] != final for ev in log[: publishes[0]]), \
        "nothing is written at the trace's path before it is published whole"
    with open_trace(final) as done:
        want = _committed_rows(done)
    replay = tmp_path / "replay.zarr"
    staged: dict[str, bytes | None] = {}
    last = (0, 0, 0)
    checked = 0
    for i, (op, _root, key, data) in enumerate(log):
        if op == "publish":
            for k, v in staged.items():
                if v is not None:
                    (replay / k).parent.mkdir(parents=True, exist_ok=True)
                    (replay / k).write_bytes(v)
        elif i < publishes[0]:
            staged[key] = data if op == "put" else None
            continue
        elif op == "put":
            (replay / key).parent.mkdir(parents=True, exist_ok=True)
            (replay / key).write_bytes(data)
        else:
            (replay / key).unlink(missing_ok=True)
        report = validate_trace(replay)
        assert report.ok, f"after write {i} ({op} {key}): {report.reasons}"
        c = report.attrs.commit
        now = (c.rounds, c.taylor_rounds, c.snapshots)
        assert all(a >= b for a, b in zip(now, last, strict=True)), \
            f"after write {i}: commit went back from {last} to {now}"
        last = now
        with open_trace(replay) as tr:
            for p, rows in _committed_rows(tr).items():
                n = len(rows)
                np.testing.assert_array_equal(rows, want[p][:n], err_msg=f"write {i}: {p}")
        checked += 1
    assert last == (ROUNDS, 3, 5) and checked > 50


def test_partial_files_of_a_killed_writer_are_ignored(tmp_path: Path) -> None:
    """zarr's LocalStore writes ``<name>.<uuid>.partial`` then renames; a kill between the
    two leaves the temporary file, which readers, the validator, info and pack ignore."""
    from ntrace.format.pack import pack_trace, verify_pack

    t = tmp_path / "t.zarr"
    shutil.copytree(REPO / "spec/examples/valid/running-uncommitted-rows.zarr", t)
    before = summarize(t).stored
    for d in (t, t / "loss", t / "layers/fc1/weight/c/0/0", t / "taylor"):
        (d / f"zarr.{'ab' * 16}.partial").write_bytes(b"{ torn")
        (d / f"0.{'cd' * 16}.partial").write_bytes(b"\x00" * 1000)
    assert validate_trace(t).ok
    assert summarize(t).stored == before
    with open_trace(t) as tr:
        assert tr.nbytes_stored() == before
        tr.datatree()
    result = pack_trace(t, tmp_path / "t.zip")
    assert verify_pack(result.path).ok and not result.skipped
    assert validate_trace(result.path).ok


def test_overwrite_moves_the_old_trace_aside_in_one_step(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A process killed while an old trace is deleted leaves no partial trace at the path:
    the old one is renamed aside first (here the deletion itself 'dies')."""
    t = tmp_path / "t.zarr"
    shutil.copytree(REPO / "spec/examples/valid/tiny-mlp.zarr", t)

    def dies(path: Any, ignore_errors: bool = False) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "rmtree", dies)
    with pytest.raises(KeyboardInterrupt):
        prepare_output(t, overwrite=True)
    assert not t.exists()
    aside = [p for p in tmp_path.iterdir() if p.name.startswith(".t.zarr.")]
    assert len(aside) == 1 and (aside[0] / "zarr.json").is_file()


def _crash_tool() -> Any:
    path = REPO / "tools" / "crash_test.py"
    if "crash_test" in sys.modules:
        return sys.modules["crash_test"]
    spec = importlib.util.spec_from_file_location("crash_test", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["crash_test"] = module
    spec.loader.exec_module(module)
    return module


def test_sigkill_at_random_instants_leaves_valid_traces(tmp_path: Path) -> None:
    summary = _crash_tool().run_trials(5, seed=3, steps=150, work=tmp_path)
    assert summary["failures"] == 0, summary["failure_reasons"]
    assert summary["trials"] + summary["finished_before_kill"] == 5
    full = [r for r in summary["results"] if not r["killed"]]
    assert all(r["status"] == "complete" and r["committed"] == 150 for r in full)


def test_a_full_disk_never_leaves_unwritten_rows_in_the_commit(tmp_path: Path) -> None:
    """Issue 18: on a full disk the commit counted rows never written (NaN Jacobians in a
    'valid' prefix). Two stores too small for the run (simulated: a store refusing writes
    past that many bytes); `python tools/crash_test.py --disk-full` uses real tmpfs mounts."""
    summary = _crash_tool().run_disk_full([200 << 10, 2 << 20], steps=150, seed=1,
                                          work=tmp_path, simulate=True)
    assert summary["filled"] == 2 and summary["exit_codes"] == [10]
    assert summary["committed_unwritten"] == 0 and summary["invalid"] == 0, summary["results"]
    assert summary["locks_left"] == 0


def test_a_concurrent_overwrite_leaves_one_trace_and_a_refusal(tmp_path: Path) -> None:
    """Issue 18: two `--overwrite` recordings of one path left an invalid mix of both, each
    exiting 0. Started together, one now wins and the other exits 4 naming it."""
    summary = _crash_tool().run_concurrent(1, steps=60, seed=2, work=tmp_path)
    assert summary["failures"] == 0, summary["failure_reasons"]
    assert summary["one_refused"] == 1 and summary["valid_traces"] == 1
