"""Structured model outputs: the tensor a loss is applied to, inside what forward returns.

A forward may return a tensor, or a dict, tuple, list, dataclass or Hugging Face
``ModelOutput`` holding tensors (``outputs.logits``, ``outputs.loss``…). The recorded *output*
is one tensor of it, named by a *path* of keys, indices and attribute names (``("logits",)``).
It is found from the loss: the loss function's input is that tensor or a reshape of it
(``logits.view(-1, C)``), as the autograd graph shows; or from the loss value, by the nearest
tensor of the structure its graph reaches. The path is kept, so that every later forward
(and the recorder's own extra forwards) gives the same tensor.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from ntrace.errors import UnsupportedModelError, UsageError

Path = tuple[Any, ...]

# autograd nodes that only reshape (the loss input is the output, reshaped)
RESHAPE_NODES = ("ViewBackward", "ReshapeAliasBackward", "UnsafeViewBackward", "AliasBackward",
                 "ToCopyBackward", "CloneBackward")


def tensors(obj: Any, path: Path = (), depth: int = 3) -> Iterator[tuple[Path, torch.Tensor]]:
    """Every tensor of a structured output with its path, in order."""
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif depth == 0:
        return
    elif isinstance(obj, Mapping):  # dict, ModelOutput (an OrderedDict of its set fields)
        for k, v in obj.items():
            yield from tensors(v, (*path, k), depth - 1)
    elif isinstance(obj, tuple | list):
        for i, v in enumerate(obj):
            yield from tensors(v, (*path, i), depth - 1)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from tensors(getattr(obj, f.name), (*path, f.name), depth - 1)


def get(obj: Any, path: Path) -> torch.Tensor:
    """The tensor at ``path`` of ``obj``."""
    top = obj
    try:
        for key in path:
            if isinstance(obj, Mapping) or isinstance(obj, tuple | list) and isinstance(key, int):
                obj = obj[key]
            else:
                obj = getattr(obj, key)
    except (KeyError, IndexError, AttributeError, TypeError):
        names = ", ".join(describe(p) for p, _ in tensors(top)) or "none"
        raise UsageError(f"the model output has no field {describe(path)}; its tensors: "
                         f"{names}") from None
    if not isinstance(obj, torch.Tensor):
        raise UsageError(f"the model output's field {describe(path)} is "
                         f"{type(obj).__name__}, not a tensor")
    return obj


def describe(path: Path) -> str:
    return "output" + "".join(f".{k}" if isinstance(k, str) else f"[{k}]" for k in path)


def parse_field(field: str | Path) -> Path:
    """``"logits"`` or ``"0"`` or ``"out.logits"`` (or a path tuple) as a path."""
    if isinstance(field, tuple):
        return field
    return tuple(int(k) if k.isdigit() else k for k in field.split("."))


def reshaped_from(x: torch.Tensor, t: torch.Tensor) -> bool:
    """``x`` is ``t`` or ``t`` reshaped (views, reshapes, same-dtype copies), by autograd."""
    if x is t:
        return True
    node, target = x.grad_fn, t.grad_fn
    if target is None:
        return False
    while node is not None and node is not target:
        if not type(node).__name__.startswith(RESHAPE_NODES):
            return False
        inputs = [n for n, _ in node.next_functions if n is not None]
        if len(inputs) != 1:
            return False
        node = inputs[0]
    return node is target


def find_input(raw: Any, x: torch.Tensor) -> Path | None:
    """The path of the tensor of ``raw`` whose reshape is the loss input ``x``; a loss on a
    reshape that mixes the batch axis with others (per position of a sequence) is refused."""
    found = list(tensors(raw))
    for path, t in found:
        if reshaped_from(x, t) and x.shape[0] == t.shape[0]:
            return path
    for path, t in found:
        if reshaped_from(x, t):
            raise UnsupportedModelError(
                f"the loss is applied to the model's {describe(path)} {tuple(t.shape)} as "
                f"{tuple(x.shape)}: a loss per position (per token of a sequence) is not "
                "recordable yet; ntrace records a loss over (batch, outputs)")
    return None


def find_from_loss(raw: Any, loss: torch.Tensor) -> Path | None:
    """The path of the tensor of ``raw`` nearest the loss in its autograd graph (the loss
    tensor itself excluded)."""
    by_node = {}
    for path, t in tensors(raw):
        if t is not loss and t.grad_fn is not None:
            by_node.setdefault(id(t.grad_fn), path)
    queue, seen, keep = deque([loss.grad_fn]), set(), []
    while queue:
        node = queue.popleft()
        if node is None or id(node) in seen:
            continue
        keep.append(node)  # keep the Python wrappers alive: ids are not reused
        seen.add(id(node))
        if id(node) in by_node:
            return by_node[id(node)]
        queue.extend(n for n, _ in node.next_functions)
    return None


def select(raw: Any, loss: torch.Tensor, field: str | Path | None) -> Path:
    """The path of the recorded output in ``raw``: ``field``, or found from ``loss``."""
    if field is not None:
        path = parse_field(field)
        get(raw, path)
        return path
    path = find_from_loss(raw, loss)
    if path is None:
        names = ", ".join(describe(p) for p, _ in tensors(raw)) or "none"
        raise UsageError(f"the model returns {type(raw).__name__}; could not tell which of its "
                         f"tensors ({names}) the loss is computed from: pass field='logits' "
                         "(its name) to step()")
    return path
