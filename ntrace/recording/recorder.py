"""The recording API: wrap a training loop and write a Taylor trace.

    with ntrace.record(model, "run.zarr", loss="mse", optimizer=opt) as rec:
        for x, y, idx in loader:
            out = model(x)
            loss = loss_fn(out, y)
            rec.step(loss, out, y, indices=idx)   # after forward, before optimizer.step()
            opt.zero_grad(); loss.backward(); opt.step()

Round ``n`` is the n-th call of :meth:`Recorder.step`; ``W_n`` are the weights its forward
used, read before the optimizer updates them. On Taylor rounds the forward hooks keep the
layer inputs and pre-activations; the Jacobians follow by the backward recursion.

Under ``torch.distributed`` (DDP, ``torchrun``) every process constructs a recorder with the
same arguments and calls ``step`` on its own minibatch; ``samples_per_round`` counts each
process's samples, so the trace holds ``world_size × samples_per_round`` per Taylor round
(:mod:`ntrace.recording.distributed`).
"""

from __future__ import annotations

import json
import math
import os
import platform
import types
import warnings
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import ntrace.recording.outputs as outputs
from ntrace import __version__
from ntrace.errors import (
    LossMismatchError,
    NonFiniteLossError,
    NtraceError,
    UsageError,
    WriterError,
)
from ntrace.format.checkpoint import Checkpoint
from ntrace.format.lock import OutputLock
from ntrace.format.metadata import (
    CLASS_TARGET_LOSSES,
    LOSS_IDS,
    BatchNormApprox,
    LayerAttrs,
    LossSpec,
    ModuleAttrs,
    ProbeUnits,
    Sampling,
    TraceAttrs,
)
from ntrace.format.store import prepare_output
from ntrace.format.writer import ProbeSetup, TaylorRound, TraceWriter
from ntrace.losses import per_sample_loss
from ntrace.ops.passthrough import training_batchnorm_allowed
from ntrace.recording.async_writer import AsyncWriter, PendingCheckpoint, PendingRound
from ntrace.recording.batchnorm import CHOICES as BATCHNORM_CHOICES
from ntrace.recording.batchnorm import BatchNormGuard
from ntrace.recording.distributed import current_group, unwrap
from ntrace.recording.extract import Extractor
from ntrace.recording.precision import float32_forward, is_low_precision, loss_check_rtol
from ntrace.recording.state import capture, restore
from ntrace.recording.structure import POLICIES, StateModule, Structure, Watcher, discover

MAX_BATCHED_ROUNDS = 64  # loss-only rounds handed to the writer thread together
DEFAULT_JACOBIAN_MEMORY = 256 << 20  # bytes for one chunk of batched Jacobian products


def _json_safe(value: Any) -> Any:
    if isinstance(value, bool | int | str) or value is None:
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return _json_safe(value.item())
    return repr(value)


