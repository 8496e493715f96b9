"""``nn.AlphaDropout``/``nn.FeatureAlphaDropout`` and ``F.alpha_dropout``/
``F.feature_alpha_dropout``: the identity in eval mode (nothing to record); in training mode
they draw a random mask *and* an affine correction in every forward, which the trace does not
describe and the Jacobian forward cannot replay: the ``unsupported`` policy decides."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch.nn.functional as F
from torch import nn

from ntrace.ops.base import PassthroughOp
from ntrace.ops.dropout import dropout_module


class AlphaDropout(PassthroughOp):
    label: ClassVar[str] = "AlphaDropout (eval)"
    notes: ClassVar[str] = "training mode refused (random mask and affine correction)"
    modules = (nn.AlphaDropout, nn.FeatureAlphaDropout)
    functions = (F.alpha_dropout, F.feature_alpha_dropout)
    subclasses: ClassVar[bool] = False

    @classmethod
    def as_module(cls, func: Callable[..., Any], args: tuple[Any, ...],
                  kwargs: dict[str, Any]) -> nn.Module:
        return dropout_module(cls, func, args, kwargs, training=False)

    @classmethod
    def unsupported(cls, name: str, module: nn.Module) -> str | None:
        if not module.training:
            return None
        call = "()" in name
        return (f"{'call' if call else 'module'} {name} ({type(module).__name__}) is in "
                "training mode, where it draws a random mask and an affine correction in every "
                "forward that ntrace cannot record or replay; "
                + ("pass training=False" if call else f"call model.{name}.eval()")
                + ", or use dropout (nn.Dropout, F.dropout), whose masks are recorded")
