"""Recording an unmodified training script: ``ntrace record [options] -- python train.py``.

The script runs in this process under global PyTorch hooks:

- optimizers are noticed when constructed (``Optimizer.__init__`` is wrapped);
- the *model* is the outermost module called whose trainable parameters an optimizer steps
  (``DistributedDataParallel``/``DataParallel`` are unwrapped); the recorder attaches to it in
  that first forward, so round 0 is the first training step;
- the *loss* is captured by wrapping the standard loss functions of ``torch.nn.functional``
  (``nn.MSELoss`` and friends call them): the call whose input is the model's output gives the
  loss identifier, the targets and the value;
- each optimizer step (a global pre-step hook) calls :meth:`Recorder.step` before the update.
The probe set is the first batch's inputs. Anything that cannot be identified stops the run
with a message that says what and points to the Python API.

Under ``torchrun`` every process runs ``ntrace record`` around its copy of the script
(``torchrun --nproc_per_node 2 "$(which ntrace)" record --out run.zarr -- python train.py``);
the recorders find the process group the script initialised and write one trace together.
Since they coordinate through it, a script's ``dist.destroy_process_group()`` first closes
the trace (status ``complete``).
"""

from __future__ import annotations

import contextlib
import os
import runpy
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ntrace.errors import UnsupportedModelError, UsageError
from ntrace.format.metadata import Sampling
from ntrace.record.distributed import unwrap as _unwrap
from ntrace.record.recorder import Recorder

LOSS_FUNCTIONS = {"mse_loss": "mse", "cross_entropy": "cross_entropy",
                  "binary_cross_entropy_with_logits": "bce_with_logits", "nll_loss": "nll"}
API_HINT = "record it through the Python API instead (ntrace.record(model, path, ...))"


@dataclass(frozen=True)
class WrapOptions:
    out: str
    sampling: Sampling = field(default_factory=Sampling)
    probe_size: int = 256
    probe_every: int = 10
    overwrite: bool = False
    unsupported: str = "error"
    max_jacobian_memory: int = 256 << 20


@dataclass
class LossCall:
    loss_id: str
    input: torch.Tensor
    target: torch.Tensor
    value: torch.Tensor


@dataclass
class WrapResult:
    rounds: int
    path: str
    exit_code: int


class Session:
    """The global hooks of one wrapped run and the recorder they feed."""

    def __init__(self, opts: WrapOptions) -> None:
        self.opts = opts
        self.optimizers: list[torch.optim.Optimizer] = []
        self.recorder: Recorder | None = None
        self.model: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.output: torch.Tensor | None = None
        self.loss: LossCall | None = None
        self.depth = 0
        self.rounds = 0

    # -- hooks --------------------------------------------------------------------------------
    def on_optimizer(self, opt: torch.optim.Optimizer) -> None:
        self.optimizers.append(opt)

    def pre_forward(self, module: nn.Module, args: Any) -> None:
        self.depth += 1
        if self.depth != 1 or self.model is not None:
            return
        inner = _unwrap(module)
        params = {id(p) for p in inner.parameters() if p.requires_grad}
        if not params:
            return
        for opt in self.optimizers:
            stepped = {id(p) for g in opt.param_groups for p in g["params"]}
            if params <= stepped:
                self._attach(inner, opt, args)
                if inner is module:  # our root hooks were installed too late for this call
                    assert self.recorder is not None
                    self.recorder._watcher.begin(args, {})
                return

    def post_forward(self, module: nn.Module, args: Any, output: Any) -> None:
        self.depth -= 1
        if self.depth == 0 and self.model is not None and _unwrap(module) is self.model:
            self.output = output if isinstance(output, torch.Tensor) else None
            self.loss = None

    def on_loss(self, loss_id: str, input: torch.Tensor, target: torch.Tensor,
                reduction: str, value: torch.Tensor) -> None:
        if self.output is None or input is not self.output:
            return
        if reduction != "mean":
            raise UsageError(f"the script's {loss_id} loss uses reduction={reduction!r}; ntrace "
                             "records mean-reduced losses; " + API_HINT)
        self.loss = LossCall(loss_id, input, target, value)

    def pre_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if optimizer is not self.optimizer or self.recorder is None:
            return
        if self.output is None:
            raise UnsupportedModelError("an optimizer step came without a forward of the model "
                                        f"{type(self.model).__name__}; " + API_HINT)
        if self.loss is None:
            raise UnsupportedModelError(
                "could not identify the loss of the model's output: call one of "
                f"{', '.join(sorted(LOSS_FUNCTIONS))} (or nn.MSELoss, nn.CrossEntropyLoss, "
                "nn.BCEWithLogitsLoss, nn.NLLLoss) directly on the model output; " + API_HINT)
        if self.recorder.round == 0:
            self.recorder.loss_spec = type(self.recorder.loss_spec)(self.loss.loss_id)
        self.recorder.step(self.loss.value, self.loss.input, self.loss.target)
        self.rounds += 1
        self.loss = None

    def before_destroy(self) -> None:
        """The script tears its process group down: close the trace while the processes
        can still coordinate."""
        if self.recorder is not None and self.recorder.group is not None:
            self.recorder.close()

    # -- attaching ----------------------------------------------------------------------------
    def _attach(self, model: nn.Module, opt: torch.optim.Optimizer, args: Any) -> None:
        self.model, self.optimizer = model, opt
        probe = None
        x = args[0] if args else None
        if self.opts.probe_size > 0 and isinstance(x, torch.Tensor) and x.is_floating_point():
            probe = x[:self.opts.probe_size].detach().clone()
        self.recorder = Recorder(
            model, self.opts.out, loss="mse", optimizer=opt, sampling=self.opts.sampling,
            probe=probe, probe_every=self.opts.probe_every if probe is not None else None,
            overwrite=self.opts.overwrite, unsupported=self.opts.unsupported,
            max_jacobian_memory=self.opts.max_jacobian_memory,
            run={"task": None, "wrapped": True, "model_class": type(model).__name__})


