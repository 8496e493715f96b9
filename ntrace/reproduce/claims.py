"""The paper's claims, each judged on the measurements by a rule written down beforehand.

A verdict is one of ``supported``, ``not supported`` or ``inconclusive``. Every rule is
stated in :data:`RULES` (and printed in the report before any number); the functions here
apply exactly that rule and return the numbers it used. Nothing is tuned to agree with the
paper: a claim that does not hold is reported as not supported.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ntrace.reproduce.measures import EXPLORATION_MEASURES, Exponent, RunMeasures

SUPPORTED, NOT_SUPPORTED, INCONCLUSIVE = "supported", "not supported", "inconclusive"
VERDICTS = (SUPPORTED, NOT_SUPPORTED, INCONCLUSIVE)
SQRT_BAND = (0.3, 0.7)  # exponents counted as "like √N"
EXPLORE_TIE = 0.01  # relative difference below which two exploration values tie
LOSS_TIE = 0.02  # relative difference below which two final losses tie (lower-loss claim)
NO_DIFFERENCE = 0.10  # relative difference up to which two final losses count as equal

RULES = {
    "regret-sqrt": (
        "Each fitted regret exponent (per layer, and of the mean neuron regret per layer; "
        "every seed) is *consistent with √N* when its 95% interval contains 0.5 or its "
        f"estimate lies in [{SQRT_BAND[0]}, {SQRT_BAND[1]}]. Supported: all fitted exponents "
        "consistent. Not supported: fewer than half consistent. Inconclusive: otherwise, or "
        "nothing fitted."),
    "average-optimum": (
        "Per layer, gap = running-average loss (cumulative loss / N) − hindsight Taylor "
        "optimum, at the checkpoint nearest N/10 and at the last checkpoint N (layer scale; "
        "the mean over the layer's neurons where the layer was not solved as a whole). A "
        "layer *approaches* the optimum when its last gap is ≤ 0 or smaller than its early "
        "gap. Supported: every layer of every seed approaches. Not supported: fewer than half "
        "do. Inconclusive: otherwise, or no finite optimum."),
    "rmsprop-explores": (
        "Measures (mean over seeds): mean distance to the nearest earlier activation "
        "configuration (fraction of bits), mean switch fraction per probe point, median "
        "log-volume per unit. Two values *tie* when they differ by less than "
        f"{EXPLORE_TIE:.0%} of the larger magnitude or, with several seeds, by less than "
        "the larger standard deviation over seeds. Supported: RMSProp above SGD on all three "
        "measures. Not supported: RMSProp below SGD on at least one (not a tie). "
        "Inconclusive: otherwise."),
    "adam-between": (
        "The same measures and tie rule. Supported: SGD < Adam < RMSProp on all three "
        "measures. Not supported: on at least one measure Adam is below SGD or above RMSProp "
        "(not a tie). Inconclusive: otherwise."),
    "adaptive-lower-loss": (
        "Final training loss = mean minibatch loss over the last "
        "{final}% of rounds (mean over seeds). Two losses *tie* when they differ by less than "
        f"{LOSS_TIE:.0%} of SGD's or, with several seeds, by less than the larger standard "
        "deviation. Supported: RMSProp and Adam both below SGD (not ties). Not supported: "
        "either above SGD (not a tie). Inconclusive: otherwise."),
    "convnet-no-difference": (
        "The same final training loss. Supported: RMSProp and Adam both within "
        f"{NO_DIFFERENCE:.0%} of SGD's final loss (or, with several seeds, within two "
        "standard deviations). Not supported: otherwise."),
}

STATEMENTS = {
    "regret-sqrt": ("Regret against the hindsight Taylor optimum grows like √N, per layer "
                    "and per neuron", "Sec. 2.4, Theorem 2, Fig. 3"),
    "average-optimum": ("The running-average training loss approaches the hindsight Taylor "
                        "optimum (gap O(1/√N))", "Sec. 2.4, Theorem 2, Fig. 3"),
    "rmsprop-explores": ("RMSProp explores activation configurations more than SGD, on all "
                         "three measures", "Sec. 3.3, Fig. 5"),
    "adam-between": ("Adam explores less than RMSProp but more than SGD", "Sec. 3.3, Fig. 5"),
    "adaptive-lower-loss": ("Adaptive optimizers (RMSProp, Adam) reach a lower training loss "
                            "than SGD on the autoencoder", "Sec. 3.3, Fig. 6"),
    "convnet-no-difference": ("On the convnet, adaptive optimizers and SGD reach about the "
                              "same training loss", "Sec. 3.3, Fig. 6"),
}


@dataclass(frozen=True)
class Verdict:
    """One row of the claims table: which claim, on what, the verdict and its numbers."""

    claim: str
    scope: str
    verdict: str
    numbers: str

    @property
    def statement(self) -> str:
        return STATEMENTS[self.claim][0]

    @property
    def section(self) -> str:
        return STATEMENTS[self.claim][1]


def _fmt(x: float, spec: str = ".3g") -> str:
    return "nan" if x is None or not math.isfinite(x) else format(x, spec)


def sqrt_consistent(e: Exponent) -> bool | None:
    """Whether one exponent is consistent with √N; None when it was not fitted."""
    if not math.isfinite(e.slope):
        return None
    in_ci = math.isfinite(e.low) and math.isfinite(e.high) and e.low <= 0.5 <= e.high
    return in_ci or SQRT_BAND[0] <= e.slope <= SQRT_BAND[1]


def _majority(ok: int, total: int) -> str:
    if total == 0:
        return INCONCLUSIVE
    if ok == total:
        return SUPPORTED
    return NOT_SUPPORTED if ok < total / 2 else INCONCLUSIVE


def regret_sqrt(runs: Sequence[RunMeasures], scope: str) -> Verdict:
    """Claim 1 on the runs of one task and optimizer (all seeds)."""
    checks = [(r.seed, e, sqrt_consistent(e)) for r in runs for e in r.exponents]
    fitted = [c for c in checks if c[2] is not None]
    ok = sum(1 for c in fitted if c[2])
    parts = []
    for scale in ("layer", "neurons"):
        items = [(f"{e.unit} {_fmt(e.slope, '.2f')} [{_fmt(e.low, '.2f')}, "
                  f"{_fmt(e.high, '.2f')}]" if ok is not None else f"{e.unit} not fitted")
                 + ("" if len(runs) == 1 else f" s{seed}")
                 for seed, e, ok in checks if e.scale == scale]
        if items:
            parts.append(f"{'layers' if scale == 'layer' else 'neuron means'}: "
                         + "; ".join(items))
    neu = np.asarray([v for r in runs for v in r.neuron_exponents], dtype=np.float64)
    neu = neu[np.isfinite(neu)]
    if neu.size:
        inside = np.mean((neu >= SQRT_BAND[0]) & (neu <= SQRT_BAND[1]))
        parts.append(f"single neurons: median {np.median(neu):.2f}, {inside:.0%} of "
                     f"{neu.size} in [{SQRT_BAND[0]}, {SQRT_BAND[1]}]")
    parts.append(f"{ok}/{len(fitted)} fitted exponents consistent")
    return Verdict("regret-sqrt", scope, _majority(ok, len(fitted)), " · ".join(parts))


def average_optimum(runs: Sequence[RunMeasures], scope: str) -> Verdict:
    """Claim 2 on the runs of one task and optimizer (all seeds)."""
    ok = total = 0
    parts = []
    for r in runs:
        for g in r.gaps:
            if not (math.isfinite(g.early) and math.isfinite(g.late)):
                continue
            total += 1
            good = g.late <= 0 or g.late < g.early
            ok += good
            rel = g.late / g.average_loss if g.average_loss else math.nan
            parts.append(f"{g.unit}{'' if len(runs) == 1 else f' s{r.seed}'} "
                         f"{_fmt(g.early)}→{_fmt(g.late)} ({_fmt(100 * rel, '.2g')}%)")
    head = (f"gap at N={runs[0].gaps[0].n_early}→{runs[0].gaps[0].n_late} (last gap as % of "
            "the running-average loss): " if runs and runs[0].gaps else "")
    text = head + "; ".join(parts) + f" · {ok}/{total} layers approach"
    return Verdict("average-optimum", scope, _majority(ok, total), text)


def _stats(values: Sequence[float]) -> tuple[float, float]:
    vals = [v for v in values if math.isfinite(v)]
    if not vals:
        return math.nan, math.nan
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def compare(a: Sequence[float], b: Sequence[float], rel_tol: float, scale: float | None = None
            ) -> int:
    """+1 if mean(a) > mean(b), −1 if below, 0 for a tie: a difference under ``rel_tol`` ×
    ``scale`` (default: the larger magnitude) or under the larger s.d. over seeds; NaN → 0."""
    ma, sa = _stats(a)
    mb, sb = _stats(b)
    if not (math.isfinite(ma) and math.isfinite(mb)):
        return 0
    ref = max(abs(ma), abs(mb)) if scale is None else abs(scale)
    if abs(ma - mb) <= max(rel_tol * ref, sa, sb):
        return 0
    return 1 if ma > mb else -1


def _by_opt(runs: Sequence[RunMeasures]) -> dict[str, list[RunMeasures]]:
    out: dict[str, list[RunMeasures]] = {}
    for r in runs:
        out.setdefault(r.optimizer, []).append(r)
    return out


def _mean_sd(values: Sequence[float], spec: str = ".4g") -> str:
    m, s = _stats(values)
    return _fmt(m, spec) + ("" if len(values) < 2 else f"±{_fmt(s, '.2g')}")


def _exploration_numbers(by: dict[str, list[RunMeasures]], opts: Sequence[str]) -> str:
    parts = []
    for m in EXPLORATION_MEASURES:
        vals = [f"{o} {_mean_sd([r.exploration.get(m, math.nan) for r in by[o]])}" for o in opts]
        parts.append(f"{m}: " + ", ".join(vals))
    return " · ".join(parts)


def _missing(by: dict[str, list[RunMeasures]], need: Sequence[str]) -> list[str]:
    return [o for o in need if o not in by]


def rmsprop_explores(runs: Sequence[RunMeasures], scope: str) -> Verdict:
    """Claim 3 on the runs of one task (all optimizers and seeds)."""
    by = _by_opt(runs)
    if miss := _missing(by, ("sgd", "rmsprop")):
        return Verdict("rmsprop-explores", scope, INCONCLUSIVE, f"not run: {', '.join(miss)}")
    cmp = [compare([r.exploration.get(m, math.nan) for r in by["rmsprop"]],
                   [r.exploration.get(m, math.nan) for r in by["sgd"]], EXPLORE_TIE)
           for m in EXPLORATION_MEASURES]
    verdict = (SUPPORTED if all(c > 0 for c in cmp) else
               NOT_SUPPORTED if any(c < 0 for c in cmp) else INCONCLUSIVE)
    signs = ", ".join(f"{m} {'>' if c > 0 else '<' if c < 0 else '≈'}"
                      for m, c in zip(EXPLORATION_MEASURES, cmp, strict=True))
    return Verdict("rmsprop-explores", scope, verdict,
                   _exploration_numbers(by, ("sgd", "rmsprop")) + f" · RMSProp vs SGD: {signs}")


def adam_between(runs: Sequence[RunMeasures], scope: str) -> Verdict:
    """Claim 4 on the runs of one task (all optimizers and seeds)."""
    by = _by_opt(runs)
    if miss := _missing(by, ("sgd", "rmsprop", "adam")):
        return Verdict("adam-between", scope, INCONCLUSIVE, f"not run: {', '.join(miss)}")

    def vals(o: str, m: str) -> list[float]:
        return [r.exploration.get(m, math.nan) for r in by[o]]

    above_sgd = [compare(vals("adam", m), vals("sgd", m), EXPLORE_TIE)
                 for m in EXPLORATION_MEASURES]
    below_rms = [compare(vals("rmsprop", m), vals("adam", m), EXPLORE_TIE)
                 for m in EXPLORATION_MEASURES]
    pairs = list(zip(above_sgd, below_rms, strict=True))
    verdict = (SUPPORTED if all(a > 0 and b > 0 for a, b in pairs) else
               NOT_SUPPORTED if any(a < 0 or b < 0 for a, b in pairs) else INCONCLUSIVE)
    sign = {1: "<", -1: ">", 0: "≈"}
    order = ", ".join(f"{m}: SGD {sign[a]} Adam {sign[b]} RMSProp"
                      for m, (a, b) in zip(EXPLORATION_MEASURES, pairs, strict=True))
    return Verdict("adam-between", scope, verdict,
                   _exploration_numbers(by, ("sgd", "adam", "rmsprop")) + f" · {order}")


def _losses(by: dict[str, list[RunMeasures]], opts: Sequence[str]) -> str:
    return ", ".join(f"{o} {_mean_sd([r.final_loss for r in by[o]])}" for o in opts)


def adaptive_lower_loss(runs: Sequence[RunMeasures], scope: str) -> Verdict:
    """Claim 5 on the autoencoder runs (all optimizers and seeds)."""
    by = _by_opt(runs)
    if miss := _missing(by, ("sgd", "rmsprop", "adam")):
        return Verdict("adaptive-lower-loss", scope, INCONCLUSIVE, f"not run: {', '.join(miss)}")
    sgd = [r.final_loss for r in by["sgd"]]
    ref = _stats(sgd)[0]
    cmp = [compare([r.final_loss for r in by[o]], sgd, LOSS_TIE, ref) for o in ("rmsprop", "adam")]
    verdict = (SUPPORTED if all(c < 0 for c in cmp) else
               NOT_SUPPORTED if any(c > 0 for c in cmp) else INCONCLUSIVE)
    rel = ", ".join(
        f"{o} {_fmt(100 * (_stats([r.final_loss for r in by[o]])[0] / ref - 1), '+.1f')}%"
        for o in ("rmsprop", "adam"))
    return Verdict("adaptive-lower-loss", scope, verdict,
                   f"final training loss: {_losses(by, ('sgd', 'rmsprop', 'adam'))} · vs SGD: "
                   f"{rel}")


def convnet_no_difference(runs: Sequence[RunMeasures], scope: str) -> Verdict:
    """Claim 6 on the convnet runs (all optimizers and seeds)."""
    by = _by_opt(runs)
    if miss := _missing(by, ("sgd", "rmsprop", "adam")):
        return Verdict("convnet-no-difference", scope, INCONCLUSIVE,
                       f"not run: {', '.join(miss)}")
    m_sgd, s_sgd = _stats([r.final_loss for r in by["sgd"]])
    same = []
    rel = []
    for o in ("rmsprop", "adam"):
        m, s = _stats([r.final_loss for r in by[o]])
        d = abs(m - m_sgd)
        several = len(by[o]) > 1 and len(by["sgd"]) > 1
        same.append(math.isfinite(d) and (d <= NO_DIFFERENCE * abs(m_sgd)
                                          or (several and d <= 2 * max(s, s_sgd))))
        rel.append(f"{o} {_fmt(100 * (m / m_sgd - 1), '+.1f')}%")
    return Verdict("convnet-no-difference", scope, SUPPORTED if all(same) else NOT_SUPPORTED,
                   f"final training loss: {_losses(by, ('sgd', 'rmsprop', 'adam'))} · vs SGD: "
                   + ", ".join(rel))


def judge(runs: Sequence[RunMeasures], tasks: dict[str, str]) -> list[Verdict]:
    """Every claim on every applicable task. ``tasks`` maps kind → task name (the scope)."""
    out: list[Verdict] = []
    kinds = [k for k in ("autoencoder", "convnet") if k in tasks]
    for claim in (regret_sqrt, average_optimum):
        for k in kinds:
            for opt in dict.fromkeys(r.optimizer for r in runs if r.kind == k):
                sel = [r for r in runs if r.kind == k and r.optimizer == opt]
                out.append(claim(sel, f"{tasks[k]}, {opt}"))
    for claim2 in (rmsprop_explores, adam_between):
        for k in kinds:
            out.append(claim2([r for r in runs if r.kind == k], tasks[k]))
    if "autoencoder" in tasks:
        out.append(adaptive_lower_loss([r for r in runs if r.kind == "autoencoder"],
                                       tasks["autoencoder"]))
    if "convnet" in tasks:
        out.append(convnet_no_difference([r for r in runs if r.kind == "convnet"],
                                         tasks["convnet"]))
    return out
