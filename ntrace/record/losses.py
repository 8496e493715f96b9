"""Per-sample losses in torch, exactly as the spec's 'Losses' section defines them."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ntrace.errors import UsageError


def per_sample_loss(loss_id: str, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """ℓ_i for each row i (spec 'Losses'): ``mse`` = mean over outputs of (f−y)²;
    ``cross_entropy`` = logsumexp(f) − f[y]; ``nll`` = −f[y]; ``bce_with_logits`` = mean over
    outputs of log(1 + e^f) − y·f. The minibatch loss is the mean of these."""
    if loss_id == "mse":
        if target.shape != output.shape:
            raise UsageError(f"mse: target shape {tuple(target.shape)} differs from output shape "
                             f"{tuple(output.shape)}")
        return (output - target).pow(2).flatten(1).mean(dim=1)
    if loss_id in ("cross_entropy", "nll"):
        if target.ndim != 1 or target.dtype not in (torch.int64, torch.int32, torch.uint8):
            raise UsageError(f"{loss_id}: target must be a 1-D tensor of class indices, found "
                             f"shape {tuple(target.shape)} dtype {target.dtype}")
        if loss_id == "nll":  # output holds log-probabilities: ℓ = −f[y], linear in f
            return -output.gather(1, target.long()[:, None])[:, 0]
        return F.cross_entropy(output, target.long(), reduction="none")
    if loss_id == "bce_with_logits":
        if target.shape != output.shape:
            raise UsageError(f"bce_with_logits: target shape {tuple(target.shape)} differs from "
                             f"output shape {tuple(output.shape)}")
        return F.binary_cross_entropy_with_logits(output, target.to(output.dtype),
                                                  reduction="none").flatten(1).mean(dim=1)
    raise UsageError(f"unknown loss {loss_id!r}; use mse, cross_entropy, bce_with_logits or nll")
