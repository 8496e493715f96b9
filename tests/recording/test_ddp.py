"""Multi-process recording (spec 'Multi-process writing'): two CPU processes (gloo) train one
DistributedDataParallel model and record one trace together.

The independent reference is a single process that replays the same training on the global
minibatch (the processes' minibatches concatenated in rank order): the trace must hold its
losses and weights, and on every Taylor round the Taylor loss at W_n and its gradient,
recomputed from the stored factors with numpy, must equal that model's loss and autograd
gradient on the union of the recorded samples.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import zarr
from torch import nn

from ntrace.errors import TraceExistsError, UsageError
from ntrace.format.metadata import FORMAT_VERSION, Sampling
from ntrace.format.validate import validate_trace
from ntrace.recording import record

from .test_conformance import check_trace, loss_np, unpack

WORLD, BATCH, PER_RANK, STEPS, EVERY, PROBE_EVERY = 2, 8, 3, 12, 3, 4
N_DATA, D_IN, D_OUT = 64, 6, 4
ROOT = Path(__file__).resolve().parents[2]


def make_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N_DATA, D_IN, generator=g)
    y = torch.randn(N_DATA, D_OUT, generator=g)
    probe = torch.randn(5, D_IN, generator=g)
    return x, y, probe


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D_IN, 8), nn.ReLU(), nn.Linear(8, 5), nn.ReLU(),
                         nn.Linear(5, D_OUT))


def global_batch(n: int) -> torch.Tensor:
    """Dataset indices of round n's global minibatch; process r takes block r."""
    return torch.randperm(N_DATA, generator=torch.Generator().manual_seed(100 + n))[:WORLD * BATCH]


