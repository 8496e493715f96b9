"""Mixed precision with gradient accumulation (no ntrace in it): a digits classifier.

The loop follows PyTorch's "Automatic Mixed Precision" recipe with the usual
gradient-accumulation idiom: the forward runs under ``torch.autocast`` (bfloat16 on the CPU;
float16 or bfloat16 on a GPU), a ``GradScaler`` scales the loss before ``backward()``,
gradients of ``--accumulate`` micro-batches add up before each optimizer step, a
``OneCycleLR`` schedule sets the learning rate, and ``zero_grad(set_to_none=True)`` clears the
gradients.

Record it unmodified with:
    ntrace record --out amp.zarr -- python tools/examples/amp_accumulation.py
Each optimizer step is one round; its loss is the mean over the step's micro-batches.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=32, help="samples per micro-batch")
    ap.add_argument("--accumulate", type=int, default=4, help="micro-batches per optimizer step")
    ap.add_argument("--max-lr", type=float, default=0.05)
    ap.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    torch.manual_seed(0)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)

    digits = load_digits()
    data = TensorDataset(torch.tensor(digits.data / 16.0, dtype=torch.float32),
                         torch.tensor(digits.target))
    loader = DataLoader(data, batch_size=args.batch_size, shuffle=True, drop_last=True)

    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(),
                          nn.Linear(32, 10)).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.max_lr, momentum=0.9)
    steps_per_epoch = len(loader) // args.accumulate
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=args.max_lr, total_steps=args.epochs * steps_per_epoch)
    # float16 needs the scaler (its gradients underflow); with bfloat16 it is harmless, so the
    # same loop serves both
    scaler = torch.amp.GradScaler(device.type)

    start, step_times = time.perf_counter(), []
    for epoch in range(args.epochs):
        total = 0.0
        t = time.perf_counter()
        for i, (x, y) in enumerate(loader):
            x, y = x.to(device), y.to(device)
            with torch.autocast(device_type=device.type, dtype=dtype):
                logits = model(x)  # low precision
                loss = F.cross_entropy(logits, y)  # autocast computes it in float32
            scaler.scale(loss / args.accumulate).backward()
            total += loss.item()
            if (i + 1) % args.accumulate == 0:
                scaler.step(optimizer)  # skipped if the scaled gradients overflowed
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                step_times.append(time.perf_counter() - t)  # one optimizer step: k batches
                t = time.perf_counter()
        print(f"epoch {epoch}: mean loss {total / len(loader):.4f}, "
              f"lr {scheduler.get_last_lr()[0]:.4f}")
    print(f"train loop: {time.perf_counter() - start:.3f} s, median step "
          f"{1e3 * statistics.median(step_times):.3f} ms over {len(step_times)} steps")


if __name__ == "__main__":
    main()
