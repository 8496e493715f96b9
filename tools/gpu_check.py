"""Device check for the CUDA recording path (run on a GPU machine; not a test).

1. Records mnist-autoencoder on the device through the Python API, with CUDA sync debugging
   ("warn") around every ``Recorder.step`` after round 0, and counts synchronising calls on
   unrecorded, Taylor and probe rounds separately (the design promises none on unrecorded ones).
2. Validates the trace (deep) and runs the raw-zarr conformance check on it.
Usage: python tools/gpu_check.py --data-dir DIR [--device cuda] [--steps 300]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ntrace.format.validate import validate_trace  # noqa: E402
from ntrace.recording import Recorder  # noqa: E402
from ntrace.tasks import get_task  # noqa: E402
from tests.recording.test_conformance import check_trace  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--cifar-dir", default=None, help="also check the CIFAR convnet")
    args = ap.parse_args()
    dev = torch.device(args.device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"device: {name}; torch {torch.__version__}")
    task = get_task("mnist-autoencoder")
    x_np, _ = task.load(args.data_dir)
    x = torch.as_tensor(x_np, device=dev)
    torch.manual_seed(0)
    model = task.build(x.shape[1]).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    out_path = Path(tempfile.mkdtemp()) / "cuda.zarr"
    rec = Recorder(model, out_path, loss="mse", optimizer=opt, sampling=task.sampling,
                   probe=x[:256], probe_index=range(256), expected_rounds=args.steps,
                   rounds_per_epoch=len(x) // 64)
    syncs = {"unrecorded": 0, "taylor": 0, "probe": 0}
    rounds = {"unrecorded": 0, "taylor": 0, "probe": 0}
    perm = torch.randperm(len(x), device=dev)
    start = time.perf_counter()
    for n in range(args.steps):
        idx = perm[(n * 64) % (len(x) - 64):][:64]
        xb = x[idx]
        out = model(xb)
        loss = torch.nn.functional.mse_loss(out, xb)
        kind = ("taylor" if rec.sampling.is_taylor_round(n) else
                "probe" if rec.sampling.is_probe_round(n) else "unrecorded")
        if n == 0:
            rec.step(loss, out, xb, indices=idx)
        else:
            rounds[kind] += 1
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                if dev.type == "cuda":
                    torch.cuda.set_sync_debug_mode("warn")
                rec.step(loss, out, xb)
                if dev.type == "cuda":
                    torch.cuda.set_sync_debug_mode("default")
            found = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
            syncs[kind] += len(found)
            if found:
                print(f"round {n} ({kind}): {found[0][:160]}")
        opt.zero_grad()
        loss.backward()
        opt.step()
    rec.close()
    print(f"recorded {args.steps} rounds in {time.perf_counter() - start:.2f} s")
    for k in syncs:
        print(f"sync calls inside Recorder.step on {k} rounds: {syncs[k]} over {rounds[k]} rounds")
    report = validate_trace(out_path)
    print("validate:", "ok" if report.ok else report.reasons)
    checked = check_trace(out_path)
    print(f"conformance: {checked} (Taylor round, layer) pairs agree with autograd")
    ok = report.ok and not syncs["unrecorded"]
    if args.cifar_dir:
        ok &= convnet_check(args.cifar_dir, args.device)
    if not ok:
        sys.exit(1)


def convnet_check(data_dir: str, device: str) -> bool:
    """The paper's CIFAR convnet recorded on the device (graph mode: reverse-mode Jacobians
    by autograd, max-pool states), then validated and checked against autograd on the CPU."""
    from ntrace.format.metadata import Sampling
    from ntrace.tasks.registry import convnet
    from ntrace.tasks.runner import RunOptions, run_task
    from tests.recording.graph_conformance import check_graph_trace

    out = Path(tempfile.mkdtemp()) / "cifar.zarr"
    res = run_task(get_task("cifar10-convnet"), RunOptions(
        out=str(out), steps=60, data_dir=data_dir, device=device,
        sampling=Sampling(taylor_every=10, samples_per_round=4, neurons=50)))
    report = validate_trace(out)
    print(f"cifar10-convnet on {device}: {res.rounds} rounds in {res.seconds:.2f} s; "
          f"validate: {'ok' if report.ok else report.reasons}")
    checked = check_graph_trace(out, convnet((3, 32, 32)), lambda g, t: torch.tensor(
        g["layers/conv1/input"][t]))
    print(f"convnet conformance: {checked} (Taylor round, layer) pairs agree with autograd")
    return report.ok


if __name__ == "__main__":
    main()
