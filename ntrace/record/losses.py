"""Per-sample losses in torch, exactly as the spec's 'Losses' section defines them."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ntrace.errors import UsageError


def per_sample_loss(loss_id: str, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """ℓ_i for each row i: ``mse`` = mean over outputs of (f−y)²; ``cross_entropy`` =
    logsumexp(f) − f[y]. The minibatch loss is the mean of these."""
    if loss_id == "mse":
        if target.shape != output.shape:
            raise UsageError(f"mse: target shape {tuple(target.shape)} differs from output shape "
                             f"{tuple(output.shape)}")
        return (output - target).pow(2).flatten(1).mean(dim=1)
    if loss_id == "cross_entropy":
        if target.ndim != 1 or target.dtype not in (torch.int64, torch.int32, torch.uint8):
            raise UsageError("cross_entropy: target must be a 1-D tensor of class indices, found "
                             f"shape {tuple(target.shape)} dtype {target.dtype}")
        return F.cross_entropy(output, target.long(), reduction="none")
    raise UsageError(f"unknown loss {loss_id!r}; use 'mse' or 'cross_entropy'")