@contextlib.contextmanager
def _installed(session: Session) -> Iterator[None]:
    """Install every global hook and patch; remove them all on exit."""
    from torch.nn.modules import module as module_mod
    from torch.optim import optimizer as optim_mod

    original_init = torch.optim.Optimizer.__init__

    def init(self: torch.optim.Optimizer, *a: Any, **k: Any) -> None:
        original_init(self, *a, **k)
        session.on_optimizer(self)

    originals: dict[str, Callable[..., Any]] = {}
    dist = torch.distributed
    original_destroy = getattr(dist, "destroy_process_group", None)

    def destroy(*a: Any, **k: Any) -> Any:
        group = a[0] if a else k.get("group")
        if group is None or group is dist.group.WORLD:  # every group goes with the default
            session.before_destroy()
        assert original_destroy is not None
        return original_destroy(*a, **k)

    def patch(fname: str, loss_id: str) -> Callable[..., Any]:
        fn = getattr(F, fname)
        originals[fname] = fn

        def wrapped(input: torch.Tensor, target: torch.Tensor, *a: Any, **k: Any) -> Any:
            value = fn(input, target, *a, **k)
            session.on_loss(loss_id, input, target, k.get("reduction", "mean"), value)
            return value

        return wrapped

    handles = [
        module_mod.register_module_forward_pre_hook(session.pre_forward),
        module_mod.register_module_forward_hook(session.post_forward),
        optim_mod.register_optimizer_step_pre_hook(session.pre_step),
    ]
    torch.optim.Optimizer.__init__ = init  # type: ignore[method-assign]
    for fname, loss_id in LOSS_FUNCTIONS.items():
        setattr(F, fname, patch(fname, loss_id))
    if original_destroy is not None:
        dist.destroy_process_group = destroy
    try:
        yield
    finally:
        torch.optim.Optimizer.__init__ = original_init  # type: ignore[method-assign]
        if original_destroy is not None:
            dist.destroy_process_group = original_destroy
        for fname, fn in originals.items():
            setattr(F, fname, fn)
        for h in handles:
            h.remove()


def parse_command(command: list[str]) -> tuple[str, str, list[str]]:
    """``python train.py a b`` → ('path', 'train.py', ['a', 'b']); ``python -m pkg a`` →
    ('module', 'pkg', ['a'])."""
    if not command:
        raise UsageError("nothing to run after '--': give e.g. -- python train.py")
    rest = list(command)
    if os.path.basename(rest[0]).startswith("python"):
        rest = rest[1:]
    if rest[:1] == ["-m"]:
        if len(rest) < 2:
            raise UsageError("'-m' needs a module name: -- python -m package.module")
        return "module", rest[1], rest[2:]
    if not rest or rest[0].startswith("-"):
        raise UsageError(f"cannot run {' '.join(command)!r}: expected -- python SCRIPT.py [ARGS] "
                         "or -- python -m MODULE [ARGS]")
    if not os.path.isfile(rest[0]):
        raise UsageError(f"script {rest[0]!r} not found")
    return "path", rest[0], rest[1:]


def run_wrapped(command: list[str], opts: WrapOptions) -> WrapResult:
    """Run the training script of ``command`` in this process and record its model."""
    kind, target, args = parse_command(command)
    session = Session(opts)
    argv = sys.argv
    sys.argv = [target, *args]
    code = 0
    try:
        with _installed(session):
            try:
                if kind == "path":
                    runpy.run_path(target, run_name="__main__")
                else:
                    runpy.run_module(target, run_name="__main__", alter_sys=True)
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException as exc:
        if session.recorder is not None:
            session.recorder.__exit__(type(exc), exc, exc.__traceback__)
        raise
    finally:
        sys.argv = argv
    if session.recorder is None:
        raise UnsupportedModelError(
            "the script never called a model whose parameters an optimizer steps, so there "
            "was nothing to record; " + API_HINT)
    session.recorder.close("complete" if code == 0 else "aborted",
                           None if code == 0 else f"the script exited with code {code}")
    return WrapResult(session.rounds, opts.out, code)
