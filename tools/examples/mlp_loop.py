"""A plain PyTorch training loop (no ntrace in it): an MLP autoencoder on the 8×8 digits.

Record it unmodified with:  ntrace record --out mlp.zarr -- python tools/examples/mlp_loop.py
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from sklearn.datasets import load_digits
from torch import nn


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=1e-3)
    args = ap.parse_args()
    torch.manual_seed(0)
    x = torch.tensor(load_digits().data / 16.0, dtype=torch.float32)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(),
                          nn.Linear(16, 64))
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    loss_fn = nn.MSELoss()
    step_times = []
    start = time.perf_counter()
    for step in range(args.steps):
        t = time.perf_counter()
        idx = torch.randint(0, len(x), (64,))
        batch = x[idx]
        loss = loss_fn(model(batch), batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step_times.append(time.perf_counter() - t)
        if step % 50 == 0:
            print(f"step {step} loss {loss.item():.4f}")
    print(f"train loop: {time.perf_counter() - start:.3f} s, median step "
          f"{1e3 * statistics.median(step_times):.3f} ms over {len(step_times)} steps")


if __name__ == "__main__":
    main()
