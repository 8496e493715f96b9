"""The op registry (:mod:`ntrace.ops`): one table, consistent with the format's names, and each
op's math against an independent reference (the torch module itself, autograd)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from torch import nn

from ntrace import ops
from ntrace.format import metadata
from ntrace.ops import base
from ntrace.ops.base import ActivationOp
from ntrace.ops.smooth import MODULES as SMOOTH_MODULES

PKG = Path(ops.__file__).parent

# one instance of every piecewise-linear activation module type in the registry (a new one
# must add its own); the smooth ones are the smooth op's table
ACTIVATION_MODULES = {
    nn.ReLU: lambda: nn.ReLU(), nn.LeakyReLU: lambda: nn.LeakyReLU(0.15),
    nn.PReLU: lambda: nn.PReLU(5, 0.3), nn.Hardtanh: lambda: nn.Hardtanh(-0.4, 0.7),
    nn.ReLU6: lambda: nn.ReLU6(), nn.RReLU: lambda: nn.RReLU(0.1, 0.3).eval(),
}
# a call of every layer module type: the module and an input batch
LAYER_CALLS = {
    nn.Linear: lambda: (nn.Linear(5, 4), torch.randn(3, 5)),
    nn.Conv1d: lambda: (nn.Conv1d(4, 6, 3, padding=2, dilation=2, groups=2), torch.randn(3, 4, 7)),
    nn.Conv2d: lambda: (nn.Conv2d(2, 3, 3, stride=2, padding="valid"), torch.randn(3, 2, 6, 5)),
    nn.Conv3d: lambda: (nn.Conv3d(1, 2, 3, padding="same", bias=False),
                        torch.randn(3, 1, 3, 3, 3)),
    nn.ConvTranspose1d: lambda: (nn.ConvTranspose1d(4, 6, 3, stride=2, padding=1,
                                                    output_padding=1, groups=2),
                                 torch.randn(3, 4, 5)),
    nn.ConvTranspose2d: lambda: (nn.ConvTranspose2d(2, 3, 2, stride=2), torch.randn(3, 2, 3, 2)),
    nn.ConvTranspose3d: lambda: (nn.ConvTranspose3d(2, 2, 2, groups=2, bias=False),
                                 torch.randn(3, 2, 2, 2, 2)),
    nn.Embedding: lambda: (nn.Embedding(7, 4), torch.randint(0, 7, (3, 5))),
}
# layers on extra axes (format 1.3): Linear on (batch, *positions, features), and a padded
# embedding whose inputs hold the padding index
AXES_CALLS = {
    "Linear-positions": lambda: (nn.Linear(5, 4), torch.randn(3, 2, 3, 5)),
    "Embedding-padding": lambda: (nn.Embedding(7, 4, padding_idx=2),
                                  torch.tensor([[2, 0, 2, 6, 1], [3, 2, 2, 5, 4],
                                                [6, 6, 2, 0, 1]])),
}


def _ops(role: str) -> list[type[ops.Op]]:
    return [op for op in ops.OPS if op.role == role]


def test_each_module_type_belongs_to_one_op() -> None:
    types = [m for op in ops.OPS for m in op.modules]
    assert len(types) == len(set(types))
    assert set(ops.BY_MODULE) == set(types)
    assert ops.recognise(nn.Hardshrink()) is None
    assert ops.recognise(type("MyLinear", (nn.Linear,), {})(2, 2)) is None  # exact types
    assert ops.recognise(type("MyFlatten", (nn.Flatten,), {})()).role == ops.PASSTHROUGH


def test_names_on_disk_are_the_formats() -> None:
    """The registry (torch) and the format (numpy) name the same kinds."""
    assert set(ops.LAYERS) == set(metadata.LAYER_KINDS)
    assert set(ops.ACTIVATIONS) == set(metadata.ACTIVATIONS)
    assert set(ops.STATES) == set(metadata.MODULE_KINDS)


def test_ops_sharing_a_name_share_its_math() -> None:
    """An op that recognises another module as an existing kind adds no math of its own."""
    for op in _ops(ops.ACTIVATION):
        first = ops.ACTIVATIONS[op.name]  # type: ignore[attr-defined]
        for method in ("slope", "states", "parameter"):
            assert getattr(op, method).__func__ is getattr(first, method).__func__, (op, method)


def test_ops_import_neither_record_nor_analyze() -> None:
    for path in PKG.glob("*.py"):
        tree = ast.parse(path.read_text())
        mods = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        mods |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert not {m for m in mods if m.startswith(("ntrace.recording", "ntrace.analyze",
                                                     "ntrace.cli"))}, path.name


def test_supported_lists_every_labelled_op() -> None:
    text = ops.supported()
    assert text.startswith("Linear, Conv1d/2d/3d") and "BatchNorm (eval)" in text
    assert ops.supported(ops.LAYER, prefix="nn.") == \
        "nn.Linear, nn.Conv1d/2d/3d, nn.ConvTranspose1d/2d/3d, nn.Embedding"


def test_every_activation_module_is_exercised_here() -> None:
    smooth = ops.ACTIVATIONS["smooth"]
    assert set(ACTIVATION_MODULES) == {m for op in _ops(ops.ACTIVATION) for m in op.modules
                                       if op is not smooth}


@pytest.mark.parametrize("module_type", list(SMOOTH_MODULES), ids=lambda t: t.__name__)
def test_smooth_modules_have_no_states_and_name_their_function(module_type: type) -> None:
    """A smooth module is described by the name of its functional form, which that form's
    own description repeats (one definition), with no states."""
    op = ops.recognise(module_type())
    assert op is ops.ACTIVATIONS["smooth"]
    act = op.describe(module_type())
    assert act.kind == "smooth" and not act.has_mask
    assert metadata.Activation.from_dict(act.to_dict()) == act
    funcs = [f for f in op.functions if base.function_name(f) == act.function]
    assert funcs, act.function  # the module's function has a functional form listed
    assert op.describe(op.as_module(funcs[0], (torch.zeros(1),), {})) == act


@pytest.mark.parametrize("module_type", list(ACTIVATION_MODULES), ids=lambda t: t.__name__)
def test_activation_slope_and_states_follow_the_module(module_type: type[nn.Module]) -> None:
    """The op's slope equals autograd's derivative of the module (including the kinks, where
    torch's subgradient is the reference) and its states split the pieces the module has."""
    module = ACTIVATION_MODULES[module_type]().double()
    op = ops.recognise(module)
    assert op is not None and issubclass(op, ActivationOp)
    act = op.describe(module)
    assert metadata.Activation.from_dict(act.to_dict()) == act  # a valid format document
    math = ops.activation_op(act)
    kinks = [0.0, act.min_val or 0.0, act.max_val or 0.0]
    a = torch.cat([torch.randn(4, 5, 3, dtype=torch.float64) * 3,
                   torch.tensor(kinks, dtype=torch.float64).expand(4, 5, 3)], -1)
    a.requires_grad_(True)
    (grad,) = torch.autograd.grad(module(a).sum(), a)
    slope = math.slope(act, a.detach(), math.parameter(module))
    torch.testing.assert_close(slope, grad, rtol=0, atol=0)
    low, high = math.states(act, a.detach())
    y = module(a).detach()
    # on each piece the module is affine with the op's slope: y = slope · a + offset there
    for piece in (~low, low if high is None else low & ~high, high):
        if piece is None:
            continue
        sel = piece & (a.detach() != 0)
        off = (y - slope * a.detach())[sel]
        assert torch.allclose(off, off.reshape(-1)[:1].expand_as(off)) or off.numel() == 0


def test_every_layer_module_is_exercised_here() -> None:
    assert set(LAYER_CALLS) == {m for op in _ops(ops.LAYER) for m in op.modules}


@pytest.mark.parametrize("call", [*LAYER_CALLS.values(), *AXES_CALLS.values()],
                         ids=[*(t.__name__ for t in LAYER_CALLS), *AXES_CALLS])
def test_layer_map_rows_and_design_against_the_module(call) -> None:
    """``affine`` reproduces the module's output (neurons first), ``rows``/``unrows`` are
    inverse, and the design is autograd's gradient of ⟨J, op(x, V)⟩ in each neuron's row
    (a padded embedding's padding row gets no gradient and is no entry of the rows)."""
    torch.manual_seed(0)
    module, x = call()
    module = module.double()
    x = x if x.dtype == torch.int64 else x.double()
    out = module(x)
    op_cls = ops.recognise(module)
    assert op_cls is not None and issubclass(op_cls, ops.LayerOp)
    op = op_cls.from_call("m", module, x, out)
    la = op.attrs("m", 0, op.bias(module) is not None, metadata.Activation("identity"),
                  "stored")
    assert ops.layer_op(metadata.LayerAttrs.from_dict(la.to_dict())) == op  # format round trip
    W, b = op.weight(module).detach(), op.bias(module)
    torch.testing.assert_close(op.affine(x, W, None if b is None else b.detach()),
                               op.neurons_first(out).detach())
    torch.testing.assert_close(op.unrows(op.rows(W)), W, rtol=0, atol=0)
    assert op.rows(W).shape == (op.neurons, op.row_size)
    k, o = x.shape[0], 2
    neurons = torch.tensor([op.neurons - 1, 0])
    jac = torch.randn(k, o, len(neurons), *op.positions, dtype=torch.float64)
    M = op.design(x, jac, neurons)  # (k, o, c, row)
    for kk in range(k):
        for oo in range(o):
            V = W.clone().requires_grad_(True)
            a = op.op(x[kk:kk + 1], V)[0]  # (n, *positions)
            (g,) = torch.autograd.grad((a[neurons] * jac[kk, oo]).sum(), V)
            torch.testing.assert_close(M[kk, oo], op.rows(g)[neurons])


def test_linear_pull_is_the_chain_step() -> None:
    W = torch.randn(4, 3, dtype=torch.float64)
    J = torch.randn(2, 5, 4, dtype=torch.float64)
    pull = ops.LAYERS["linear"].pull
    torch.testing.assert_close(pull(J, W), J @ W)
    torch.testing.assert_close(pull(None, W).expand(2, 4, 3), torch.eye(4).double() @ W
                               .expand(2, 4, 3))


def test_layers_on_extra_axes_are_their_own_layouts() -> None:
    """Linear on positions is not rank one and forms no chain; 2-d Linear stays as in format
    1.0 (no stored geometry); a padded embedding's rows skip the padding entry."""
    lin2 = ops.recognise(nn.Linear(5, 4))
    assert lin2 is not None and issubclass(lin2, ops.LayerOp)
    flat = lin2.from_call("a", nn.Linear(5, 4), torch.randn(3, 5), torch.randn(3, 4))
    pos = lin2.from_call("b", nn.Linear(5, 4), torch.randn(3, 7, 5), torch.randn(3, 7, 4))
    assert (flat.rank_one, flat.chain, flat.neuron_last, flat.positions) == (True, True, False,
                                                                             ())
    assert (pos.rank_one, pos.chain, pos.neuron_last, pos.positions) == (False, False, True, (7,))
    assert flat.attrs("a", 0, True, metadata.Activation("relu"), "stored").geometry is None
    la = pos.attrs("b", 0, True, metadata.Activation("relu"), "stored")
    assert (la.in_features, la.geometry.input_shape) == (5, (7, 5))
    emb = nn.Embedding(6, 3, padding_idx=4)
    op = ops.recognise(emb).from_call("e", emb, torch.zeros(2, 3, dtype=torch.long),
                                      torch.zeros(2, 3, 3))
    assert op.row_size == 5 and op.geometry.padding_idx == 4
    W = torch.arange(18.0).reshape(6, 3)
    torch.testing.assert_close(op.rows(W), W[[0, 1, 2, 3, 5]].T)