def describe_optimizer(optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """Name and hyper-parameters (first parameter group) in JSON form."""
    if optimizer is None:
        return {"name": None, "hyperparameters": {}}
    group = optimizer.param_groups[0]
    hyper = {k: _json_safe(v) for k, v in group.items() if k != "params"}
    return {"name": type(optimizer).__name__.lower(), "hyperparameters": hyper}


def producer_info(device: torch.device) -> dict[str, Any]:
    import zarr

    info = {"ntrace": __version__, "torch": torch.__version__, "zarr": zarr.__version__,
            "numpy": np.__version__, "python": platform.python_version(), "device": str(device)}
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
    return info


def _to_host(t: torch.Tensor, copy: bool = True) -> torch.Tensor:
    """A host copy of ``t``: a clone on CPU, a non-blocking copy into pinned memory on CUDA."""
    t = t.detach()
    if is_low_precision(t):  # Taylor data are float32 (ntrace.recording.precision)
        t, copy = t.float(), False  # a fresh tensor already
    if t.device.type == "cpu":
        return t.clone() if copy else t
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host


def _host_field(field: str, t: torch.Tensor) -> torch.Tensor:
    """A host copy of one field of a LayerRound; fields computed for the round alone
    (Jacobians, states) are not cloned on CPU, the model's own tensors are."""
    return _to_host(t, copy=field not in _FRESH)


_FRESH = frozenset({"jacobian", "mask", "mask_high", "gradient_error"})


class Recorder:
    """Records a Taylor trace of a model trained by the caller's own loop.

    ``sampling`` sets the cadence (Taylor data every k rounds on s samples; tracked neurons);
    ``probe`` (D inputs) with ``probe_every`` (rounds; ``None`` = auto: once per epoch when
    ``rounds_per_epoch`` is known, and at least 64 snapshots over ``expected_rounds``)
    records activation configurations. ``max_pending`` bounds the batches queued for the
    writer thread; ``commit_seconds`` how stale the committed prefix may get. See
    ``spec/taylor-trace.md`` for what lands on disk. Under an initialised torch.distributed
    process group of several processes, every process records its own samples into one
    trace (``sampling.samples_per_round`` per process; ``resume`` is not supported there):
    every process must construct its recorder at the same point. ``distributed=False``
    records this process alone (e.g. a recorder on rank 0 only). BatchNorm in training mode
    is refused unless ``batchnorm="fixed_stats"``: then each Taylor round is taken with the
    batch statistics held fixed and the gradient error this makes is measured and stored
    (:mod:`ntrace.recording.batchnorm`).
    """

    def __init__(self, model: nn.Module, path: str | os.PathLike[str], *, loss: str = "mse",
                 optimizer: torch.optim.Optimizer | None = None, sampling: Sampling | None = None,
                 probe: torch.Tensor | None = None, probe_index: Any = None,
                 probe_every: int | None = None, expected_rounds: int | None = None,
                 rounds_per_epoch: int | None = None, run: Mapping[str, Any] | None = None,
                 overwrite: bool = False, max_pending: int = 8,
                 commit_seconds: float = 1.0, unsupported: str = "error",
                 max_jacobian_memory: int = DEFAULT_JACOBIAN_MEMORY,
                 jacobian_mode: str = "auto", resume: bool = False,
                 distributed: bool = True, batchnorm: str | None = None) -> None:
        if loss not in LOSS_IDS:
            raise UsageError(f"unknown loss {loss!r}; use one of {', '.join(LOSS_IDS)}")
        if not isinstance(model, nn.Module):
            raise UsageError(f"model must be a torch.nn.Module, found {type(model).__name__}")
        if unsupported not in POLICIES:
            raise UsageError(f"unsupported={unsupported!r}; use one of {', '.join(POLICIES)}")
        if jacobian_mode not in ("auto", "forward", "reverse"):
            raise UsageError(f"jacobian_mode={jacobian_mode!r}; use auto, forward or reverse")
        if max_jacobian_memory < 1 << 20:
            raise UsageError("max_jacobian_memory must be at least 1 MiB")
        if batchnorm is not None and batchnorm not in BATCHNORM_CHOICES:
            raise UsageError(f"batchnorm={batchnorm!r}; use 'fixed_stats' (BatchNorm in "
                             "training mode with batch statistics held fixed) or None")
        self.batchnorm = batchnorm
        self._bn = BatchNormGuard(unwrap(model), False, unsupported)
        self.unsupported = unsupported
        self.max_jacobian_memory = int(max_jacobian_memory)
        self.jacobian_mode = jacobian_mode
        model = unwrap(model)
        if _compiled(model):
            raise UsageError(
                "the model is compiled by torch.compile, whose forward ntrace cannot hook: "
                "record the uncompiled module (pass model._orig_mod and call it in the "
                "recorded loop), or run the script under 'ntrace record -- python train.py', "
                "which records with torch.compile disabled")
        # None in a single process (or distributed=False): nothing below changes
        self.group = current_group() if distributed else None
        if self.group is not None and resume:
            raise UsageError("resuming is not supported under torch.distributed; record the "
                             "run again, or resume it in a single process")
        self.model = model
        self.optimizer = optimizer
        self.resumed: Checkpoint | None = None
        self._reopened: TraceWriter | None = None
        # the output's lock (spec 'Single writer'): taken before the path is touched, held by
        # this process (process 0 of several) until close
        self._lock: OutputLock | None = None
        self.path = Path(path)
        if resume:
            self._lock = OutputLock.acquire(path)
        try:
            if resume:
                self._reopened, self.resumed = TraceWriter.reopen(path, commit_seconds,
                                                                  lock=self._lock)
                attrs = self._reopened.attrs
                restore(model, optimizer, self.resumed)
                loss, sampling = attrs.loss.id, attrs.sampling
                if attrs.batchnorm is not None:
                    self.batchnorm = attrs.batchnorm.approximation
                probe_every, expected_rounds = attrs.sampling.probe_every or None, \
                    attrs.run.get("expected_rounds")
                run = {**attrs.run, **dict(run or {})}
            self.loss_spec = LossSpec(loss)
            sampling = sampling or Sampling()
            self.probe = None if probe is None else probe.detach()
            if self.probe is not None:
                if self.probe.ndim < 2 or len(self.probe) == 0:
                    raise UsageError("probe must be a non-empty batch of inputs (D, ...)")
                every = probe_every or sampling.probe_every or _auto_probe_every(
                    expected_rounds, rounds_per_epoch)
                sampling = replace(sampling, probe_every=every, probe_size=len(self.probe))
                if probe_index is None:
                    probe_index = np.full(len(self.probe), -1)
                self.probe_index = np.asarray(probe_index, dtype=np.int64)
                if self.probe_index.shape != (len(self.probe),):
                    raise UsageError("probe_index must hold one dataset index per probe input")
            else:
                sampling = replace(sampling, probe_every=0, probe_size=0)
            if not resume:
                self._prepare(path, overwrite)
        except BaseException:
            self._release()
            raise
        self.sampling = sampling
        self.expected_rounds = expected_rounds
        self.run_info = dict(run or {})
        self.max_pending = max_pending
        self.commit_seconds = commit_seconds
        self.round = 0 if self.resumed is None else self.resumed.round
        self.structure: Structure | None = None
        self.tracked: dict[str, torch.Tensor] = {}
        self._extract: Extractor | None = None
        self._writer: AsyncWriter | None = None
        self._device: torch.device | None = None
        self._closed = False
        self._skipped_small = 0
        self._batch: list[PendingRound] = []
        self._loss_buffer: torch.Tensor | None = None
        self._watcher = Watcher(model)

    def _prepare(self, path: str | os.PathLike[str], overwrite: bool) -> None:
        """Lock the output path, then check (and clear, with ``overwrite``) it: process 0
        does it, and every process fails together when it cannot."""
        error: NtraceError | OSError | None = None
        if self.group is None or self.group.rank == 0:
            try:
                self._lock = OutputLock.acquire(path)
                prepare_output(path, overwrite)
            except (NtraceError, OSError) as exc:
                self._release()
                error = exc
        if self.group is None:
            if error is not None:
                raise error
            return
        if not self.group.all_agree(error is None):
            if error is not None:
                raise error
            raise UsageError(f"process 0 could not prepare the output {path} (see its message)")

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()

    # -- context manager ----------------------------------------------------------------------
    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: types.TracebackType | None) -> None:
        if exc is None:
            self.close()
        elif isinstance(exc, NonFiniteLossError):
            self.close("aborted", str(exc))
        elif isinstance(exc, KeyboardInterrupt):
            self.close("aborted", "interrupted by the user")
        else:
            self.close("aborted", f"{type(exc).__name__}: {exc}")

    # -- the per-round call ---------------------------------------------------------------
    def step(self, loss: torch.Tensor, output: Any, target: torch.Tensor,
             indices: torch.Tensor | np.ndarray | None = None, *,
             round_loss: torch.Tensor | None = None, field: str | None = None) -> None:
        """Record round ``self.round``: call after the forward, before ``optimizer.step()``.

        Under gradient accumulation (several forwards and backwards per optimizer step) pass
        the last micro-batch's ``loss``, ``output`` and ``target`` (checked on round 0 and used
        for the Taylor data) and, as ``round_loss``, the mean of the step's micro-batch losses
        (the round's recorded loss). Under ``torch.autocast`` pass the unscaled loss (not a
        ``GradScaler``'s scaled one); the Taylor data are float32
        (:mod:`ntrace.recording.precision`).

        ``output`` may be what the model returned when that is a dict, tuple, dataclass or
        ``ModelOutput``: the recorded output is its tensor named by ``field`` (``"logits"``)
        or, without it, the one the loss is computed from (:mod:`ntrace.recording.outputs`)."""
        if self._closed:
            raise UsageError("the recorder is closed")
        if not isinstance(output, torch.Tensor):
            if self._watcher.path is None or field is not None:
                self._watcher.choose(outputs.select(output, loss, field))
            output = outputs.get(output, self._watcher.path)
        n = self.round
        if self._writer is not None:
            self._writer.raise_if_failed()
        log = self._watcher.log
        first = self._writer is None
        if first:
            self._start(log, loss, output, target)
        assert self._writer is not None
        on_cpu = output.device.type == "cpu"
        recorded = loss if round_loss is None else round_loss
        if on_cpu and self.group is None:  # several processes: the writers check the mean
            value = float(recorded.detach())
            if not math.isfinite(value):
                self.close("aborted", f"loss is {value} at round {n}")
                raise NonFiniteLossError(f"loss is {value} at round {n}; the trace keeps the {n} "
                                         "rounds before it (status 'aborted')")
        pending = PendingRound(n, self._stage_loss(recorded))
        s = self.sampling.samples_per_round
        if self.sampling.is_taylor_round(n):
            if output.shape[0] < s:
                self._skipped_small += 1
            else:
                if log.output is not output:
                    raise UsageError(
                        "the output passed to step() is not the one of the model's latest "
                        "forward: call step(loss, model(x), y) right after that forward")
                if is_low_precision(output):  # Taylor data from a float32 forward
                    assert self._extract is not None
                    log = float32_forward(self.model, self._watcher, self._extract, log)
                    output = log.output
                with _no_autocast(output.device):
                    pending.taylor = self._taylor(n, log, output, target, indices)
        probe_round = self.sampling.is_probe_round(n)
        if probe_round and (self.group is None or self.group.rank == 0):
            with _no_autocast(output.device):
                pending.snapshot = self._snapshot()  # process 0 writes the probe group
        self._batch.append(pending)
        if pending.taylor is not None or probe_round or len(self._batch) >= MAX_BATCHED_ROUNDS:
            self._submit()
        self.round += 1
        self._watcher.capture = self.sampling.is_taylor_round(self.round)

    # -- internals ----------------------------------------------------------------------------
    def _start(self, log: Any, loss: torch.Tensor, output: torch.Tensor,
               target: torch.Tensor) -> None:
        """Round 0: find the structure, check the loss declaration, create the trace."""
        if output.ndim != 2:
            raise UsageError(f"the model output must be (batch, outputs); found shape "
                             f"{tuple(output.shape)} (flatten it in the model; a loss per "
                             "position of a sequence is not recordable yet)")
        with training_batchnorm_allowed(self.batchnorm is not None):
            st = discover(log, self.model, self.unsupported)
        self.structure = st
        self._device = output.device
        rtol = loss_check_rtol(loss.dtype)
        with torch.no_grad():
            mine = per_sample_loss(self.loss_spec.id, output.detach().float(),
                                   target.detach()).mean()
            theirs = loss.detach().reshape(())
            ok = torch.isclose(mine, theirs.to(mine.dtype), rtol=rtol, atol=1e-7)
            if not bool(ok) and bool(torch.isfinite(theirs)):
                raise LossMismatchError(
                    f"the loss passed to step() ({float(theirs):.6g}) is not the mean "
                    f"{self.loss_spec.id!r} loss of the outputs and targets ({float(mine):.6g}); "
                    "declare the loss you train with (loss='mse' or 'cross_entropy', "
                    "reduction mean)")
        if self._reopened is not None:
            self._continue(st)
            return
        approx = None
        if self.batchnorm is not None and self._bn.training():
            approx = BatchNormApprox(self._bn.training_names(), self.batchnorm)
            self._bn.fixed_stats = True
        layer_attrs = []
        rng = np.random.default_rng(self.sampling.neuron_seed)
        for i, la in enumerate(st.layers):
            n_out = la.geometry.output_shape[0]
            k = self.sampling.neurons
            if k == "all" or int(k) >= n_out:
                idx = np.arange(n_out)
            else:
                idx = np.sort(rng.choice(n_out, size=int(k), replace=False))
            self.tracked[la.name] = torch.as_tensor(idx, device=self._device)
            identity = st.identity_output and la is st.layers[-1]
            layer_attrs.append(la.attrs(i, "identity" if identity else "stored"))
        modules = [m.attrs() for m in st.modules]
        self._extract = Extractor(self.model, st, self.tracked, self.sampling.samples_per_round,
                                  self._watcher, self.max_jacobian_memory, self.jacobian_mode,
                                  self._bn)
        probe_setup = None
        state_units = self._extract.state_units
        if self.probe is not None and not state_units:
            warnings.warn("ntrace: the model has no units with activation states (no ReLU-"
                          "family activation: smooth ones have none), so the probe set is not "
                          "recorded and there is no exploration to analyse", stacklevel=3)
            self.probe = None
            self.sampling = replace(self.sampling, probe_every=0, probe_size=0)
        if self.probe is not None:
            units = ProbeUnits(tuple(u.name for u in state_units),
                               tuple(math.prod(u.input_shape) if isinstance(u, StateModule)
                                     else u.geometry.units for u in state_units))
            self.probe = self.probe.to(self._device)
            features = self.probe.reshape(len(self.probe), -1).cpu().float().numpy()
            probe_setup = ProbeSetup(self.probe_index, features, units)
        params = sum(p.numel() for p in self.model.parameters())
        run = {"model": {"description": str(self.model), "parameters": params},
               "optimizer": describe_optimizer(self.optimizer),
               "expected_rounds": self.expected_rounds,
               "jacobian_mode": self.jacobian_mode, **self.run_info}
        if is_low_precision(output):  # spec 'Training idioms'
            run["low_precision"] = {"output_dtype": str(output.dtype).removeprefix("torch."),
                                    "loss_dtype": str(loss.dtype).removeprefix("torch."),
                                    "loss_check_rtol": rtol,
                                    "taylor_data": "float32 forward of the minibatch"}
        sampling = self.sampling
        if self.group is not None:  # the trace counts the samples of every process
            world = self.group.world_size
            sampling = replace(sampling, samples_per_round=sampling.samples_per_round * world,
                               world_size=world)
        attrs = TraceAttrs(loss=self.loss_spec, sampling=sampling,
                           layers=tuple(la.name for la in st.layers),
                           output_size=int(output.shape[1]), structure=st.kind,
                           modules=tuple(m.name for m in modules),
                           producer=producer_info(self._device), run=_json_safe(run),
                           batchnorm=approx)
        json.dumps(attrs.to_dict())  # fail here, not in the writer thread, if not JSON
        if self.group is not None:
            writer = self._create_together(attrs, layer_attrs, probe_setup, modules)
        else:
            writer = TraceWriter.create(self.path, attrs, layer_attrs,
                                        {k: v.cpu().numpy() for k, v in self.tracked.items()},
                                        probe_setup, expected_rounds=self.expected_rounds,
                                        overwrite=True, commit_seconds=self.commit_seconds,
                                        modules=modules, lock=self._lock)
        self._writer = AsyncWriter(writer, self.max_pending, self.group)

    def _create_together(self, attrs: TraceAttrs, layer_attrs: list[LayerAttrs],
                         probe_setup: ProbeSetup | None,
                         modules: list[ModuleAttrs]) -> TraceWriter:
        """Process 0 creates the trace (staged, renamed into place); once every process knows
        it exists, the others open it. A failure on process 0 fails every process."""
        group = self.group
        assert group is not None
        writer: TraceWriter | None = None
        error: NtraceError | None = None
        if group.rank == 0:
            try:
                writer = TraceWriter.create(
                    self.path, attrs, layer_attrs,
                    {k: v.cpu().numpy() for k, v in self.tracked.items()}, probe_setup,
                    expected_rounds=self.expected_rounds, overwrite=True,
                    commit_seconds=self.commit_seconds, modules=modules, coordinator=group,
                    lock=self._lock)
            except NtraceError as exc:
                error = exc
        if not group.all_agree(error is None):
            if error is not None:
                raise error
            raise WriterError(f"process 0 could not create the trace {self.path} (see its "
                              "message)")
        if writer is None:
            writer = TraceWriter.join(self.path, group, self.commit_seconds)
        return writer

    def _continue(self, st: Structure) -> None:
        """Resume: the model must have the trace's layers; append to the reopened writer."""
        writer = self._reopened
        assert writer is not None
        names = tuple(la.name for la in st.layers)
        if names != writer.attrs.layers or st.kind != writer.attrs.structure:
            raise UsageError(f"the model's layers {names} ({st.kind}) differ from the trace's "
                             f"{writer.attrs.layers} ({writer.attrs.structure}); resume with "
                             "the model that wrote the trace")
        self.tracked = {k: torch.as_tensor(v, device=self._device)
                        for k, v in writer.tracked.items()}
        self._bn.fixed_stats = writer.attrs.batchnorm is not None
        self._extract = Extractor(self.model, st, self.tracked, self.sampling.samples_per_round,
                                  self._watcher, self.max_jacobian_memory, self.jacobian_mode,
                                  self._bn)
        if self.probe is not None:
            self.probe = self.probe.to(self._device)
        self._writer = AsyncWriter(writer, self.max_pending)

    def checkpoint(self, arrays: Mapping[str, Any] | None = None,
                   meta: Mapping[str, Any] | None = None) -> None:
        """Store the training state at the start of round ``self.round`` (call between an
        optimizer step and the next forward): model, optimizer and RNG state, plus the
        caller's ``arrays`` (numbers only, e.g. the data order) and JSON ``meta``. A later
        ``Recorder(..., resume=True)`` continues from the latest checkpoint."""
        if self._writer is None or self._closed:
            raise UsageError("checkpoint() needs a running recorder that has recorded a round")
        state, info = capture(self.model, self.optimizer)
        for k, v in (arrays or {}).items():
            state[f"user.{k}"] = np.asarray(v.detach().cpu() if isinstance(v, torch.Tensor)
                                            else v)
        info["user"] = _json_safe(dict(meta or {}))
        self._submit()
        self._writer.submit(PendingCheckpoint(self.round, state, info))

    @torch.no_grad()
    def _taylor(self, n: int, log: Any, output: torch.Tensor, target: torch.Tensor,
                indices: Any) -> TaylorRound:
        assert self._extract is not None
        s = self.sampling.samples_per_round
        rows = self._extract.layers(log)
        out = output[:s].detach()
        tgt = target[:s].detach()
        classes = self.loss_spec.id in CLASS_TARGET_LOSSES
        if classes:
            tgt = tgt.long()
        if self._bn.fixed_stats:  # the approximation's measured gradient error (spec 3.4)
            errors = self._extract.batchnorm_errors(
                log, lambda f: per_sample_loss(self.loss_spec.id, f, tgt).mean())
            rows = {name: replace(r, gradient_error=torch.tensor(errors[name],
                                                                 dtype=torch.float32))
                    for name, r in rows.items()}
        layers = {name: d.map(_host_field) for name, d in rows.items()}
        modules = {k: _to_host(v, False) for k, v in self._extract.module_states(log).items()}
        sample_loss = per_sample_loss(self.loss_spec.id, out, tgt)
        if indices is None:
            idx = torch.full((s,), -1, dtype=torch.int64)
        else:
            idx = torch.as_tensor(np.asarray(indices)[:s] if not isinstance(indices, torch.Tensor)
                                  else indices[:s]).to(torch.int64)
        return TaylorRound(n, _to_host(idx), _to_host(sample_loss, False), _to_host(out),
                           _to_host(tgt if classes else tgt.float()), layers, modules)

    def _stage_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The round's loss for the writer. On CUDA it goes into a device buffer, copied to
        pinned memory once per batch in :meth:`_submit`: no sync, one host copy per batch."""
        value = loss.detach().reshape(())
        if value.device.type == "cpu":
            return value.float()
        if self._loss_buffer is None:
            self._loss_buffer = torch.empty(MAX_BATCHED_ROUNDS, dtype=torch.float32,
                                            device=value.device)
        i = len(self._batch)
        self._loss_buffer[i].copy_(value)
        return self._loss_buffer[i]  # replaced by its host copy in _submit

    def _submit(self) -> None:
        if not self._batch or self._writer is None:
            return
        last = self._batch[-1]
        if self._device is not None and self._device.type == "cuda":
            assert self._loss_buffer is not None
            host = _to_host(self._loss_buffer[: len(self._batch)], copy=False)
            for i, item in enumerate(self._batch):
                item.loss = host[i]
            last.event = torch.cuda.Event()
            last.event.record()  # after every copy of the batch was issued
        batch, self._batch = self._batch, []
        self._writer.submit(batch)

    def _snapshot(self) -> torch.Tensor:
        assert self.probe is not None and self._extract is not None
        return _to_host(self._extract.probe_states(self.probe), False)

    def close(self, status: str = "complete", reason: str | None = None) -> None:
        """Flush every pending round and close the trace with ``status``."""
        if self._closed:
            return
        self._closed = True
        self._watcher.remove()
        try:
            if self._writer is not None:
                try:
                    self._submit()
                except NtraceError:
                    if status == "complete":
                        raise
                self._writer.close(status, reason)
                if status == "complete":
                    self._writer.raise_if_failed()
        finally:
            self._release()

    @property
    def trace_path(self) -> str:
        return str(self.path)


def _compiled(model: nn.Module) -> bool:
    """A ``torch.compile``'d module whose compiled forward runs (TorchDynamo enabled)."""
    if not hasattr(model, "_orig_mod") or type(model).__name__ != "OptimizedModule":
        return False
    import torch._dynamo

    return not torch._dynamo.config.disable


def _no_autocast(device: torch.device) -> Any:
    """Jacobians and probe forwards are float32 even when step() is called under
    autocast."""
    return torch.autocast(device.type, enabled=False)


def _auto_probe_every(expected_rounds: int | None, rounds_per_epoch: int | None) -> int:
    """Once per epoch, but at least 64 snapshots over the run (the exploration metric uses
    50 singular values after centring)."""
    if expected_rounds is None:
        if rounds_per_epoch is None:
            raise UsageError("probe_every is needed when neither expected_rounds nor "
                             "rounds_per_epoch is given")
        return rounds_per_epoch
    every = max(1, expected_rounds // 64)
    if rounds_per_epoch:
        every = min(every, rounds_per_epoch)
    return every


def record(model: nn.Module, path: str | os.PathLike[str], **options: Any) -> Recorder:
    """Start recording ``model`` to ``path``; see :class:`Recorder` for the options."""
    return Recorder(model, path, **options)


