"""The backward recursion for J_l = ∂f/∂a_l against torch.func forward and reverse mode."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ntrace.format.metadata import Activation
from ntrace.recording.jacobian import jacobians_autograd, jacobians_recursive
from ntrace.recording.structure import Watcher, discover


def chain(final: nn.Module | None) -> nn.Sequential:
    mods: list[nn.Module] = [nn.Linear(7, 6), nn.ReLU(), nn.Linear(6, 5), nn.LeakyReLU(0.2),
                             nn.Linear(5, 4)]
    if final is not None:
        mods.append(final)
    return nn.Sequential(*mods).double()


@pytest.mark.parametrize("final", [None, nn.ReLU(), nn.LeakyReLU(0.3)])
@pytest.mark.parametrize("mode", ["forward", "reverse"])
def test_recursion_matches_autograd(final: nn.Module | None, mode: str) -> None:
    torch.manual_seed(3)
    model = chain(final)
    x = torch.randn(9, 7, dtype=torch.float64)
    watcher = Watcher(model)
    model(x)
    layers = discover(watcher.log, model).layers
    pre = [watcher.log.calls[cl.call_index].output.detach() for cl in layers]
    watcher.remove()
    fast = jacobians_recursive([cl.module.weight.detach() for cl in layers],
                               [cl.activation for cl in layers], pre)
    ref = jacobians_autograd(model, [cl.module for cl in layers], x, mode=mode)
    for k, (J, R) in enumerate(zip(fast, ref, strict=True)):
        if J is None:  # identity output layer
            assert k == len(layers) - 1 and final is None
            J = torch.eye(4, dtype=torch.float64).expand(9, 4, 4)
        torch.testing.assert_close(J, R, rtol=1e-10, atol=1e-12)


def test_activation_slopes_at_zero_follow_torch() -> None:
    """At a = 0 the slope is torch's subgradient choice (0 for ReLU), so J agrees with
    autograd even on ties."""
    W = [torch.eye(3), torch.eye(3)]
    a = torch.tensor([[0.0, 1.0, -1.0]])
    (J0, _) = jacobians_recursive(W, [Activation("relu"), Activation("identity")], [a, a])
    assert J0 is not None
    assert torch.equal(torch.diagonal(J0[0]), torch.tensor([0.0, 1.0, 0.0]))
