"""Turning hindsight solves and exploration measures into the results Dataset."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import xarray as xr

from ntrace import __version__
from ntrace.analyze.exploration import Exploration
from ntrace.analyze.hindsight import Family, Hindsight
from ntrace.analyze.options import AnalysisOptions
from ntrace.analyze.plan import AnalysisPlan
from ntrace.analyze.regret import cumulative_loss, fit_exponent, regret, resolution
from ntrace.analyze.results import NODE, RESULTS_VERSION, indexed, over_sqrt, var
from ntrace.analyze.solve import NOT_SOLVED, STATUS_NAMES
from ntrace.analyze.source import read_float64
from ntrace.format.reader import Trace

DOMAIN_TEXT = {
    "ball": "ball centred at the mean iterate, radius the largest distance of an iterate from "
            "it (per neuron row, per layer matrix, or all layers)",
    "box": "coordinate-wise range [min, max] of the iterates",
    "none": "unconstrained (an optimum that is not attained is reported as unbounded: NaN)",
}
CERTIFICATE_TEXT = {
    "ball": "Frank-Wolfe gap max_{s in H} <grad f(u), u - s> (nll: 0, closed form)",
    "box": "Frank-Wolfe gap max_{s in H} <grad f(u), u - s> (nll: 0, closed form)",
    "none": "mse: (1/4) grad^T A^+ grad (exact suboptimality of a quadratic); cross_entropy, "
            "bce_with_logits: Fenchel duality gap; nll: 0 (linear: closed form, unbounded "
            "unless the gradient vanishes)",
}


def _scale_vars(out: dict[str, xr.Variable], prefix: str, dims: tuple[str, ...],
                value: np.ndarray, gap: np.ndarray, status: np.ndarray, iters: np.ndarray,
                counts: np.ndarray, cum: np.ndarray, opts: AnalysisOptions,
                fit_min: float, extra: dict[str, Any]) -> None:
    what = {"neuron": "one neuron's row varies", "layer": "one layer's weights vary",
            "network": "all layers vary"}[prefix]
    out[f"{prefix}_optimum"] = var(dims, value, f"hindsight Taylor optimum min_H (1/N) "
                                   f"sum_t TL_t(V) ({what})", **extra)
    out[f"{prefix}_gap"] = var(dims, gap, "certified upper bound on optimum error "
                               "(value - true minimum)", **extra)
    out[f"{prefix}_status"] = var(dims, status, "solve status",
                                  flag_values=list(range(len(STATUS_NAMES))),
                                  flag_meanings=" ".join(STATUS_NAMES), **extra)
    out[f"{prefix}_iterations"] = var(dims, iters, "solver iterations", **extra)
    total = counts.reshape((-1,) + (1,) * (value.ndim - 1)) * value
    out[f"{prefix}_optimum_total"] = var(dims, total, "N x Taylor optimum", **extra)
    out[f"{prefix}_optimum_total_over_sqrt_n"] = var(dims, over_sqrt(total, counts),
                                                    "N x Taylor optimum / sqrt(N)", **extra)
    reg = regret(cum, value, counts)
    out[f"{prefix}_regret"] = var(dims, reg, "regret: cumulative loss - N x Taylor optimum",
                                  **extra)
    out[f"{prefix}_regret_over_sqrt_n"] = var(dims, over_sqrt(reg, counts),
                                             "regret / sqrt(N)", **extra)
    ex = fit_exponent(counts, reg, min_count=fit_min, confidence=opts.confidence,
                      floor=resolution(counts, gap, cum))
    edims = dims[1:]
    desc = (f"slope of log regret on log N over checkpoints with N >= {fit_min:g} and "
            "resolved regret (> 2 N gap + 1e-6 cumulative loss)")
    out[f"{prefix}_regret_exponent"] = var(edims, ex.slope, desc, **extra)
    out[f"{prefix}_regret_exponent_low"] = var(edims, ex.low, f"{opts.confidence:.0%} "
                                               "confidence bound (low)", **extra)
    out[f"{prefix}_regret_exponent_high"] = var(edims, ex.high, f"{opts.confidence:.0%} "
                                                "confidence bound (high)", **extra)
    out[f"{prefix}_regret_exponent_points"] = var(edims, ex.points, "checkpoints fitted",
                                                  **extra)


def _stack(fams: dict[str, Family], order: list[str], attr: str, n_cp: int) -> np.ndarray:
    parts = [getattr(fams[n], attr) for n in order if n in fams]
    return np.concatenate(parts, axis=1) if parts else np.zeros((n_cp, 0))


def build_dataset(trace: Trace, plan: AnalysisPlan, opts: AnalysisOptions, hs: Hindsight,
                  expl: Exploration | None, notes: list[str]) -> xr.Dataset:
    """Every result as one Dataset; ``attrs['ntrace']`` says how it was computed."""
    names = [lp.name for lp in plan.layers]
    counts = np.asarray(hs.checkpoints, dtype=np.int64)
    cum = cumulative_loss(hs.taylor_loss, counts)
    T = plan.taylor_rounds
    fit_min = max(1.0, opts.fit_from * T)
    n_cp = len(counts)
    v: dict[str, xr.Variable] = {}
    coords: dict[str, Any] = {
        "checkpoint": var("checkpoint", counts, "Taylor rounds N up to this checkpoint"),
        "checkpoint_round": var("checkpoint", hs.round_index[counts - 1] + 1,
                                "training rounds elapsed at the checkpoint"),
        "taylor_round": var("taylor_round", np.arange(T), "Taylor round t"),
        "round_index": var("taylor_round", hs.round_index, "training round n of Taylor "
                           "round t"),
        "layer": var("layer", np.asarray(names, dtype=str), "analysed layer (network "
                     "order)"),
    }
    v["taylor_loss"] = var("taylor_round", hs.taylor_loss, "loss at the iterate on the "
                           "recorded samples: mean of taylor/sample_loss = TL_t(W_t)")
    v["cumulative_loss"] = var("checkpoint", cum, "sum_{t<N} TL_t(W_t)")
    v["cumulative_loss_over_sqrt_n"] = var("checkpoint", over_sqrt(cum, counts),
                                           "cumulative loss / sqrt(N)")
    v["minibatch_loss"] = var("round", read_float64(trace, "loss", opts.block_bytes),
                              "loss of the whole minibatch at every round (not comparable "
                              "with Taylor losses when S < batch size)")
    # neuron scale
    order = [n for n in names if n in hs.neuron]
    if order:
        lp_by = {lp.name: lp for lp in plan.layers}
        nl = np.concatenate([np.full(len(lp_by[n].selected), n) for n in order])
        ni = np.concatenate([lp_by[n].neurons for n in order])
        coords["neuron_layer"] = var("neuron", nl, "layer of the neuron")
        coords["neuron_index"] = var("neuron", ni, "neuron index within its layer")
        _scale_vars(v, "neuron", ("checkpoint", "neuron"),
                    _stack(hs.neuron, order, "value", n_cp), _stack(hs.neuron, order, "gap", n_cp),
                    _stack(hs.neuron, order, "status", n_cp),
                    _stack(hs.neuron, order, "iterations", n_cp), counts, cum, opts, fit_min, {})
        reg, gap = v["neuron_regret"].values, v["neuron_gap"].values
        with warnings.catch_warnings():  # all-NaN layers (unbounded everywhere) stay NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            mean_reg = np.stack([np.nanmean(reg[:, nl == n], axis=1)
                                 for n in order], 1)
            mean_gap = np.stack([np.nanmax(gap[:, nl == n], axis=1)
                                 for n in order], 1)
        ex = fit_exponent(counts, mean_reg, min_count=fit_min, confidence=opts.confidence,
                          floor=resolution(counts, mean_gap, cum))
        full = {k: np.full(len(names), np.nan) for k in ("slope", "low", "high")}
        for i, n in enumerate(order):
            for k in full:
                full[k][names.index(n)] = getattr(ex, k)[i]
        v["neuron_mean_regret_exponent"] = var("layer", full["slope"], "slope of log (mean "
                                               "neuron regret of the layer) on log N")
        v["neuron_mean_regret_exponent_low"] = var("layer", full["low"], "confidence bound "
                                                   "(low)")
        v["neuron_mean_regret_exponent_high"] = var("layer", full["high"], "confidence bound "
                                                    "(high)")
        size = np.concatenate([hs.neuron[n].domain.size().cpu().numpy() for n in order])
        v["neuron_domain_size"] = var("neuron", size, "radius of the ball / half diagonal of "
                                      "the box of the neuron's domain")
        width = max(lp_by[n].d_aug for n in order)
        pts = np.full((len(ni), width), np.nan)
        row = 0
        for n in order:
            fam = hs.neuron[n]
            if fam.x is not None:
                x = fam.x.cpu().numpy()
                pts[row:row + len(x), :x.shape[1]] = x
            row += fam.units
        v["neuron_optimum_point"] = var(("neuron", "feature"), pts, "argmin at the last "
                                        "checkpoint: [w | bias], w the neuron's weights "
                                        "(a filter flattened, an embedding column), "
                                        "NaN-padded")
        for key, attr, desc in (("center", "center", "centre of the neuron's ball"),
                                ("lower", "lower", "lower corner of the neuron's box"),
                                ("upper", "upper", "upper corner of the neuron's box")):
            parts = [getattr(hs.neuron[n].domain, attr) for n in order]
            if all(p_ is not None for p_ in parts):
                arr = np.full((len(ni), width), np.nan)
                row = 0
                for part in parts:
                    x = part.cpu().numpy()
                    arr[row:row + len(x), :x.shape[1]] = x
                    row += len(x)
                v[f"neuron_domain_{key}"] = var(("neuron", "feature"), arr,
                                                f"{desc}: [w | bias], NaN-padded")
        if hs.best_response:
            br = np.concatenate([hs.best_response[n] for n in order], axis=1)
            brg = np.concatenate([hs.best_response_gap[n] for n in order], axis=1)
            v["neuron_best_response"] = var(("taylor_round", "neuron"), br, "DYNAMIC "
                                            "comparator: min_H TL_t(V) of each round alone")
            v["neuron_best_response_gap"] = var(("taylor_round", "neuron"), brg,
                                                "certified bound on the best-response error")
            inst = np.concatenate([[np.zeros(br.shape[1])],
                                   np.cumsum(hs.taylor_loss[:, None] - br, axis=0)])
            dyn = inst[counts]
            v["neuron_dynamic_regret"] = var(("checkpoint", "neuron"), dyn, "DYNAMIC regret: "
                                             "sum_{t<N} [TL_t(W_t) - min_H TL_t(V)]")
            v["neuron_dynamic_regret_over_sqrt_n"] = var(("checkpoint", "neuron"),
                                                         over_sqrt(dyn, counts),
                                                         "dynamic regret / sqrt(N)")
    # layer scale (NaN rows for layers not solved at this scale)
    if hs.layer:
        def col(a: str, fill: float) -> np.ndarray:
            out = np.full((n_cp, len(names)), fill)
            for n, fam in hs.layer.items():
                out[:, names.index(n)] = getattr(fam, a)[:, 0]
            return out

        _scale_vars(v, "layer", ("checkpoint", "layer"), col("value", np.nan),
                    col("gap", np.nan), col("status", NOT_SOLVED).astype(np.int8),
                    col("iterations", 0).astype(np.int64), counts, cum, opts, fit_min, {})
        size = np.full(len(names), np.nan)
        for n, fam in hs.layer.items():
            size[names.index(n)] = float(fam.domain.size().cpu().numpy()[0])
        v["layer_domain_size"] = var("layer", size, "radius of the ball / half diagonal of "
                                     "the box of the layer's domain")
    if hs.network is not None:
        f = hs.network
        _scale_vars(v, "network", ("checkpoint",), f.value[:, 0], f.gap[:, 0], f.status[:, 0],
                    f.iterations[:, 0], counts, cum, opts, fit_min, {})
        v["network_domain_size"] = var((), float(f.domain.size().cpu().numpy()[0]),
                                       "radius of the ball / half diagonal of the box")
    explored: dict[str, Any] = {}
    if expl is not None:
        ev, ec, explored = expl.variables()
        v.update(ev)
        coords.update(ec)
    a = trace.attrs
    s = a.sampling
    comparison = (f"losses and Taylor losses are compared on the same recorded rounds and "
                  f"samples: the first {s.samples_per_round} samples (taylor/sample_loss, not "
                  f"the minibatch loss) of every {s.taylor_every}-th round; N counts Taylor "
                  f"rounds ({T} of {trace.rounds} rounds)")
    attrs = {
        "node": NODE, "results_version": RESULTS_VERSION, "ntrace_version": __version__,
        "trace": str(trace.path), "trace_status": a.status,
        "trace_commit": a.commit.to_dict(), "loss": a.loss.id,
        "optimizer": dict(a.run.get("optimizer") or {}),
        "task": a.run.get("task"), "layer_names": names,
        "domain": opts.domain, "domain_definition": DOMAIN_TEXT[opts.domain],
        "certificate": CERTIFICATE_TEXT[opts.domain], "tolerance": opts.tol,
        "max_iter": opts.max_iter, "checkpoints": [int(c) for c in counts],
        "scales": list(plan.scales), "skipped": list(plan.skipped),
        "layer_scale_layers": list(plan.layer_scale),
        "exponent_fit": {"min_taylor_rounds": fit_min, "confidence": opts.confidence},
        "comparison": comparison, "dynamic": bool(hs.best_response),
        "device": opts.device, "notes": list(notes) + list(hs.notes),
        "status_names": list(STATUS_NAMES),
    }
    if expl is not None:
        attrs["exploration"] = explored
    return indexed(xr.Dataset(v, coords=coords, attrs={"ntrace": attrs}))

