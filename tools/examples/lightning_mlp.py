"""A PyTorch Lightning module (no ntrace in it): an MLP classifier of the 8×8 digits.

Written as the Lightning docs write one: the model's layers and ``training_step`` in a
``LightningModule``, the optimizer and its learning-rate schedule in ``configure_optimizers``,
and ``Trainer.fit`` running the loop (here on the CPU, without logger or checkpoints).

Record it unmodified with:
    ntrace record --out lightning.zarr -- python tools/examples/lightning_mlp.py
Each optimizer step of the fit is one round (``--accumulate k``: one per k batches).
"""

from __future__ import annotations

import argparse

import lightning as L
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class DigitsClassifier(L.LightningModule):
    def __init__(self, hidden: int = 32, lr: float = 1e-2) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                                 nn.ReLU(), nn.Linear(hidden, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
                      ) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> dict:
        optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.7)
        return {"optimizer": optimizer, "lr_scheduler": scheduler}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--accumulate", type=int, default=1, help="batches per optimizer step")
    ap.add_argument("--lr", type=float, default=1e-2)
    args = ap.parse_args()
    L.seed_everything(0, verbose=False)
    digits = load_digits()
    data = TensorDataset(torch.tensor(digits.data / 16.0, dtype=torch.float32),
                         torch.tensor(digits.target))
    loader = DataLoader(data, batch_size=args.batch_size, shuffle=True, drop_last=True)
    trainer = L.Trainer(max_epochs=args.epochs, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_model_summary=False,
                        accumulate_grad_batches=args.accumulate)
    trainer.fit(DigitsClassifier(lr=args.lr), loader)


if __name__ == "__main__":
    main()