def _worker(rank: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    x, y, probe = make_data()
    model = nn.parallel.DistributedDataParallel(make_model())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    # expected_rounds=4 allocates 2 Taylor rows: the run grows every array (collectively);
    # commit_seconds=0 commits after every batch (the collective commit protocol)
    with record(model, out, loss="mse", optimizer=opt, probe=probe, probe_every=PROBE_EVERY,
                expected_rounds=4, commit_seconds=0.0,
                sampling=Sampling(taylor_every=EVERY, samples_per_round=PER_RANK)) as rec:
        for n in range(STEPS):
            idx = global_batch(n)[rank * BATCH:(rank + 1) * BATCH]
            out_ = model(x[idx])
            loss = nn.functional.mse_loss(out_, y[idx])
            rec.step(loss, out_, y[idx], indices=idx)
            opt.zero_grad()
            loss.backward()
            opt.step()
    # the trace exists: process 0 refuses to overwrite it, and every process fails together
    expected = TraceExistsError if rank == 0 else UsageError
    try:
        record(model, out, loss="mse")
    except expected:
        pass
    else:
        raise AssertionError("recording over an existing trace was not refused")
    # distributed=False: a recorder on process 0 only, no coordination (and no hang)
    solo = None
    if rank == 0:
        solo = record(model, out.replace("ddp.zarr", "solo.zarr"), loss="mse",
                      distributed=False, sampling=Sampling(taylor_every=1, samples_per_round=2))
    for n in range(2):
        idx = global_batch(n)[rank * BATCH:(rank + 1) * BATCH]
        out_ = model(x[idx])
        loss = nn.functional.mse_loss(out_, y[idx])
        if solo is not None:
            solo.step(loss, out_, y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    if solo is not None:
        solo.close()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_trace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("ddp")
    out = tmp / "ddp.zarr"
    torch.multiprocessing.spawn(_worker, args=(f"file://{tmp / 'rendezvous'}", str(out)),
                                nprocs=WORLD, join=True)
    return out


def test_ddp_trace_validates_with_the_global_sample_axis(ddp_trace: Path) -> None:
    report = validate_trace(ddp_trace)
    assert report.ok, report.reasons
    g = zarr.open_group(str(ddp_trace), mode="r")
    a = g.attrs["ntrace"]
    assert a["format_version"] == FORMAT_VERSION and a["status"] == "complete"
    assert a["sampling"]["world_size"] == WORLD
    assert a["sampling"]["samples_per_round"] == WORLD * PER_RANK
    taylor_rounds = list(range(0, STEPS, EVERY))
    assert a["commit"] == {"rounds": STEPS, "taylor_rounds": len(taylor_rounds),
                           "snapshots": len(range(0, STEPS, PROBE_EVERY))}
    assert g["taylor/output"].shape == (len(taylor_rounds), WORLD * PER_RANK, D_OUT)
    assert g["taylor/round_index"][:].tolist() == taylor_rounds
    # sample identities: process r's first PER_RANK dataset indices, at positions block r
    expect = [np.concatenate([global_batch(n)[r * BATCH:r * BATCH + PER_RANK].numpy()
                              for r in range(WORLD)]) for n in taylor_rounds]
    np.testing.assert_array_equal(g["taylor/sample_index"][:], np.stack(expect))


def test_a_recorder_on_one_process_only_records_that_process(ddp_trace: Path) -> None:
    solo = ddp_trace.parent / "solo.zarr"
    assert validate_trace(solo).ok
    sampling = zarr.open_group(str(solo), mode="r").attrs["ntrace"]["sampling"]
    assert (sampling["world_size"], sampling["samples_per_round"]) == (1, 2)


def test_each_process_owns_distinct_chunks_of_the_sample_axis(ddp_trace: Path) -> None:
    g = zarr.open_group(str(ddp_trace), mode="r")
    per_sample = 0
    for name in ["taylor/sample_index", "taylor/sample_loss", "taylor/output", "taylor/target",
                 *[f"layers/{n}/{k}" for n in g.attrs["ntrace"]["layers"]
                   for k in ("input", "jacobian", "mask")]]:
        if name not in g:
            continue  # the last layer's Jacobian is the identity, its activation too
        arr = g[name]
        assert arr.metadata.dimension_names[:2] == ("taylor_round", "sample")
        # chunk boundaries fall on process boundaries: no chunk holds two processes' samples
        assert arr.chunks[1] == PER_RANK and arr.shape[1] % arr.chunks[1] == 0, name
        per_sample += 1
    assert per_sample == 4 + 2 * 3 + 1  # 4 taylor arrays, input+mask ×3, jacobian ×2
    # arrays process 0 writes alone keep whole rows
    assert g[f"layers/{g.attrs['ntrace']['layers'][0]}/weight"].chunks[1:] == (8, D_IN)


def test_ddp_trace_equals_a_single_process_run_over_the_global_batch(ddp_trace: Path) -> None:
    g = zarr.open_group(str(ddp_trace), mode="r")
    names = g.attrs["ntrace"]["layers"]
    x, y, probe = make_data()
    model = make_model().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    linears = [m for m in model if isinstance(m, nn.Linear)]
    loss_rows = g["loss"][:]
    t = k = 0
    for n in range(STEPS):
        idx = global_batch(n)
        out = model(x[idx].double())
        loss = nn.functional.mse_loss(out, y[idx].double())
        # the round's loss is the global minibatch's mean loss, not process 0's
        np.testing.assert_allclose(loss_rows[n], loss.item(), rtol=1e-5)
        if n % PROBE_EVERY == 0:  # activation configuration of the probe set under W_n
            with torch.no_grad():
                a0 = linears[0](probe.double())
                a1 = linears[1](torch.relu(a0))
            states = unpack(g["probe/config"][k], 13)
            np.testing.assert_array_equal(states, torch.cat([a0 > 0, a1 > 0], 1).numpy())
            k += 1
        if n % EVERY == 0:
            _check_taylor_round(g, names, t, model, linears, x, y)
            t += 1
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert t == g.attrs["ntrace"]["commit"]["taylor_rounds"]
    # and the conformance check of the single-process recorder, from raw zarr
    assert check_trace(ddp_trace) == t * len(names)


def _check_taylor_round(g: zarr.Group, names: list[str], t: int, model: nn.Module,
                        linears: list[nn.Linear], x: torch.Tensor, y: torch.Tensor) -> None:
    """Round t: stored W_n are the replay's, and the Taylor loss from the stored factors and
    its gradient equal the replay model's loss and autograd gradient on the union of the
    recorded samples (spec §8 properties 1 and 2)."""
    union = torch.as_tensor(g["taylor/sample_index"][t])
    for name, lin in zip(names, linears, strict=True):
        np.testing.assert_allclose(g[f"layers/{name}/weight"][t], lin.weight.detach().numpy(),
                                   rtol=1e-5, atol=1e-6)
    model.zero_grad()
    ref = nn.functional.mse_loss(model(x[union].double()), y[union].double())
    ref.backward()
    f = g["taylor/output"][t].astype(np.float64)
    target = g["taylor/target"][t].astype(np.float64)
    np.testing.assert_allclose(target, y[union].numpy(), rtol=0, atol=0)
    ell, dell = loss_np("mse", f, target)  # Taylor loss at V = W_n: T_s = f_s
    np.testing.assert_allclose(ell.mean(), ref.item(), rtol=1e-5)
    S = len(union)
    for name, lin in zip(names, linears, strict=True):
        xin = g[f"layers/{name}/input"][t].astype(np.float64)
        if f"layers/{name}/jacobian" in g:
            J = g[f"layers/{name}/jacobian"][t].astype(np.float64)
        else:  # the identity Jacobian of the output layer
            J = np.broadcast_to(np.eye(f.shape[1]), (S, f.shape[1], f.shape[1]))
        delta = np.einsum("son,so->sn", J, dell)
        grad = np.einsum("sn,si->ni", delta, xin) / S
        ref_w = lin.weight.grad.numpy()
        np.testing.assert_allclose(grad, ref_w, rtol=1e-4, atol=1e-6 * np.abs(ref_w).max(),
                                   err_msg=f"layer {name}, Taylor round {t}")
        np.testing.assert_allclose(delta.mean(0), lin.bias.grad.numpy(), rtol=1e-4,
                                   atol=1e-6 * np.abs(lin.bias.grad.numpy()).max())
    model.zero_grad()


def _killed_worker(rank: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    x, y, _ = make_data()
    model = nn.parallel.DistributedDataParallel(make_model())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with record(model, out, loss="mse", optimizer=opt, commit_seconds=0.0,
                sampling=Sampling(taylor_every=2, samples_per_round=PER_RANK)) as rec:
        for n in range(1000):
            if rank == 1 and n == KILLED_AT:
                os._exit(3)  # process 1 dies; the launcher then kills process 0 (SIGTERM)
            idx = global_batch(n)[rank * BATCH:(rank + 1) * BATCH]
            out_ = model(x[idx])
            loss = nn.functional.mse_loss(out_, y[idx])
            rec.step(loss, out_, y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()


KILLED_AT = 30


def test_a_killed_process_leaves_a_valid_committed_prefix(tmp_path: Path) -> None:
    out = tmp_path / "killed.zarr"
    with pytest.raises(torch.multiprocessing.ProcessExitedException):
        torch.multiprocessing.spawn(_killed_worker, nprocs=WORLD, join=True,
                                    args=(f"file://{tmp_path / 'rendezvous'}", str(out)))
    report = validate_trace(out)
    assert report.ok, report.reasons
    assert report.attrs.status == "running"
    commit = report.attrs.commit
    assert 0 < commit.rounds <= KILLED_AT and commit.taylor_rounds == (commit.rounds + 1) // 2
    # every committed row of both processes is there: conformance on the committed prefix
    assert check_trace(out) == commit.taylor_rounds * 3


def test_zero_code_wrapper_under_torchrun(tmp_path: Path) -> None:
    """``torchrun --nproc_per_node 2 $(which ntrace) record --out … -- python ddp_loop.py``."""
    ntrace_script = shutil.which("ntrace", path=str(Path(sys.executable).parent))
    if ntrace_script is None:
        pytest.skip("the ntrace console script is not installed next to this python")
    out = tmp_path / "wrapped.zarr"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
         str(WORLD), ntrace_script, "record", "--out", str(out), "--taylor-every", "4",
         "--samples-per-round", "2", "--probe-size", "8", "--",
         "python", str(ROOT / "tools" / "examples" / "ddp_loop.py"), "--steps", "18"],
        capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    report = validate_trace(out)
    assert report.ok, report.reasons
    g = zarr.open_group(str(out), mode="r")
    a = g.attrs["ntrace"]
    assert (a["sampling"]["world_size"], a["sampling"]["samples_per_round"]) == (WORLD, 4)
    assert a["commit"]["rounds"] == 18 and a["commit"]["taylor_rounds"] == 5
    assert g["taylor/output"].chunks[1] == 2
    assert check_trace(out) == 5 * 3  # raw-zarr conformance on the union of both processes
