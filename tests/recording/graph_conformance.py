"""Conformance of graph traces against a model of the same architecture (test helper).

For every Taylor round: the stored weights of the tracked layers, loaded into ``model``,
reproduce the stored network output from the recorded model inputs (with the recorded dropout
masks replayed, of modules by forward hooks and of functional ``F.dropout*`` calls, which the
trace names ``…()``, in call order by a function mode); and for every tracked layer, the
gradient of the Taylor loss computed from the stored factors alone (J and the layer input,
through functional ops) equals torch.autograd's gradient of the model's mean loss on the
recorded samples, on the tracked neurons.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import zarr
from torch import nn
from torch.overrides import TorchFunctionMode

from ntrace.format.bits import unpack


def _loss(loss_id: str, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if loss_id == "mse":
        return ((f - y) ** 2).flatten(1).mean(1)
    if loss_id == "nll":
        return F.nll_loss(f, y, reduction="none")
    return F.cross_entropy(f, y, reduction="none")


class _FunctionalDropouts(TorchFunctionMode):
    """Replaces the k-th training-mode ``F.dropout*`` call of a forward made outside dropout
    modules (which the hooks replay) by its k-th recorded mask (scaled by 1/(1-p), as dropout
    scales)."""

    def __init__(self, keeps: list[torch.Tensor], model: nn.Module) -> None:
        super().__init__()
        self.keeps = keeps
        self.k = 0
        self.inside = 0
        self.model = model

    def __enter__(self):  # type: ignore[no-untyped-def]
        drops = [m for m in self.model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
        self.hooks = [h for m in drops for h in (
            m.register_forward_pre_hook(lambda *a: setattr(self, "inside", self.inside + 1)),
            m.register_forward_hook(lambda *a: setattr(self, "inside", self.inside - 1)))]
        return super().__enter__()

    def __exit__(self, *exc):  # type: ignore[no-untyped-def]
        for h in self.hooks:
            h.remove()
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if func in (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d) and not self.inside \
                and kwargs.get("training", args[2] if len(args) > 2 else True):
            p = kwargs.get("p", args[1] if len(args) > 1 else 0.5)
            keep = self.keeps[self.k]
            self.k += 1
            return args[0] * keep / (1 - p)
        return func(*args, **kwargs)


def _functional(kind: str, geo: dict, x: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """The layer's pre-activation, neurons first: (s, neuron, *positions)."""
    if kind == "linear":  # on (s, *positions, features) inputs (1.3): neurons moved first
        return F.linear(x, V) if x.ndim == 2 else F.linear(x, V).movedim(-1, 1)
    if kind == "embedding":  # the padding row (1.3) is no parameter: its gradient is 0
        return F.embedding(x, V, geo.get("padding_idx")).movedim(-1, 1)
    k = len(geo["stride"])
    if kind == "conv":
        op = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[k]
        return op(x, V, None, geo["stride"], geo["padding"], geo["dilation"], geo["groups"])
    op = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[k]
    return op(x, V, None, geo["stride"], geo["padding"], geo["output_padding"], geo["groups"],
              geo["dilation"])


def check_graph_trace(path: Path, model: nn.Module,
                      model_input: Callable[[zarr.Group, int], torch.Tensor],
                      forward: Callable[[torch.Tensor], torch.Tensor] | None = None) -> int:
    """``forward(x)``: the recorded output from the model input (default ``model(x)``; a
    field of a structured output, say)."""
    g = zarr.open_group(str(path), mode="r")
    attrs = g.attrs["ntrace"]
    loss_id = attrs["loss"]["id"]
    names = attrs["layers"]
    mods = dict(model.named_modules())
    checked = 0
    for t in range(attrs["commit"]["taylor_rounds"]):
        for n in names:
            mods[n].weight.data = torch.tensor(g[f"layers/{n}/weight"][t])
            if f"layers/{n}/bias" in g:
                mods[n].bias.data = torch.tensor(g[f"layers/{n}/bias"][t])
        hooks, keeps = [], []
        for m in attrs.get("modules", []):
            doc = g[f"modules/{m}"].attrs["ntrace"]
            if doc["kind"] != "dropout":
                continue
            keep = torch.tensor(unpack(g[f"modules/{m}/state"][t], int(np.prod(
                doc["input_shape"]))).reshape(-1, *doc["input_shape"]))
            if "()" in m:  # a functional call
                keeps.append(keep)
                continue
            p = mods[m.split("@")[0]].p
            hooks.append(mods[m.split("@")[0]].register_forward_hook(
                lambda mod, a, o, k=keep, p=p: a[0] * k / (1 - p)))
        model.zero_grad()
        x = model_input(g, t)
        with _FunctionalDropouts(keeps, model):
            f = model(x) if forward is None else forward(x)
        for h in hooks:
            h.remove()
        y = torch.tensor(g["taylor/target"][t])
        f_n = torch.tensor(g["taylor/output"][t])
        torch.testing.assert_close(f.detach(), f_n, rtol=1e-4, atol=1e-5)
        # the Taylor loss at V = W_n (T_s = f_s) is the recorded loss
        torch.testing.assert_close(_loss(loss_id, f_n.double(), y).mean(),
                                   torch.tensor(g["taylor/sample_loss"][t]).double().mean(),
                                   rtol=1e-4, atol=1e-6)
        _loss(loss_id, f, y).mean().backward()
        fd = f.detach().requires_grad_(True)
        _loss(loss_id, fd, y).mean().backward()
        dl = fd.grad  # ∇_f of the mean loss, (s, p)
        for n in names:
            la = g[f"layers/{n}"].attrs["ntrace"]
            tracked = torch.tensor(g[f"layers/{n}/tracked"][:])
            x_l = torch.tensor(g[f"layers/{n}/input"][t])
            if la["jacobian"] == "identity":
                p_out = dl.shape[1]
                J = torch.eye(p_out)[:, tracked].expand(len(dl), p_out, len(tracked))
            else:
                J = torch.tensor(g[f"layers/{n}/jacobian"][t])
            V = torch.tensor(g[f"layers/{n}/weight"][t], requires_grad=True)
            a = _functional(la["kind"], la.get("geometry", {}), x_l, V)
            delta = torch.einsum("so...,so->s...", J, dl)
            (a.index_select(1, tracked) * delta).sum().backward()
            got, want = V.grad, mods[n].weight.grad
            axis = 1 if la["kind"] in ("conv_transpose", "embedding") else 0
            got, want = got.index_select(axis, tracked), want.index_select(axis, tracked)
            torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-6 * (1 + want.abs().max()),
                                       msg=f"layer {n}, Taylor round {t}")
            checked += 1
    return checked
