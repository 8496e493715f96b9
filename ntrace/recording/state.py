"""Training state ↔ plain arrays, for checkpoints that load without unpickling anything.

Model parameters and buffers become ``model.<name>``, tensors of the optimizer state
``optim.<param index>.<key>``, RNG states ``rng.torch`` / ``rng.cuda.<i>``; everything else
(the optimizer's parameter groups and scalar state) goes into a JSON document.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from ntrace.errors import InvalidTraceError
from ntrace.format.checkpoint import Checkpoint


def _json(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return {"float": repr(value)}
    if isinstance(value, list | tuple):
        return [_json(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json(v) for k, v in value.items()}
    return value


def _unjson(value: Any) -> Any:
    if isinstance(value, dict) and set(value) == {"float"}:
        return float(value["float"])
    if isinstance(value, list):
        return [_unjson(v) for v in value]
    if isinstance(value, dict):
        return {k: _unjson(v) for k, v in value.items()}
    return value


def capture(model: nn.Module, optimizer: torch.optim.Optimizer | None
            ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Host copies of everything needed to continue training exactly."""
    arrays = {f"model.{k}": v.detach().cpu().numpy().copy()
              for k, v in model.state_dict().items()}
    meta: dict[str, Any] = {"optimizer": None}
    if optimizer is not None:
        sd = optimizer.state_dict()
        scalars: dict[str, Any] = {}
        for idx, st in sd["state"].items():
            for key, v in st.items():
                if isinstance(v, torch.Tensor):
                    arrays[f"optim.{idx}.{key}"] = v.detach().cpu().numpy().copy()
                else:
                    scalars[f"{idx}.{key}"] = _json(v)
        meta["optimizer"] = {"type": type(optimizer).__name__,
                             "param_groups": _json(sd["param_groups"]), "scalars": scalars}
    arrays["rng.torch"] = torch.get_rng_state().numpy().copy()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, st in enumerate(torch.cuda.get_rng_state_all()):
            arrays[f"rng.cuda.{i}"] = st.numpy().copy()
    return arrays, meta


def restore(model: nn.Module, optimizer: torch.optim.Optimizer | None, ck: Checkpoint) -> None:
    """Load a checkpoint's model, optimizer and RNG state (refusing one that does not fit)."""
    a = ck.arrays
    own = model.state_dict()
    saved = {k[len("model."):] for k in a if k.startswith("model.")}
    if saved != set(own):
        raise InvalidTraceError(f"the checkpoint holds parameters {sorted(saved)[:4]}… but the "
                                f"model has {sorted(own)[:4]}…; resume with the same model")
    for k, v in own.items():
        saved_k = a[f"model.{k}"]
        if v.ndim == 0 and saved_k.shape == (1,):  # a 0-d buffer as ntrace <= 0.1.0 wrote it
            saved_k = a[f"model.{k}"] = saved_k.reshape(())
        if saved_k.shape != tuple(v.shape) or saved_k.dtype.kind not in "biuf":
            raise InvalidTraceError(f"checkpoint array model.{k} is {saved_k.dtype} of shape "
                                    f"{saved_k.shape}, but the model's {k} is {tuple(v.shape)}; "
                                    "resume with the same model")
    model.load_state_dict({k: torch.from_numpy(a[f"model.{k}"]).to(v.device)
                           for k, v in own.items()})
    opt_meta = ck.meta.get("optimizer")
    try:  # what is left holds no shapes we can check first: refuse what torch refuses
        if optimizer is not None and opt_meta is not None:
            _restore_optimizer(optimizer, opt_meta, a)
        torch.set_rng_state(torch.from_numpy(a["rng.torch"]))
        cuda = sorted(k for k in a if k.startswith("rng.cuda."))
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([torch.from_numpy(a[k]) for k in cuda])
    except InvalidTraceError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as exc:
        raise InvalidTraceError(f"the checkpoint's optimizer or RNG state does not fit: "
                                f"{type(exc).__name__}: {exc}") from exc


def _restore_optimizer(optimizer: torch.optim.Optimizer, opt_meta: dict[str, Any],
                       a: dict[str, np.ndarray]) -> None:
    if opt_meta["type"] != type(optimizer).__name__:
        raise InvalidTraceError(f"the checkpoint was taken with {opt_meta['type']}, not "
                                f"{type(optimizer).__name__}")
    state: dict[int, dict[str, Any]] = {}
    for k in a:
        if k.startswith("optim."):
            _, idx, key = k.split(".", 2)
            state.setdefault(int(idx), {})[key] = torch.from_numpy(a[k])
    for k, v in opt_meta["scalars"].items():
        idx, key = k.split(".", 1)
        state.setdefault(int(idx), {})[key] = _unjson(v)
    optimizer.load_state_dict({"state": state,
                               "param_groups": _unjson(opt_meta["param_groups"])})
