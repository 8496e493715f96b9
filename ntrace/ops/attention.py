"""``F.scaled_dot_product_attention`` (and so ``nn.MultiheadAttention``): smooth, no states,
Jacobians exact by autograd, except with ``dropout_p > 0``, which drops attention weights at
random inside the kernel where no extra forward can replay them: the ``unsupported`` policy
decides (remedy: ``dropout_p=0.0`` outside training, or dropout on the attention output)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch.nn.functional as F
from torch import nn

from ntrace.ops.base import PassthroughOp, arg


class ScaledDotProductAttention(nn.Module):
    """The module form of ``F.scaled_dot_product_attention`` (torch has none)."""

    def __init__(self, dropout_p: float = 0.0) -> None:
        super().__init__()
        self.dropout_p = dropout_p

    def forward(self, q: Any, k: Any, v: Any, **kwargs: Any) -> Any:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout_p, **kwargs)


class Attention(PassthroughOp):
    label: ClassVar[str] = "scaled_dot_product_attention, MultiheadAttention (no dropout)"
    notes: ClassVar[str] = ("`dropout_p > 0` refused (its mask is drawn inside the kernel and "
                            "cannot be replayed)")
    modules = (ScaledDotProductAttention,)
    functions = (F.scaled_dot_product_attention,)

    @classmethod
    def as_module(cls, func: Callable[..., Any], args: tuple[Any, ...],
                  kwargs: dict[str, Any]) -> nn.Module:
        return ScaledDotProductAttention(float(arg(args, kwargs, 4, "dropout_p", 0.0)))

    @classmethod
    def unsupported(cls, name: str, module: nn.Module) -> str | None:
        if not module.dropout_p:
            return None
        return (f"call {name} (scaled_dot_product_attention) has dropout_p="
                f"{module.dropout_p:g}, which drops attention weights at random inside the "
                "kernel where the Jacobian forward cannot replay them; pass dropout_p=0.0 "
                "(nn.MultiheadAttention/nn.Transformer*: dropout=0.0), or apply nn.Dropout "
                "to the attention output")
