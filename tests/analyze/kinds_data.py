"""Small models and traces of every layer kind (format 1.1, and 1.3's layers on extra axes)
for ``test_layer_kinds``: recorded with ``ntrace.record``, or written with the format writer
where the recorder cannot (an embedding) or would not (a conv layer whose output is the network
output) produce them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ntrace.format.metadata import Sampling
from ntrace.recording import record

LOSSES = {"mse": F.mse_loss, "cross_entropy": F.cross_entropy, "nll": F.nll_loss,
          "bce_with_logits": F.binary_cross_entropy_with_logits}


def record_trace(model: nn.Module, path: Path, loss: str, X: torch.Tensor, Y: torch.Tensor,
                 rounds: int = 10, batch: int = 8, samples: int = 6, neurons: int | str = "all",
                 lr: float = 0.05, seed: int = 0) -> Path:
    """Train ``model`` with SGD and the recorder attached (Taylor data every round)."""
    torch.manual_seed(seed)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    with record(model, path, loss=loss, optimizer=opt, overwrite=True, unsupported="skip",
                sampling=Sampling(taylor_every=1, samples_per_round=samples, neurons=neurons),
                expected_rounds=rounds) as rec:
        for _ in range(rounds):
            idx = torch.randperm(len(X), generator=gen)[:batch]
            out = model(X[idx])
            value = LOSSES[loss](out, Y[idx])
            rec.step(value, out, Y[idx], indices=idx)
            opt.zero_grad()
            value.backward()
            opt.step()
    return path


def conv_only(c_in: int = 2, c_out: int = 3, frozen: bool = True, p: int = 2
              ) -> nn.Sequential:
    """Conv2d → Flatten → Linear; with the Linear frozen the output is linear in the conv's
    weights, so the conv layer's Taylor loss is the loss itself."""
    model = nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.Flatten(),
                          nn.Linear(16 * c_out, p))
    model[2].requires_grad_(not frozen)
    return model


def convs_1d() -> nn.Sequential:
    return nn.Sequential(nn.Conv1d(2, 4, 3, padding=2, dilation=2, groups=2), nn.ReLU(),
                         nn.ConvTranspose1d(4, 6, 3, stride=2, padding=1, output_padding=1,
                                            groups=2), nn.LeakyReLU(0.1), nn.Flatten(),
                         nn.Linear(60, 3))


def convs_2d() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.ConvTranspose2d(4, 2, 2, stride=2), nn.ReLU(), nn.Flatten(),
                         nn.Linear(32, 2))


def convs_3d() -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(1, 2, 2, stride=(1, 2, 1), padding=(1, 0, 0),
                                   dilation=(1, 1, 2)), nn.ReLU(),
                         nn.ConvTranspose3d(2, 2, 2, stride=2, groups=2), nn.Flatten(),
                         nn.Linear(384, 2))


def embedding() -> nn.Sequential:
    return nn.Sequential(nn.Embedding(7, 3), nn.Flatten(), nn.ReLU(), nn.Linear(15, 2))


def sequence() -> nn.Sequential:
    """Format 1.3's layers on extra axes: a padded Embedding → Linear on (batch, 6, 4) →
    ReLU (states at every position) → Flatten → Linear."""
    return nn.Sequential(nn.Embedding(9, 4, padding_idx=1), nn.Linear(4, 5), nn.ReLU(),
                         nn.Flatten(), nn.Linear(30, 2))


def positions_only(frozen: bool = True) -> nn.Sequential:
    """Linear(3, 2) on (batch, 4, 3) → Flatten → Linear(8, 2) (frozen: the output is linear in
    the first layer's weights, whose Taylor loss is then the loss itself)."""
    model = nn.Sequential(nn.Linear(3, 2), nn.Flatten(), nn.Linear(8, 2))
    model[2].requires_grad_(not frozen)
    return model


def padded_only(frozen: bool = True) -> nn.Sequential:
    """Embedding(6, 2, padding_idx=0) on 4 indices → Flatten → Linear(8, 2), frozen likewise."""
    model = nn.Sequential(nn.Embedding(6, 2, padding_idx=0), nn.Flatten(), nn.Linear(8, 2))
    model[2].requires_grad_(not frozen)
    return model


def nll_model() -> nn.Sequential:
    return nn.Sequential(nn.Conv1d(1, 3, 2), nn.ReLU(), nn.Flatten(), nn.Linear(12, 3),
                         nn.LogSoftmax(dim=1))


def conv_out() -> nn.Sequential:
    return nn.Sequential(nn.Conv1d(2, 2, 3), nn.Flatten())


def rrelu_model() -> nn.Sequential:
    """Conv1d → RReLU in eval mode (recorded as leaky_relu, slope 0.15) → Linear."""
    return nn.Sequential(nn.Conv1d(2, 3, 3), nn.RReLU(0.05, 0.25).eval(), nn.Flatten(),
                         nn.Linear(9, 2))


MODELS = {"convs_1d": convs_1d, "convs_2d": convs_2d, "convs_3d": convs_3d,
          "embedding": embedding, "nll": nll_model, "conv_out": conv_out, "rrelu": rrelu_model,
          "sequence": sequence}


