"""The one loss library: each loss against torch's own functional losses and the spec's
independent numpy definition (format.validate), the float32 losses the recorder writes
correctly rounded, and the recorder and the analyzer using it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ntrace.errors import UsageError
from ntrace.format.validate import _loss as numpy_loss
from ntrace.losses import LINKS, LOSSES, get_loss, per_sample_loss


def _data(loss_id: str, shape: tuple[int, ...], gen: torch.Generator
          ) -> tuple[torch.Tensor, torch.Tensor]:
    z = 3 * torch.randn(*shape, generator=gen, dtype=torch.float64)
    if get_loss(loss_id).classes:
        return z, torch.randint(0, shape[-1], shape[:-1], generator=gen)
    if loss_id == "bce_with_logits":
        return z, torch.rand(*shape, generator=gen, dtype=torch.float64)
    return z, torch.randn(*shape, generator=gen, dtype=torch.float64)


def _functional(loss_id: str, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """torch's own losses, on rows (N, o)."""
    if loss_id == "mse":
        return F.mse_loss(z, y, reduction="none").mean(-1)
    if loss_id == "cross_entropy":
        return F.cross_entropy(z, y, reduction="none")
    if loss_id == "nll":
        return F.nll_loss(z, y, reduction="none")
    return F.binary_cross_entropy_with_logits(z, y, reduction="none").mean(-1)


@pytest.mark.parametrize("loss_id", sorted(LOSSES))
def test_each_loss_against_torch_and_numpy_over_any_leading_axes(loss_id: str) -> None:
    gen = torch.Generator().manual_seed(0)
    z, y = _data(loss_id, (4, 6, 5), gen)  # (round, sample, output)
    got = LOSSES[loss_id].loss(z, y)
    assert got.shape == (4, 6)
    want = _functional(loss_id, z.reshape(24, 5), y.reshape(24, *y.shape[2:])).reshape(4, 6)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got.numpy(), numpy_loss(loss_id, z.numpy(), y.numpy()),
                               rtol=1e-12, atol=1e-12)
    rows = per_sample_loss(loss_id, z[0], y[0])
    torch.testing.assert_close(rows, got[0], rtol=1e-15, atol=0.0)


@pytest.mark.parametrize("loss_id", sorted(LOSSES))
def test_float32_losses_are_correctly_rounded(loss_id: str) -> None:
    """A confident prediction: logsumexp(z) − z_y cancels almost entirely in float32; the
    recorded loss is the float64 value rounded once."""
    gen = torch.Generator().manual_seed(1)
    z, y = _data(loss_id, (64, 10), gen)
    if get_loss(loss_id).classes:
        z[torch.arange(64), y] += 12.0
    z32 = z.float()
    y32 = y if get_loss(loss_id).classes else y.float()
    got = per_sample_loss(loss_id, z32, y32)
    assert got.dtype == torch.float32
    exact = LOSSES[loss_id].loss(z32.double(), y32.double() if y32.is_floating_point() else y32)
    torch.testing.assert_close(got, exact.float(), rtol=0.0, atol=0.0)


def test_links_are_the_losses_the_iterative_solvers_need() -> None:
    assert set(LINKS) == {"cross_entropy", "bce_with_logits"}
    assert all(LINKS[k] is LOSSES[k] for k in LINKS)
    gen = torch.Generator().manual_seed(2)
    for loss_id, link in LINKS.items():
        z, y = _data(loss_id, (7, 4), gen)
        z.requires_grad_(True)
        link.loss(z, y).sum().backward()
        torch.testing.assert_close(link.grad(z.detach(), y), z.grad)


def test_record_and_analyze_use_this_library() -> None:
    from ntrace.analyze import crossentropy, hindsight, taylor, workingset
    from ntrace.recording import recorder

    assert recorder.per_sample_loss is per_sample_loss
    assert hindsight.LINKS is LINKS
    assert taylor.get_loss is get_loss
    assert isinstance(crossentropy.CE, type(LOSSES["cross_entropy"]))
    assert workingset.CrossEntropy is type(LOSSES["cross_entropy"])


def test_mistakes_are_one_line_usage_errors() -> None:
    with pytest.raises(UsageError, match="unknown loss 'hinge'; use mse, cross_entropy"):
        per_sample_loss("hinge", torch.zeros(2, 3), torch.zeros(2, 3))
    with pytest.raises(UsageError, match=r"mse: target shape \(2, 4\) differs from output "
                                         r"shape \(2, 3\)"):
        per_sample_loss("mse", torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(UsageError, match="cross_entropy: target must be a 1-D tensor of "
                                         "class indices"):
        per_sample_loss("cross_entropy", torch.zeros(2, 3), torch.zeros(2, 3))
