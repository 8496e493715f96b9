"""A plain DistributedDataParallel training loop (no ntrace in it): an MLP autoencoder on the
8×8 digits, one shard of every epoch per process (gloo, CPU).

Run it:              torchrun --standalone --nproc_per_node 2 tools/examples/ddp_loop.py
Record it unmodified (every process records its own samples into one trace):
    torchrun --standalone --nproc_per_node 2 "$(which ntrace)" record --out ddp.zarr \\
        -- python tools/examples/ddp_loop.py
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
from sklearn.datasets import load_digits
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=16, help="per process")
    ap.add_argument("--lr", type=float, default=0.05)
    args = ap.parse_args()
    dist.init_process_group("gloo")
    torch.manual_seed(0)  # the same initial weights everywhere (DDP also broadcasts them)
    x = torch.tensor(load_digits().data / 16.0, dtype=torch.float32)
    data = TensorDataset(x)
    sampler = DistributedSampler(data, shuffle=True, seed=0, drop_last=True)
    loader = DataLoader(data, batch_size=args.batch_size, sampler=sampler, drop_last=True)
    model = DistributedDataParallel(nn.Sequential(
        nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 64)))
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    loss_fn = nn.MSELoss()
    step, epoch = 0, 0
    while step < args.steps:
        sampler.set_epoch(epoch)
        for (batch,) in loader:
            loss = loss_fn(model(batch), batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step % 50 == 0 and dist.get_rank() == 0:
                print(f"step {step} loss {loss.item():.4f}")
            step += 1
            if step == args.steps:
                break
        epoch += 1
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
