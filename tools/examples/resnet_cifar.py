"""A torchvision-style ResNet on CIFAR-10 (no ntrace in it): BatchNorm in training mode,
ReLU(inplace=True), residual additions, 1×1 downsampling, adaptive average pooling.

Record it unmodified with (BatchNorm in training mode needs the one flag):
    ntrace record --batchnorm fixed-stats --out resnet.zarr -- \\
        python tools/examples/resnet_cifar.py --steps 200

Data: ``--data-dir DIR`` reads the first ``*.npz`` there with arrays ``x`` (N, 32, 32, 3) uint8
and ``y`` (N,) class indices (e.g. ../shared/data/cifar10); without it, random images of
learnable classes (offline, seeded).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


class ResNet(nn.Module):
    def __init__(self, layers: list[int], width: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        self.inplanes = width
        self.conv1 = conv3x3(3, width)  # CIFAR stem: 3×3, no max-pool
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        stages = []
        for i, blocks in enumerate(layers):
            stages.append(self._make_layer(width * 2 ** i, blocks, stride=1 if i == 0 else 2))
        self.layers = nn.Sequential(*stages)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(self.inplanes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes, stride),
                                       nn.BatchNorm2d(planes))
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layers(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


def resnet(depth: int = 2, width: int = 16, stages: int = 3) -> ResNet:
    """``stages`` stages of ``depth`` basic blocks (ResNet-20 is depth 3, width 16)."""
    return ResNet([depth] * stages, width)


def load_data(data_dir: str | None, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    if data_dir is not None:
        files = sorted(Path(data_dir).glob("*.npz"))
        if not files:
            raise SystemExit(f"no *.npz file in {data_dir}")
        with np.load(files[0], allow_pickle=False) as d:
            x, y = d["x"][:size], d["y"][:size]
        images = torch.tensor(x, dtype=torch.float32).permute(0, 3, 1, 2) / 255.0
        mean = images.mean(dim=(0, 2, 3), keepdim=True)
        std = images.std(dim=(0, 2, 3), keepdim=True)
        return (images - mean) / std, torch.tensor(y, dtype=torch.int64)
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (size,), generator=g)
    prototypes = torch.randn(10, 3, 32, 32, generator=g)
    return prototypes[y] + torch.randn(size, 3, 32, 32, generator=g), y


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--train-size", type=int, default=5000)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--steps", type=int, default=None, help="stop after this many steps")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--depth", type=int, default=1, help="basic blocks per stage")
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--stages", type=int, default=3)
    ap.add_argument("--image-size", type=int, default=32, help="crop images to this size")
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    x, y = load_data(args.data_dir, args.train_size, args.seed)
    x = x[:, :, :args.image_size, :args.image_size]
    loader = DataLoader(TensorDataset(x, y), batch_size=args.batch_size, shuffle=True,
                        drop_last=True)
    model = resnet(args.depth, args.width, args.stages)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    criterion = nn.CrossEntropyLoss()
    step = 0
    step_times = []
    start = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        for images, labels in loader:
            t = time.perf_counter()
            optimizer.zero_grad()
            loss = criterion(model(images), labels)
            loss.backward()
            optimizer.step()
            step_times.append(time.perf_counter() - t)
            step += 1
            if args.steps is not None and step >= args.steps:
                break
        print(f"epoch {epoch} step {step} loss {loss.item():.4f}")
        if args.steps is not None and step >= args.steps:
            break
    print(f"train loop: {time.perf_counter() - start:.3f} s, median step "
          f"{1e3 * statistics.median(step_times):.3f} ms over {len(step_times)} steps")


if __name__ == "__main__":
    main()
