"""The official PyTorch MNIST example (pytorch/examples, mnist/main.py), as users write it:
functional ops (``F.relu``, ``F.max_pool2d``, ``torch.flatten``, ``F.log_softmax``),
``nn.Dropout`` modules, ``F.nll_loss``, Adadelta and StepLR. No ntrace in it.

Small by default so that it runs offline in seconds: the sklearn digits (8×8, upsampled to
``--image-size``) unless ``--data-dir`` names a directory with the MNIST IDX files
(``t10k-images-idx3-ubyte.gz``, ``t10k-labels-idx1-ubyte.gz``), e.g. ``../shared/data/mnist``.
Record it unmodified with:
    ntrace record --out mnist.zarr -- python tools/examples/mnist_functional.py --epochs 2
"""

from __future__ import annotations

import argparse
import gzip
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn, optim
from torch.optim.lr_scheduler import StepLR
from torch.utils.data import DataLoader, TensorDataset


class Net(nn.Module):
    def __init__(self, image_size: int = 12, channels: int = 8, hidden: int = 32) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, channels, 3, 1)
        self.conv2 = nn.Conv2d(channels, 2 * channels, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        side = (image_size - 4) // 2
        self.fc1 = nn.Linear(2 * channels * side * side, hidden)
        self.fc2 = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = F.relu(x)
        x = self.conv2(x)
        x = F.relu(x)
        x = F.max_pool2d(x, 2)
        x = self.dropout1(x)
        x = torch.flatten(x, 1)
        x = self.fc1(x)
        x = F.relu(x)
        x = self.dropout2(x)
        x = self.fc2(x)
        output = F.log_softmax(x, dim=1)
        return output


def train(args: argparse.Namespace, model: nn.Module, train_loader: DataLoader,
          optimizer: optim.Optimizer, epoch: int, step_times: list[float]) -> None:
    model.train()
    for batch_idx, (data, target) in enumerate(train_loader):
        t = time.perf_counter()
        optimizer.zero_grad()
        output = model(data)
        loss = F.nll_loss(output, target)
        loss.backward()
        optimizer.step()
        step_times.append(time.perf_counter() - t)
        if batch_idx % args.log_interval == 0:
            print(f"Train Epoch: {epoch} [{batch_idx * len(data)}/{len(train_loader.dataset)}]"
                  f"\tLoss: {loss.item():.6f}")
            if args.dry_run:
                break


def test(model: nn.Module, test_loader: DataLoader) -> None:
    model.eval()
    test_loss, correct = 0.0, 0
    with torch.no_grad():
        for data, target in test_loader:
            output = model(data)
            test_loss += F.nll_loss(output, target, reduction="sum").item()
            pred = output.argmax(dim=1, keepdim=True)
            correct += pred.eq(target.view_as(pred)).sum().item()
    n = len(test_loader.dataset)
    print(f"Test set: Average loss: {test_loss / n:.4f}, Accuracy: {correct}/{n}")


def _idx(path: Path) -> np.ndarray:
    with gzip.open(path) as f:
        data = f.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * dims).reshape(shape)


def load(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (n, 1, image_size, image_size) normalised as the example does, and labels."""
    if args.data_dir:
        d = Path(args.data_dir)
        x = torch.tensor(_idx(d / "t10k-images-idx3-ubyte.gz") / 255.0, dtype=torch.float32)
        y = torch.tensor(_idx(d / "t10k-labels-idx1-ubyte.gz").astype(np.int64))
    else:
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.tensor(digits.images / 16.0, dtype=torch.float32)
        y = torch.tensor(digits.target)
    x, y = x[:args.samples], y[:args.samples]
    x = F.interpolate(x[:, None], size=(args.image_size, args.image_size), mode="bilinear",
                      align_corners=False)
    return (x - 0.1307) / 0.3081, y


def main() -> None:
    parser = argparse.ArgumentParser(description="PyTorch MNIST Example (small)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--test-batch-size", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1.0)
    parser.add_argument("--gamma", type=float, default=0.7)
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--log-interval", type=int, default=10)
    parser.add_argument("--data-dir", default=None, help="MNIST IDX files (default: digits)")
    parser.add_argument("--samples", type=int, default=512, help="images used (train+test)")
    parser.add_argument("--image-size", type=int, default=12)
    parser.add_argument("--channels", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=32)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    x, y = load(args)
    split = len(x) * 5 // 6
    train_loader = DataLoader(TensorDataset(x[:split], y[:split]), batch_size=args.batch_size,
                              shuffle=True)
    test_loader = DataLoader(TensorDataset(x[split:], y[split:]),
                             batch_size=args.test_batch_size)
    model = Net(args.image_size, args.channels, args.hidden)
    optimizer = optim.Adadelta(model.parameters(), lr=args.lr)
    scheduler = StepLR(optimizer, step_size=1, gamma=args.gamma)
    step_times: list[float] = []
    train_seconds = 0.0
    for epoch in range(1, args.epochs + 1):
        start = time.perf_counter()
        train(args, model, train_loader, optimizer, epoch, step_times)
        train_seconds += time.perf_counter() - start
        test(model, test_loader)
        scheduler.step()
    print(f"train loop: {train_seconds:.3f} s, median step "
          f"{1e3 * statistics.median(step_times):.3f} ms over {len(step_times)} steps")


if __name__ == "__main__":
    main()
