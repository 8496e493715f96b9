"""What ntrace does with each module and functional op a user may meet: the table behind
``ntrace record --list-supported`` and the README's supported-modules section.

It is read off the registry (:data:`ntrace.ops.OPS`): each op's module types and functional
forms, what its role records (:data:`RECORDED`, or the op's own ``recorded``), and the op's
``notes`` (layout, and when it is refused or approximated). Nothing here is a second list of
ops: an op added to the registry appears in the table, and the README is checked against it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ntrace import ops

RECORDED = {
    ops.LAYER: "tracked layer: weights, inputs and exact Jacobians (the Taylor model's V)",
    ops.ACTIVATION: "piecewise linear: per-unit states, as the layer's mask when it takes a "
                    "tracked layer's output, else as an `activation` module; exact Jacobians",
    ops.STATE: "per-sample state recorded (`modules/`); exact Jacobians",
    ops.PASSTHROUGH: "nothing to record: exact Jacobians through it by autograd",
}

OTHERWISE = (
    "any other module, and piecewise-linear operations whose states ntrace does not record "
    "(`torch.clamp`, `torch.maximum`/`minimum`, adaptive max pooling, shrinkage), found in "
    "the autograd graph: the `unsupported` policy (`error` by default; `warn`/`skip` record "
    "the rest, with exact Jacobians through them)")


@dataclass(frozen=True)
class Support:
    """One row: an op of the registry, in words."""

    label: str
    modules: tuple[str, ...]
    functions: tuple[str, ...]
    recorded: str
    notes: str


def qualified(func: Callable[..., Any]) -> str:
    """How a user writes a functional form: ``F.relu``, ``torch.relu``, ``Tensor.relu``."""
    name = getattr(func, "__name__", repr(func))
    for prefix, home in (("F", F), ("torch", torch), ("Tensor", torch.Tensor)):
        if getattr(home, name, None) is func:
            return f"{prefix}.{name}"
        # a builtin whose __name__ differs from its public name (F.logsigmoid)
        alias = next((n for n in dir(home) if not n.startswith("_")
                      and getattr(home, n, None) is func), None)
        if alias is not None:
            return f"{prefix}.{alias}"
    return name


def _torch_modules(op: type[ops.Op]) -> tuple[str, ...]:
    """The op's torch module types by name (ntrace's stand-ins for functional calls left
    out)."""
    return tuple(f"nn.{m.__name__}" for m in op.modules if m.__module__.startswith("torch."))


def rows() -> list[Support]:
    """One row per op of the registry that users meet (those with a label)."""
    out = []
    for op in ops.OPS:
        if not op.label:
            continue
        recorded = op.recorded or RECORDED[op.role]
        out.append(Support(op.label, _torch_modules(op),
                           tuple(dict.fromkeys(qualified(f) for f in op.functions)),
                           recorded, op.notes))
    return out


def markdown() -> str:
    """The table as Markdown (README section 'Supported modules')."""
    lines = ["| op | modules | functional forms | recorded | notes |",
             "| --- | --- | --- | --- | --- |"]
    for r in rows():
        mods = ", ".join(f"`{m}`" for m in r.modules) or "—"
        funcs = ", ".join(f"`{f}`" for f in r.functions) or "—"
        lines.append(f"| {r.label} | {mods} | {funcs} | {r.recorded} | {r.notes or '—'} |")
    lines.append(f"| everything else | | | {OTHERWISE} | |")
    return "\n".join(lines)


def text() -> str:
    """The table as plain text, for a terminal."""
    blocks = []
    for r in rows():
        lines = [r.label]
        if r.modules:
            lines.append("  modules:    " + ", ".join(r.modules))
        if r.functions:
            lines.append("  functional: " + ", ".join(r.functions))
        lines.append("  recorded:   " + r.recorded.replace("`", ""))
        if r.notes:
            lines.append("  notes:      " + r.notes.replace("`", ""))
        blocks.append("\n".join(lines))
    blocks.append("everything else\n  " + OTHERWISE.replace("`", ""))
    return "\n\n".join(blocks)
