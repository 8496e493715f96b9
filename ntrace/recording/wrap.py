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
with a message that says what and points to the Python API. On the first round the loss the
script backpropagates must be the identified loss (up to a power-of-two scale, as a
``GradScaler`` applies): a loss with extra terms (an L2 penalty) is refused, since the trace
would record a loss the optimizer does not minimise.

What the script does to the process is its own: a non-zero ``sys.exit`` or an exception of
the script ends the trace ``aborted`` and raises :class:`~ntrace.errors.ScriptError`, which
carries the script's status and what Python would have printed; an ntrace error the script
catches (a NaN loss) still ends the run with that error. The output path is made absolute
before the script runs, so an ``os.chdir`` in it does not move the trace.

Under ``torchrun`` every process runs ``ntrace record`` around its copy of the script
(``torchrun --nproc_per_node 2 "$(which ntrace)" record --out run.zarr -- python train.py``);
the recorders find the process group the script initialised and write one trace together.
Since they coordinate through it, a script's ``dist.destroy_process_group()`` first closes
the trace (status ``complete``).
"""

from __future__ import annotations

import contextlib
import math
import os
import runpy
import sys
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ntrace.errors import (
    LossMismatchError,
    NtraceError,
    ScriptError,
    UnsupportedModelError,
    UsageError,
)
from ntrace.format.metadata import Sampling
from ntrace.recording.distributed import unwrap as _unwrap
from ntrace.recording.recorder import Recorder

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
    path: str  # absolute: where the trace is, whatever directory the script moved to


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
        self.backward: torch.Tensor | None = None  # the tensor of the latest backward()
        self.failure: NtraceError | None = None  # the first ntrace error, even if caught
        self.depth = 0
        self.rounds = 0

    @contextlib.contextmanager
    def _noting_failure(self) -> Iterator[None]:
        """Remember an ntrace error raised into the script: if the script catches it, the
        run still ends with it (and the hooks stop recording)."""
        try:
            yield
        except NtraceError as exc:
            self.failure = self.failure or exc
            raise

    # -- hooks --------------------------------------------------------------------------------
    def on_optimizer(self, opt: torch.optim.Optimizer) -> None:
        self.optimizers.append(opt)

    def pre_forward(self, module: nn.Module, args: Any) -> None:
        self.depth += 1
        if self.depth != 1 or self.model is not None or self.failure is not None:
            return
        inner = _unwrap(module)
        params = {id(p) for p in inner.parameters() if p.requires_grad}
        if not params:
            return
        for opt in self.optimizers:
            stepped = {id(p) for g in opt.param_groups for p in g["params"]}
            if params <= stepped:
                with self._noting_failure():
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
        if self.output is None or input is not self.output or self.failure is not None:
            return
        if not torch.is_grad_enabled():
            return  # an evaluation pass (torch.no_grad): no optimizer step follows from it
        if reduction != "mean":
            with self._noting_failure():
                raise UsageError(f"the script's {loss_id} loss uses reduction={reduction!r}; "
                                 "ntrace records mean-reduced losses; " + API_HINT)
        self.loss = LossCall(loss_id, input, target, value)

    def on_backward(self, tensors: Any) -> None:
        if self.recorder is not None and self.recorder.round == 0:
            self.backward = tensors if isinstance(tensors, torch.Tensor) else None

    def pre_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if optimizer is not self.optimizer or self.recorder is None or self.failure is not None:
            return
        with self._noting_failure():
            self._step()

    def _step(self) -> None:
        assert self.recorder is not None
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
            _check_backpropagated(self.backward, self.loss)
        self.recorder.step(self.loss.value, self.loss.input, self.loss.target)
        self.rounds += 1
        self.loss, self.backward = None, None

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


def _check_backpropagated(root: torch.Tensor | None, loss: LossCall) -> None:
    """The loss the optimizer's gradients come from must be the identified one: the same
    tensor, the same value, or a power-of-two multiple (a GradScaler, an average over 2^k
    accumulation steps). Not seen (``torch.autograd.grad``, a closure): nothing to check."""
    if root is None or root is loss.value or root.numel() != 1:
        return
    theirs, mine = float(root.detach()), float(loss.value.detach())
    if not (math.isfinite(theirs) and math.isfinite(mine)) or math.isclose(
            theirs, mine, rel_tol=1e-5, abs_tol=1e-8):
        return
    if mine != 0 and theirs / mine > 0 and math.frexp(theirs / mine)[0] == 0.5:
        return
    raise LossMismatchError(
        f"the script backpropagates a loss of {theirs:.6g}, not the mean {loss.loss_id} loss "
        f"of the model output ({mine:.6g}): the trace would record the {loss.loss_id} loss "
        "alone, and its Taylor losses would miss the extra terms (an L2 penalty, a "
        "regulariser); drop them (an L2 penalty is the optimizer's weight_decay)")


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
    original_backward = torch.autograd.backward

    def backward(tensors: Any, *a: Any, **k: Any) -> Any:
        session.on_backward(tensors)
        return original_backward(tensors, *a, **k)

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
    torch.autograd.backward = backward
    for fname, loss_id in LOSS_FUNCTIONS.items():
        setattr(F, fname, patch(fname, loss_id))
    if original_destroy is not None:
        dist.destroy_process_group = destroy
    try:
        yield
    finally:
        torch.optim.Optimizer.__init__ = original_init  # type: ignore[method-assign]
        torch.autograd.backward = original_backward
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
    """Run the training script of ``command`` in this process and record its model.

    Raises :class:`ScriptError` if the script exits with a non-zero status or raises, the
    first ntrace error raised into the script (even if the script caught it), or
    :class:`UnsupportedModelError` if it trained nothing ntrace could find."""
    kind, target, args = parse_command(command)
    opts = replace(opts, out=os.path.abspath(opts.out))
    session = Session(opts)
    argv, cwd = sys.argv, os.getcwd()
    sys.argv = [target, *args]
    status, detail, what = 0, "", ""
    try:
        with _installed(session):
            try:
                if kind == "path":
                    runpy.run_path(target, run_name="__main__")
                else:
                    runpy.run_module(target, run_name="__main__", alter_sys=True)
            except SystemExit as exc:
                status, detail = _exit_status(exc.code)
                what = f"exited with status {status}"
            except NtraceError:
                raise
            except Exception as exc:  # the script's own error: its traceback is useful
                status, detail = 1, _script_traceback(exc)
                what = f"raised {type(exc).__name__}" + (f": {exc}" if str(exc) else "")
    except BaseException as exc:
        if session.recorder is not None:
            session.recorder.__exit__(type(exc), exc, exc.__traceback__)
        raise
    finally:
        sys.argv = argv
        with contextlib.suppress(OSError):
            os.chdir(cwd)
    rec = session.recorder
    if session.failure is not None:  # the script caught it: the run still failed
        if rec is not None:
            rec.close("aborted", str(session.failure))
        raise session.failure
    if status:
        if rec is None:
            raise ScriptError(f"the script {what} before ntrace found a model to record; "
                              "nothing was written", status, detail)
        rec.close("aborted", f"the script {what}")
        raise ScriptError(f"the script {what}; the trace keeps its {session.rounds} rounds "
                          f"(status 'aborted') at {opts.out}", status, detail)
    if rec is None:
        raise UnsupportedModelError(
            "the script never called a model whose parameters an optimizer steps, so there "
            "was nothing to record; " + API_HINT)
    rec.close()
    return WrapResult(session.rounds, opts.out)


def _exit_status(code: object) -> tuple[int, str]:
    """The status and message of ``sys.exit(code)``, as Python gives them."""
    if code is None:
        return 0, ""
    if isinstance(code, int):
        return code, ""
    return 1, str(code)


def _script_traceback(exc: BaseException) -> str:
    """The traceback Python would print for the script, without the frames that ran it."""
    tb = exc.__traceback__
    while tb is not None and (tb.tb_frame.f_code.co_filename in (__file__, runpy.__file__)
                              or tb.tb_frame.f_code.co_filename.startswith("<frozen runpy")):
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb))
