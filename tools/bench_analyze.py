"""Benchmark of the analyzer's kernels; prints a table of ratios measured in one run.

    python tools/bench_analyze.py [--steps 400] [--device cpu]

1. Hindsight Taylor optima of every neuron of a recorded digits autoencoder: the batched
   solvers (all neurons of a layer as one batched problem) against scipy's L-BFGS-B run one
   neuron at a time on the same quadratics, both driven to the same accuracy; the objective
   values reached by each are printed side by side.
2. Problems of conv neurons with few samples: solved in the row space of their design
   against the full parameter space (same values, certified).
3. The minimum Hamming distance between activation configurations (exploration (a)): XOR +
   popcount on packed 64-bit words against a naive numpy implementation on unpacked bools.
Not a test: timings depend on the machine. Runs in about two minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import minimize

from ntrace.analyze import crossentropy as ce
from ntrace.analyze.domain import Domain, iterate_stats
from ntrace.analyze.exploration import (
    min_previous_distance,
    min_previous_distance_dense,
    switch_fraction,
    switch_fraction_dense,
)
from ntrace.analyze.options import AnalysisOptions
from ntrace.analyze.plan import make_plan
from ntrace.analyze.quadratic import NeuronGram, Quadratic
from ntrace.analyze.solve import fista, lipschitz, solve_quadratic
from ntrace.analyze.source import TaylorSource
from ntrace.format.bits import pack
from ntrace.format.metadata import Sampling
from ntrace.format.reader import open_trace
from ntrace.losses import BinaryLogistic
from ntrace.tasks import get_task
from ntrace.tasks.runner import RunOptions, run_task

TOL = 1e-9


def record(path: Path, steps: int) -> None:
    run_task(get_task("digits-autoencoder"),
             RunOptions(out=str(path), steps=steps, optimizer="sgd", seed=0, probe_size=0,
                        sampling=Sampling(taylor_every=2, samples_per_round=8)))


def neuron_problems(path: Path, device: torch.device, kind: str
                    ) -> list[tuple[Quadratic, Domain]]:
    """The hindsight quadratic and domain of every neuron, batched per layer."""
    tr = open_trace(path)
    plan = make_plan(tr, AnalysisOptions(scales=("neuron",)))
    src = TaylorSource(tr, plan.layers, device, 32 << 20)
    T = tr.taylor_rounds
    stats = iterate_stats(src, T)
    grams = [NeuronGram(lp, tr.attrs.output_size, device) for lp in plan.layers]
    for block in src.blocks(0, T):
        err = block.output - block.target
        for g in grams:
            g.add(block, err)
    return [(g.quadratic(), stats.neuron(kind, lp)) for g, lp in zip(grams, plan.layers,
                                                                        strict=True)]


def ours(problems: list[tuple[Quadratic, Domain]], device: torch.device
         ) -> tuple[float, np.ndarray, float]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    values, gaps = [], []
    for q, dom in problems:
        sol = solve_quadratic(q, dom, TOL, 200000)
        values.append(sol.value)
        gaps.append(sol.gap)
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t
    return elapsed, torch.cat(values).cpu().numpy(), float(torch.cat(gaps).max())


def scipy_one_by_one(problems: list[tuple[Quadratic, Domain]], max_iter: int
                     ) -> tuple[float, np.ndarray, int, str]:
    """The same problems with scipy, one neuron at a time: L-BFGS-B for a box or no
    constraint, SLSQP for a ball. Returns time, values, how many stopped unconverged."""
    qs = [(q.A.cpu().numpy(), q.b.cpu().numpy(), q.c.cpu().numpy(), dom) for q, dom in problems]
    t = time.perf_counter()
    values, failed, method = [], 0, "L-BFGS-B"
    for A, b, c, dom in qs:
        for k in range(A.shape[0]):
            Ak, bk, ck = A[k], b[k], float(c[k])

            def f(x: np.ndarray, Ak: np.ndarray = Ak, bk: np.ndarray = bk, ck: float = ck
                  ) -> tuple[float, np.ndarray]:
                Ax = Ak @ x
                return float(x @ Ax - 2 * bk @ x + ck), 2 * (Ax - bk)

            if dom.kind == "ball":
                m, R = dom.center[k].cpu().numpy(), float(dom.radius[k])
                cons = {"type": "ineq", "fun": lambda x, m=m, R=R: R * R - (x - m) @ (x - m),
                        "jac": lambda x, m=m: -2 * (x - m)}
                method = "SLSQP"
                res = minimize(f, m, jac=True, method="SLSQP", constraints=[cons],
                               options={"ftol": 1e-15, "maxiter": max_iter})
                failed += int(not res.success and res.status != 8)
            else:
                if dom.kind == "box":
                    lo, hi = dom.lower[k].cpu().numpy(), dom.upper[k].cpu().numpy()
                    bounds, x0 = list(zip(lo, hi, strict=True)), 0.5 * (lo + hi)
                else:
                    bounds, x0 = None, np.zeros(Ak.shape[0])
                res = minimize(f, x0, jac=True, method="L-BFGS-B", bounds=bounds,
                               options={"ftol": 1e-15, "gtol": 1e-10, "maxiter": max_iter,
                                        "maxfun": 2 * max_iter})
                failed += int(not res.success)
            values.append(res.fun)
    return time.perf_counter() - t, np.asarray(values), failed, method


def hamming(K: int, Q: int, M: int) -> tuple[float, float, float, float]:
    rng = np.random.default_rng(0)
    A = rng.random((K, Q, M)) < 0.3
    flips = rng.random((K, Q, M)) < 0.02
    A = np.logical_xor(A[:1], np.cumsum(flips, axis=0) % 2 == 1)  # a slowly drifting walk
    P = pack(A)

    def rows(k0: int, k1: int) -> np.ndarray:
        return P[k0:k1]

    times = []
    for _ in range(3):  # median of 3
        t = time.perf_counter()
        packed = min_previous_distance(rows, K)
        sw = switch_fraction(rows, K, M)
        times.append(time.perf_counter() - t)
    t_packed = float(np.median(times))
    t = time.perf_counter()
    naive = min_previous_distance_dense(A)
    sw_naive = switch_fraction_dense(A)
    t_naive = time.perf_counter() - t
    assert np.array_equal(packed, naive) and np.allclose(sw, sw_naive)
    return t_packed, t_naive, float(A.nbytes), float(P.nbytes)


def row_space(device: torch.device, B: int = 8, K: int = 16, o: int = 10, D: int = 801
              ) -> list[tuple[str, float, float, str]]:
    """2. Problems of conv neurons (D parameters, a design of K samples × o outputs, K·o ≪ D
    as on the first checkpoints of a convnet trace): solved in the design's row space
    (:func:`ntrace.analyze.crossentropy.reduce`) against the full space, to the same
    tolerance: cross-entropy over a ball (FISTA), and binary logistic with soft targets
    unconstrained (Newton; cross-entropy with K·o ≪ D is separable, hence unbounded)."""
    gen = torch.Generator().manual_seed(0)
    kw = {"dtype": torch.float64}
    M = (0.05 * torch.randn(B, K, o, D, generator=gen, **kw)).to(device)
    r = torch.randn(B, K, o, generator=gen, **kw).to(device)
    center = (0.05 * torch.randn(B, D, generator=gen, **kw)).to(device)
    radius = torch.full((B,), 0.5, **kw, device=device)
    out = []
    torch.linalg.qr(torch.ones(2, 3, 2, **kw, device=device))  # warm-up: first-call overheads
    for kind in ("ball", "none"):
        if kind == "ball":
            y = torch.randint(0, o, (1, K), generator=gen).to(device)
            prob = ce.DenseCE(M, r, y)
        else:
            y = torch.rand(1, K, o, generator=gen, **kw).to(device)
            prob = ce.DenseCE(M, r, y, BinaryLogistic())
        dom = (Domain("ball", center=center, radius=radius, batch=B) if kind == "ball"
               else Domain("none", batch=B))

        def solve(p: ce.Problem, d: Domain, x0: torch.Tensor) -> tuple[torch.Tensor, float]:
            if d.kind == "ball":
                s = fista(p, d, x0, TOL, 20000, lipschitz=lipschitz(p.hessian(x0)) / 2)
                return s.value, float(s.gap.max())
            _, v, g, _ = ce.newton(p, x0, TOL, 200)
            return v, float(g.max())

        t = time.perf_counter()
        v_full, g_full = solve(prob, dom, center)
        t_full = time.perf_counter() - t
        t = time.perf_counter()
        red = ce.reduce(prob, center)
        assert red is not None
        sub, Qb = red
        z0 = torch.zeros(B, Qb.shape[1], **kw, device=device)
        sdom = (Domain("ball", center=z0, radius=radius, batch=B) if kind == "ball"
                else Domain("none", batch=B))
        v_red, g_red = solve(sub, sdom, z0)
        t_red = time.perf_counter() - t
        out.append((f"{B} conv neurons, D={D}, {K}x{o} rows, {prob.link.name}, {kind}",
                    t_full, t_red, f"max |value diff| {float((v_full - v_red).abs().max()):.1e};"
                    f" certified gaps {g_full:.1e} (full) {g_red:.1e} (row space)"))
    return out


def measure(steps: int, device: torch.device, snapshots: int, scipy_iter: int
            ) -> list[tuple[str, float, float, str]]:
    """(kernel, reference seconds, ntrace seconds, note) for every kernel of the module
    docstring, measured in this run."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ae.zarr"
        t = time.perf_counter()
        record(path, steps)
        print(f"recorded {steps} rounds of digits-autoencoder in "
              f"{time.perf_counter() - t:.1f}s")
        with torch.no_grad():
            for kind in ("box", "none", "ball"):
                problems = neuron_problems(path, device, kind)
                n = sum(q.b.shape[0] for q, _ in problems)
                ours(problems, device)  # warm-up (first-call overheads)
                runs = [ours(problems, device) for _ in range(5)]
                t_ours = float(np.median([r[0] for r in runs]))  # median of 5: robust to noise
                _, v_ours, gap = runs[0]
                t_sp, v_sp, failed, method = scipy_one_by_one(problems, scipy_iter)
                rows.append((f"neuron optima, domain {kind} ({n} neurons) vs {method}", t_sp,
                             t_ours,
                             f"sum of optima: batched {v_ours.sum():.12f} (max certified gap "
                             f"{gap:.1e}), {method} {v_sp.sum():.12f} ({failed} stopped at the "
                             f"iteration cap); max |diff| {np.abs(v_ours - v_sp).max():.1e}; "
                             f"batched lower on {int((v_ours < v_sp - 1e-12).sum())}, higher on "
                             f"{int((v_ours > v_sp + 1e-12).sum())}"))
    with torch.no_grad():
        rows += row_space(device)
    K, Q, M = snapshots, 500, 180
    t_packed, t_naive, dense_bytes, packed_bytes = hamming(K, Q, M)
    rows.append((f"Hamming min distance + switches ({K} snapshots x {Q} probes x {M} units)",
                 t_naive, t_packed, f"same answers; packed input {packed_bytes / 2**20:.1f} "
                                    f"MiB vs unpacked bools {dense_bytes / 2**20:.1f} MiB"))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=400, help="training rounds to record")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--snapshots", type=int, default=400)
    ap.add_argument("--scipy-iter", type=int, default=3000,
                    help="iteration cap of each scipy solve (bounds the reference's time)")
    args = ap.parse_args()
    device = torch.device(args.device)
    rows = measure(args.steps, device, args.snapshots, args.scipy_iter)
    print(f"\n{'kernel':<62} {'reference s':>11} {'ntrace s':>9} {'ratio':>7}")
    for name, ref, mine, note in rows:
        print(f"{name:<62} {ref:>11.2f} {mine:>9.3f} {ref / mine:>6.1f}x")
        print(f"    {note}")
    print(f"\nreference: scipy one neuron at a time / numpy on unpacked bools (one run each); "
          f"ntrace: median of 5 (solvers) or 3 (Hamming) runs; device {device}, torch threads "
          f"{torch.get_num_threads()}")


if __name__ == "__main__":
    main()
