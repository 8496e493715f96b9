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
with a message that says what and points to the Python API. On the first round each loss the
script backpropagates must be the identified loss or that loss times constants (a
``GradScaler``'s scale, 1/k of gradient accumulation), as its autograd graph shows: a loss
with extra terms (an L2 penalty) is refused, since the trace would record a loss the optimizer
does not minimise.

Training idioms (spec 'Training idioms'):

- *gradient accumulation*: every identified loss the script backpropagates between two
  optimizer steps is a micro-batch of the step's round; the round's loss is their mean, its
  Taylor data come from the last micro-batch (the model's last forward before the step);
  the trace's ``run.accumulation`` says so when round 0 has several;
- *torch.autocast and GradScaler*: the recorded losses are the loss functions' own values
  (unscaled); a step ``GradScaler.step`` skips (non-finite gradients) is still a round, whose
  weights do not move, so rounds count the optimizer steps attempted;
- *optimizer.step(closure)* (LBFGS, Lightning's automatic optimization): the round is
  recorded after the closure's first evaluation, at the weights the step starts from; later
  evaluations within the step (LBFGS line searches) are not rounds;
- *torch.compile*: the script runs with TorchDynamo disabled (``torch._dynamo.config.disable``)
  once it calls ``torch.compile``, so the eager module is recorded (``run.torch_compile``);
- learning-rate schedulers of the model's optimizer are named in ``run.lr_schedulers``.

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

import ntrace.recording.outputs as outputs
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
    batchnorm: str | None = None  # "fixed_stats": BatchNorm in training mode, approximated


@dataclass
class LossCall:
    loss_id: str
    input: torch.Tensor
    target: torch.Tensor
    value: torch.Tensor
    reduction: str = "mean"


SCALING_NODES = ("MulBackward0", "DivBackward0", "ToCopyBackward0")  # loss × constants


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
        self.output: torch.Tensor | None = None  # the recorded tensor of the model's output
        self.raw: Any = None  # what the model's latest training forward returned
        self.field: Any = None  # the path of the output in it, when structured
        self.inner: list[LossCall] = []  # losses computed within the model's forward
        self.rebatch = False
        self.in_model = False  # the model's forward is running
        self.loss: LossCall | None = None  # the latest identified loss not backpropagated
        self.micro: list[LossCall] = []  # the losses backpropagated since the last step
        self.failure: NtraceError | None = None  # the first ntrace error, even if caught
        self.depth = 0
        self.rounds = 0
        self.steps = 0  # optimizer.step() calls of the model's optimizer
        self.in_step = False  # within a step(closure) whose round is recorded
        self.grad_scaler = False
        self.schedulers: list[Any] = []
        self.compiled = False

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

    def on_scheduler(self, scheduler: Any) -> None:
        self.schedulers.append(scheduler)

    def pre_forward(self, module: nn.Module, args: Any) -> None:
        self.depth += 1
        if self.depth == 1:  # a loss computed within the model's forward is its own
            self.in_model = self.model is not None and _model_of(module) is self.model
        if (self.depth != 1 or self.model is not None or self.failure is not None
                or not torch.is_grad_enabled()):  # an evaluation forward is not training
            return
        inner = _model_of(module)
        params = {id(p) for p in inner.parameters() if p.requires_grad}
        if not params:
            return
        for opt in self.optimizers:
            stepped = {id(p) for g in opt.param_groups for p in g["params"]}
            if params <= stepped:
                with self._noting_failure():
                    self._attach(inner, opt, args)
                self.in_model = True
                if inner is module:  # our root hooks were installed too late for this call
                    assert self.recorder is not None
                    self.recorder._watcher.begin(args, {})
                    self.rebatch = not args
                return

    def post_forward(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        self.depth -= 1
        if self.depth == 0:
            self.in_model = False
        if (self.depth == 0 and self.model is not None and torch.is_grad_enabled()
                and _model_of(module) is self.model):
            assert self.recorder is not None
            if self.rebatch:  # attached in this call: its keyword inputs are known only now
                self.recorder._watcher.rebatch(args, kwargs)
                self.rebatch = False
            self.raw, self.output, self.loss = output, None, None
            if isinstance(output, torch.Tensor):
                self.output = output
            inner, self.inner = self.inner, []
            for call in reversed(inner):  # a loss computed in forward (labels=...)
                if self._identify(call):
                    break

    def _identify(self, call: LossCall) -> bool:
        """Take ``call`` as the loss if its input is the model's output, or a reshape of a
        tensor of its structured output (``outputs.logits.view(-1, C)``)."""
        if self.raw is None:
            return False
        with self._noting_failure():
            path = outputs.find_input(self.raw, call.input)
        if path is None:
            return False
        if call.reduction != "mean":
            with self._noting_failure():
                raise UsageError(f"the script's {call.loss_id} loss uses reduction="
                                 f"{call.reduction!r}; ntrace records mean-reduced losses; "
                                 + API_HINT)
        assert self.recorder is not None
        watcher = self.recorder._watcher
        if watcher.path is None and not isinstance(self.raw, torch.Tensor):
            watcher.choose(path)
        self.output = watcher.pick(self.raw)
        self.loss = replace(call, input=self.output, target=call.target)
        self.field = path
        return True

    def on_loss(self, loss_id: str, input: torch.Tensor, target: torch.Tensor,
                reduction: str, value: torch.Tensor) -> None:
        if (self.model is None or self.failure is not None or not value.requires_grad
                or self.in_step):
            return
        if not torch.is_grad_enabled():
            return  # an evaluation pass (torch.no_grad): no optimizer step follows from it
        call = LossCall(loss_id, input, target, value, reduction)
        if self.in_model:  # inside the model's forward: perhaps its own (labels=...)
            self.inner.append(call)
            return
        self._identify(call)

    def on_backward(self, tensors: Any) -> None:
        """A backward of the identified loss: one micro-batch of the coming step."""
        if self.recorder is None or self.loss is None or self.failure is not None:
            return
        if self.recorder.round == 0:
            with self._noting_failure():
                _check_backpropagated(tensors if isinstance(tensors, torch.Tensor) else None,
                                      self.loss)
        self.micro.append(self.loss)
        self.loss = None

    def pre_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any
                 ) -> tuple[Any, Any] | None:
        if self.failure is not None or optimizer not in self.optimizers:
            return None
        closure = args[1] if len(args) > 1 else kwargs.get("closure")  # args[0]: optimizer
        if closure is not None and (optimizer is self.optimizer or self.model is None):
            return _with_closure(args, kwargs, self._recording(optimizer, closure))
        if optimizer is not self.optimizer or self.recorder is None:
            return None
        self.steps += 1
        with self._noting_failure():
            self._step()
        return None

    def _recording(self, optimizer: torch.optim.Optimizer,
                   closure: Callable[[], Any]) -> Callable[[], Any]:
        """``closure`` recording the step's round after its first evaluation (at the weights
        the step starts from); the step's later evaluations are no rounds."""
        first = True

        def recorded() -> Any:
            nonlocal first
            result = closure()
            if first and optimizer is self.optimizer and self.recorder is not None \
                    and self.failure is None:
                self.steps += 1
                with self._noting_failure():
                    self._step()
                self.in_step = True
            first = False
            return result

        return recorded

    def post_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if optimizer is self.optimizer:
            self.in_step = False

    def scaler_step(self, optimizer: Any, run: Callable[[], Any]) -> Any:
        """``GradScaler.step(optimizer)``: a step it skips (non-finite gradients) never calls
        ``optimizer.step()``; it is still a round, whose weights do not move."""
        if optimizer is self.optimizer:
            self.grad_scaler = True
        before = self.steps
        result = run()
        if (optimizer is self.optimizer and self.steps == before and self.recorder is not None
                and self.failure is None):
            with self._noting_failure():
                self._step()
        return result

    def on_compile(self) -> None:
        self.compiled = True

    def _step(self) -> None:
        assert self.recorder is not None
        if self.output is None:
            raise UnsupportedModelError("an optimizer step came without a forward of the model "
                                        f"{type(self.model).__name__}; " + API_HINT)
        micro = self.micro or ([self.loss] if self.loss is not None else [])
        if not micro:
            raise UnsupportedModelError(
                "could not identify the loss of the model's output: call one of "
                f"{', '.join(sorted(LOSS_FUNCTIONS))} (or nn.MSELoss, nn.CrossEntropyLoss, "
                "nn.BCEWithLogitsLoss, nn.NLLLoss) directly on the model output; " + API_HINT)
        last = micro[-1]
        if self.recorder.round == 0:
            self.recorder.loss_spec = type(self.recorder.loss_spec)(last.loss_id)
            self.recorder.run_info.update(self._idioms(len(micro)))
        round_loss = None
        if len(micro) > 1:  # gradient accumulation: the mean of the micro-batch losses
            round_loss = torch.stack([m.value.detach().float().reshape(()) for m in micro]).mean()
        output = last.input if self.field is None else self.raw
        self.recorder.step(last.value, output, last.target, round_loss=round_loss,
                           field=self.field)
        self.rounds += 1
        self.loss, self.micro = None, []

    def _idioms(self, micro_batches: int) -> dict[str, Any]:
        """What the trace's ``run`` says of the training idioms seen by round 0."""
        info: dict[str, Any] = {}
        if micro_batches > 1:
            info["accumulation"] = {"micro_batches": micro_batches, "round_loss": "mean",
                                    "taylor_micro_batch": "last"}
        if self.grad_scaler:
            info["grad_scaler"] = True
        names = [type(s).__name__ for s in self.schedulers
                 if getattr(s, "optimizer", None) is self.optimizer]
        if names:
            info["lr_schedulers"] = names
        if self.compiled:
            info["torch_compile"] = "disabled while recording: the eager module is recorded"
        return info

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
            max_jacobian_memory=self.opts.max_jacobian_memory, batchnorm=self.opts.batchnorm,
            run={"task": None, "wrapped": True, "model_class": type(model).__name__})


def _model_of(module: nn.Module) -> nn.Module:
    """The module to record: DDP/DataParallel and torch.compile wrappers removed."""
    while True:
        inner = _unwrap(module)
        if type(inner).__name__ == "OptimizedModule" and hasattr(inner, "_orig_mod"):
            inner = inner._orig_mod
        if inner is module:
            return inner
        module = inner


def _with_closure(args: Any, kwargs: Any, closure: Callable[[], Any]) -> tuple[Any, Any]:
    if len(args) > 1:  # (optimizer, closure, ...)
        return (args[0], closure, *args[2:]), kwargs
    return args, {**kwargs, "closure": closure}


def _scaled(root: torch.Tensor, loss: torch.Tensor) -> bool:
    """``root`` is ``loss`` times constants (``loss / k``, a GradScaler's ``scale(loss)``,
    casts), as its autograd graph shows."""
    node, target = root.grad_fn, loss.grad_fn
    while node is not None and node is not target:
        if type(node).__name__ not in SCALING_NODES:
            return False
        inputs = [n for n, _ in node.next_functions if n is not None]
        if len(inputs) != 1:  # multiplied by something that itself depends on the weights
            return False
        node = inputs[0]
    return node is not None


def _check_backpropagated(root: torch.Tensor | None, loss: LossCall) -> None:
    """The loss the optimizer's gradients come from must be the identified one: the same
    tensor, that tensor times constants (a GradScaler, 1/k of gradient accumulation), or the
    same value (recomputed). Not seen (``torch.autograd.grad``): nothing to check."""
    if root is None or root is loss.value or root.numel() != 1 or _scaled(root, loss.value):
        return
    theirs, mine = float(root.detach()), float(loss.value.detach())
    if not (math.isfinite(theirs) and math.isfinite(mine)) or math.isclose(
            theirs, mine, rel_tol=1e-5, abs_tol=1e-8):
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
    scaler_cls = torch.amp.GradScaler
    original_scaler_step = scaler_cls.step
    scheduler_cls = torch.optim.lr_scheduler.LRScheduler
    original_scheduler_init = scheduler_cls.__init__
    original_compile = torch.compile
    dynamo_was: list[bool] = []  # TorchDynamo's 'disable' before the script compiled

    def scaler_step(self: Any, optimizer: Any, *a: Any, **k: Any) -> Any:
        return session.scaler_step(optimizer, lambda: original_scaler_step(self, optimizer,
                                                                           *a, **k))

    def scheduler_init(self: Any, *a: Any, **k: Any) -> None:
        original_scheduler_init(self, *a, **k)
        session.on_scheduler(self)

    def compile(*a: Any, **k: Any) -> Any:
        import torch._dynamo

        if not dynamo_was:
            dynamo_was.append(torch._dynamo.config.disable)
        torch._dynamo.config.disable = True  # the eager module runs, and is recorded
        session.on_compile()
        return original_compile(*a, **k)

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
        module_mod.register_module_forward_hook(session.post_forward, with_kwargs=True),
        optim_mod.register_optimizer_step_pre_hook(session.pre_step),
        optim_mod.register_optimizer_step_post_hook(session.post_step),
    ]
    torch.optim.Optimizer.__init__ = init  # type: ignore[method-assign]
    scaler_cls.step = scaler_step  # type: ignore[method-assign]
    scheduler_cls.__init__ = scheduler_init  # type: ignore[method-assign]
    torch.compile = compile  # type: ignore[assignment]
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
        scaler_cls.step = original_scaler_step  # type: ignore[method-assign]
        scheduler_cls.__init__ = original_scheduler_init  # type: ignore[method-assign]
        torch.compile = original_compile
        if dynamo_was:
            torch._dynamo.config.disable = dynamo_was[0]
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
    argv, cwd, path = sys.argv, os.getcwd(), list(sys.path)
    sys.argv = [target, *args]
    if kind == "path":  # as `python train.py` does: the script's folder is importable
        sys.path.insert(0, os.path.dirname(os.path.abspath(target)))
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
        sys.path[:] = path
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