def conv_output_trace(path: Path, rounds: int = 8, S: int = 6) -> Path:
    """A Conv1d(2, 2, 3) whose output (neuron-first, flattened) is the network output, MSE:
    the identity Jacobian (no array stored), written with the format writer."""
    from ntrace.format.metadata import Activation, Geometry, LayerAttrs, LossSpec, TraceAttrs
    from ntrace.format.validate import validate_trace
    from ntrace.format.writer import LayerRound, TaylorRound, TraceWriter

    torch.manual_seed(15)
    model = conv_out()
    X = torch.randn(48, 2, 5)
    Y = torch.randn(48, 6) * 0.5 + X[:, :, 1:4].reshape(48, 6)
    attrs = TraceAttrs(loss=LossSpec("mse"), structure="graph", output_size=6, layers=("0",),
                       sampling=Sampling(taylor_every=1, samples_per_round=S))
    la = LayerAttrs("0", 0, "conv", 2, 2, True, Activation("identity"), "identity",
                    Geometry((2, 5), (2, 3), (2, 2, 3), (1,), (0,), (1,), (0,), 1))
    w = TraceWriter.create(path, attrs, [la], {"0": np.arange(2)}, expected_rounds=rounds,
                           overwrite=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    f32 = np.float32
    for n in range(rounds):
        idx = torch.arange(8) + 8 * (n % 6)
        out = model(X[idx])
        ell = (out - Y[idx]).pow(2).mean(1)
        w.write_round(float(ell.mean().detach()), TaylorRound(
            n, idx[:S].numpy(), ell[:S].detach().numpy().astype(f32),
            out[:S].detach().numpy().astype(f32), Y[idx][:S].numpy().astype(f32),
            {"0": LayerRound(model[0].weight.detach().numpy().astype(f32),
                             X[idx][:S].numpy().astype(f32),
                             model[0].bias.detach().numpy().astype(f32))}))
        opt.zero_grad()
        ell.mean().backward()
        opt.step()
    w.close()
    report = validate_trace(path)
    assert not report.reasons, report.reasons
    return path


def embedding_trace(path: Path, rounds: int = 10, S: int = 6) -> Path:
    """Embedding(7, 3) → Flatten → ReLU → Linear(15, 2), bce_with_logits with soft targets,
    written with the format writer, Jacobians by autograd here (``ntrace.record`` stores an
    embedding's Jacobian with positions and neurons mixed up: graph_jacobian selects the
    tracked neurons on axis 2 of torch's (sample, *index, neuron) output)."""
    from ntrace.format.metadata import Activation, Geometry, LayerAttrs, LossSpec, TraceAttrs
    from ntrace.format.validate import validate_trace
    from ntrace.format.writer import LayerRound, TaylorRound, TraceWriter

    torch.manual_seed(13)
    model = embedding().double()
    X = torch.randint(0, 7, (48, 5))
    Y = torch.sigmoid(torch.stack([(X == 2).double().sum(1) - 1, X[:, 0].double() - 3], 1))
    tracked = np.arange(3)
    attrs = TraceAttrs(loss=LossSpec("bce_with_logits"), structure="graph", output_size=2,
                       sampling=Sampling(taylor_every=1, samples_per_round=S), layers=("0", "3"))
    emb = LayerAttrs("0", 0, "embedding", 7, 3, False, Activation("identity"), "stored",
                     Geometry((5,), (3, 5), (7, 3)))
    lin = LayerAttrs("3", 1, "linear", 15, 2, True, Activation("identity"), "identity")
    w = TraceWriter.create(path, attrs, [emb, lin], {"0": tracked, "3": np.arange(2)},
                           expected_rounds=rounds, overwrite=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    gen = torch.Generator().manual_seed(0)
    for n in range(rounds):
        idx = torch.randperm(48, generator=gen)[:8]
        x, y = X[idx], Y[idx]
        a = model[0](x).movedim(-1, 1)  # (b, neuron, position)

        def head(a: torch.Tensor) -> torch.Tensor:
            return model[3](torch.relu(a.movedim(1, -1).flatten(1)))

        out = head(a)
        ell = F.binary_cross_entropy_with_logits(out, y, reduction="none").mean(1)
        J = torch.stack([torch.autograd.functional.jacobian(lambda v: head(v[None])[0],
                                                            a[s].detach())
                         for s in range(S)])  # (s, p, neuron, position)
        f32 = np.float32
        h = torch.relu(a.movedim(1, -1).flatten(1))
        w.write_round(float(ell.mean().detach()), TaylorRound(
            n, idx[:S].numpy(), ell[:S].detach().numpy().astype(f32),
            out[:S].detach().numpy().astype(f32), y[:S].numpy().astype(f32),
            {"0": LayerRound(model[0].weight.detach().numpy().astype(f32), x[:S].numpy(),
                             None, J[:, :, tracked].numpy().astype(f32)),
             "3": LayerRound(model[3].weight.detach().numpy().astype(f32),
                             h[:S].detach().numpy().astype(f32),
                             model[3].bias.detach().numpy().astype(f32))}))
        opt.zero_grad()
        ell.mean().backward()
        opt.step()
    w.close()
    report = validate_trace(path)
    assert not report.reasons, report.reasons
    return path


def tracked_mask(layer, shape: tuple[int, ...], tracked: np.ndarray) -> np.ndarray:
    """Weight entries that belong to tracked neurons (written out per kind)."""
    m = np.zeros(shape, dtype=bool)
    if layer.kind == "embedding":
        m[:, tracked] = True
        if layer.geometry.padding_idx is not None:  # the padding row is no parameter
            m[layer.geometry.padding_idx] = False
    elif layer.kind == "conv_transpose":
        g = layer.geometry.groups
        cin, ng = shape[0] // g, shape[1]
        for j in tracked:
            G = j // ng
            m[G * cin:(G + 1) * cin, j - G * ng] = True
    else:
        m[tracked] = True
    return m
