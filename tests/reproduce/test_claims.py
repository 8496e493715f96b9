"""Claim verdicts follow the written rules: synthetic measurements, cases that pass and fail."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ntrace.analyze import fit_exponent
from ntrace.reproduce.claims import (
    INCONCLUSIVE,
    NOT_SUPPORTED,
    RULES,
    SUPPORTED,
    adam_between,
    adaptive_lower_loss,
    average_optimum,
    compare,
    convnet_no_difference,
    judge,
    regret_sqrt,
    rmsprop_explores,
    sqrt_consistent,
)
from ntrace.reproduce.measures import Exponent, Gap, RunMeasures


def run(opt: str, loss: float = 1.0, kind: str = "autoencoder", seed: int = 0,
        exps: tuple[Exponent, ...] = (), gaps: tuple[Gap, ...] = (),
        expl: tuple[float, float, float] = (0.1, 0.1, -10.0)) -> RunMeasures:
    return RunMeasures(kind, opt, seed, loss, exps, (), gaps,
                       dict(zip(("min_distance", "switch", "log_volume"), expl, strict=True)))


def test_exponents_fitted_from_sqrt_regret_are_consistent() -> None:
    # regret = c √N with multiplicative noise, fitted by the analyzer's own routine: the
    # rule must accept it; regret ∝ N (linear) must be rejected
    rng = np.random.default_rng(0)
    n = np.unique(np.geomspace(1, 400, 20).round()).astype(np.int64)
    sqrt_reg = (3 * np.sqrt(n) * np.exp(rng.normal(0, 0.05, n.size)))[:, None]
    lin_reg = (0.2 * n * np.exp(rng.normal(0, 0.05, n.size)))[:, None]
    good = fit_exponent(n, sqrt_reg, min_count=1.0, confidence=0.95)
    bad = fit_exponent(n, lin_reg, min_count=1.0, confidence=0.95)
    e_good = Exponent("fc1", "layer", *(float(getattr(good, k)[0]) for k in ("slope", "low",
                                                                            "high")))
    e_bad = Exponent("fc1", "layer", *(float(getattr(bad, k)[0]) for k in ("slope", "low",
                                                                          "high")))
    assert abs(e_good.slope - 0.5) < 0.05 and sqrt_consistent(e_good)
    assert abs(e_bad.slope - 1.0) < 0.05 and sqrt_consistent(e_bad) is False
    assert regret_sqrt([run("sgd", exps=(e_good,))], "t").verdict == SUPPORTED
    assert regret_sqrt([run("sgd", exps=(e_bad,))], "t").verdict == NOT_SUPPORTED


def test_regret_rule_counts_every_exponent() -> None:
    ok = Exponent("a", "layer", 0.45, 0.40, 0.50)
    wide = Exponent("b", "neurons", 0.9, 0.4, 1.4)  # interval contains 0.5
    far = Exponent("c", "layer", 0.05, 0.0, 0.1)
    unfitted = Exponent("d", "layer", math.nan, math.nan, math.nan)
    assert sqrt_consistent(wide) and sqrt_consistent(unfitted) is None
    v = regret_sqrt([run("sgd", exps=(ok, wide, unfitted))], "t")
    assert v.verdict == SUPPORTED and "2/2 fitted" in v.numbers and "0.45 [0.40, 0.50]" in v.numbers
    assert regret_sqrt([run("sgd", exps=(ok, wide, far))], "t").verdict == INCONCLUSIVE
    assert regret_sqrt([run("sgd", exps=(ok, far, far))], "t").verdict == NOT_SUPPORTED
    assert regret_sqrt([run("sgd", exps=(unfitted,))], "t").verdict == INCONCLUSIVE
    # seeds pool: a second seed with a far exponent turns "supported" into inconclusive
    two = [run("sgd", exps=(ok,)), run("sgd", seed=1, exps=(far,))]
    assert regret_sqrt(two, "t").verdict == INCONCLUSIVE


def test_average_optimum_rule() -> None:
    shrink = Gap("fc1", 0.2, 0.05, 3, 30, 1.0)
    below = Gap("fc2", 0.1, -0.01, 3, 30, 1.0)
    grow = Gap("fc3", 0.1, 0.3, 3, 30, 1.0)
    assert average_optimum([run("sgd", gaps=(shrink, below))], "t").verdict == SUPPORTED
    assert average_optimum([run("sgd", gaps=(shrink, grow))], "t").verdict == INCONCLUSIVE
    v = average_optimum([run("sgd", gaps=(grow, grow, shrink))], "t")
    assert v.verdict == NOT_SUPPORTED and "1/3 layers approach" in v.numbers
    nan = Gap("fc4", math.nan, math.nan, 3, 30, 1.0)
    assert average_optimum([run("sgd", gaps=(nan,))], "t").verdict == INCONCLUSIVE


def test_compare_tie_rule() -> None:
    assert compare([1.0], [0.5], 0.01) == 1 and compare([0.5], [1.0], 0.01) == -1
    assert compare([1.0], [1.005], 0.01) == 0  # under 1% of the larger magnitude
    assert compare([1.0, 1.2], [0.95, 1.0], 0.01) == 0  # 0.125 < the s.d. over seeds (0.14)
    assert compare([1.0, 1.01], [0.5, 0.51], 0.01) == 1
    assert compare([math.nan], [1.0], 0.01) == 0


def test_exploration_claims() -> None:
    sgd = run("sgd", expl=(0.01, 0.02, -20.0))
    rms = run("rmsprop", expl=(0.05, 0.06, -10.0))
    adam = run("adam", expl=(0.03, 0.04, -15.0))
    assert rmsprop_explores([sgd, rms, adam], "t").verdict == SUPPORTED
    assert adam_between([sgd, rms, adam], "t").verdict == SUPPORTED
    # RMSProp below SGD on log-volume: claim 3 fails; Adam above RMSProp: claim 4 fails
    rms_low = run("rmsprop", expl=(0.05, 0.06, -30.0))
    v = rmsprop_explores([sgd, rms_low, adam], "t")
    assert v.verdict == NOT_SUPPORTED and "log_volume <" in v.numbers
    adam_high = run("adam", expl=(0.08, 0.04, -15.0))
    assert adam_between([sgd, rms, adam_high], "t").verdict == NOT_SUPPORTED
    adam_tie = run("adam", expl=(0.03, 0.04, -10.0))  # ties RMSProp on log-volume
    assert adam_between([sgd, rms, adam_tie], "t").verdict == INCONCLUSIVE
    assert rmsprop_explores([sgd, adam], "t").verdict == INCONCLUSIVE  # RMSProp not run


def test_loss_claims() -> None:
    sgd, rms, adam = run("sgd", 0.20), run("rmsprop", 0.07), run("adam", 0.08)
    assert adaptive_lower_loss([sgd, rms, adam], "t").verdict == SUPPORTED
    v = adaptive_lower_loss([sgd, rms, run("adam", 0.25)], "t")
    assert v.verdict == NOT_SUPPORTED and "adam +25.0%" in v.numbers
    assert adaptive_lower_loss([sgd, rms, run("adam", 0.201)], "t").verdict == INCONCLUSIVE
    c = [run("sgd", 2.0, "convnet"), run("rmsprop", 2.1, "convnet"),
         run("adam", 1.9, "convnet")]
    assert convnet_no_difference(c, "t").verdict == SUPPORTED
    c[1] = run("rmsprop", 1.5, "convnet")
    assert convnet_no_difference(c, "t").verdict == NOT_SUPPORTED


def test_judge_covers_every_claim_once_per_scope() -> None:
    runs = [run(o, kind=k, exps=(Exponent("fc1", "layer", 0.5, 0.4, 0.6),),
                gaps=(Gap("fc1", 0.2, 0.1, 3, 30, 1.0),))
            for k in ("autoencoder", "convnet") for o in ("sgd", "rmsprop", "adam")]
    verdicts = judge(runs, {"autoencoder": "ae", "convnet": "cnn"})
    assert {v.claim for v in verdicts} == set(RULES)
    assert len(verdicts) == 2 * 2 * 3 + 2 * 2 + 1 + 1
    assert all(v.numbers for v in verdicts)


@pytest.mark.parametrize("claim", sorted(RULES))
def test_every_rule_is_written(claim: str) -> None:
    assert "Supported" in RULES[claim] and "Not supported" in RULES[claim]
