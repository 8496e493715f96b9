"""Each registered functional form and the module its op builds for a call
(:meth:`Op.as_module`) compute the same thing: one definition serves both forms."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from ntrace import ops

torch.manual_seed(0)
A = torch.randn(3, 5, 4)
W = torch.rand(5) * 0.5
X1, X2, X3 = torch.randn(2, 3, 9), torch.randn(2, 3, 7, 6), torch.randn(2, 2, 4, 5, 6)
Q = torch.randn(2, 2, 3, 4)

# (function, positional arguments after the input, keyword arguments, input)
CALLS: list[tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any], torch.Tensor]] = [
    (F.relu, (), {}, A), (F.relu_, (), {}, A), (torch.relu, (), {}, A),
    (torch.relu_, (), {}, A), (torch.Tensor.relu, (), {}, A), (torch.Tensor.relu_, (), {}, A),
    (F.leaky_relu, (0.2,), {}, A), (F.leaky_relu_, (), {"negative_slope": 0.3}, A),
    (F.hardtanh, (-0.5, 0.5), {}, A), (F.hardtanh_, (), {"min_val": -0.2}, A),
    (F.relu6, (), {}, A * 8), (F.prelu, (W,), {}, A), (F.rrelu, (0.1, 0.3), {}, A),
    (F.rrelu_, (), {"lower": 0.2, "upper": 0.4}, A),
    (F.max_pool1d, (2,), {}, X1), (F.max_pool2d, (3,), {"stride": 2, "padding": 1}, X2),
    (F.max_pool3d, (2,), {"ceil_mode": True}, X3), (F.max_pool1d_with_indices, (3, 2), {}, X1),
    (F.max_pool2d_with_indices, (2,), {"dilation": 2}, X2),
    (F.max_pool3d_with_indices, (2,), {}, X3), (torch.max_pool1d, (2,), {}, X1),
    (torch.max_pool2d, ([2, 3], [], [1, 1]), {}, X2), (torch.max_pool3d, (2, 1), {}, X3),
    (torch.max_pool1d_with_indices, (3,), {}, X1),
    (F.dropout, (0.3,), {}, A), (F.dropout1d, (0.5,), {}, X1), (F.dropout2d, (), {"p": 0.4}, X2),
    (F.dropout3d, (0.5, True), {}, X3), (F.dropout, (0.3, False), {}, A),
    (F.scaled_dot_product_attention, (Q, Q), {}, Q),
    (F.alpha_dropout, (0.3, True), {}, A), (F.feature_alpha_dropout, (0.2,), {}, X2),
]


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("func, args, kwargs, x", CALLS,
                         ids=lambda v: getattr(v, "__qualname__", None) if callable(v) else "")
def test_the_function_and_its_module_agree(func: Callable[..., Any], args: tuple[Any, ...],
                                           kwargs: dict[str, Any], x: torch.Tensor) -> None:
    op = ops.FUNCTIONS[func]
    module = op.as_module(func, (x, *args), kwargs)
    assert ops.recognise(module) is op
    with torch.random.fork_rng():
        torch.manual_seed(1)
        want = _first(func(x.clone(), *args, **kwargs))
    with torch.random.fork_rng():
        torch.manual_seed(1)
        got = _first(module(x.clone()) if func is not F.scaled_dot_product_attention
                     else module(x, *args))
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_every_function_with_states_is_exercised_here() -> None:
    smooth = ops.ACTIVATIONS["smooth"]
    assert {f for f, *_ in CALLS} == {f for f, op in ops.FUNCTIONS.items() if op is not smooth}
