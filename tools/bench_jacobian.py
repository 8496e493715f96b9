"""Benchmark: Jacobian capture per layer, forward vs reverse mode (and the chain recursion).

For the MNIST autoencoder (784 outputs, narrow layers: forward mode and the recursion win) and
the CIFAR-10 convnet (10 outputs, wide conv layers: reverse mode wins), times computing
J_l = ∂f/∂a_l for S recorded samples with each method, checks they agree, and prints which
one the recorder's automatic choice picks. Usage: python tools/bench_jacobian.py [--samples 4]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from ntrace.recording.graph_jacobian import choose_modes, jacobian_forward, jacobians_reverse
from ntrace.recording.jacobian import jacobians_recursive
from ntrace.recording.structure import Watcher, discover
from ntrace.tasks.registry import autoencoder, convnet

MAX_FORWARD_UNITS = 5000


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    out = fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def bench(name: str, model: torch.nn.Module, x: torch.Tensor, repeats: int) -> list[str]:
    watcher = Watcher(model)
    with torch.no_grad():
        f = model(x)
    st = discover(watcher.log, model)
    watcher.paused = True
    s, p = f.shape
    layers = [la for la in st.layers if not (st.identity_output and la is st.layers[-1])]
    tracked = {la.name: torch.arange(la.geometry.output_shape[0]) for la in layers}
    units = {la.name: len(tracked[la.name]) * max(1, int(torch.tensor(la.geometry.positions)
                                                           .prod().item() if la.geometry.positions
                                                           else 1)) for la in layers}
    auto = choose_modes(p, units)
    budget = 256 << 20
    rows = []
    t_rev_all, rev = timed(lambda: jacobians_reverse(lambda: model(x),
                                                     {la.name: la.module for la in layers},
                                                     tracked, budget), repeats)
    rec_t = None
    if st.kind == "chain":
        pre = [watcher.log.calls[la.call_index].output.detach() for la in st.layers]
        rec_t, _ = timed(lambda: jacobians_recursive(
            [la.module.weight.detach() for la in st.layers],
            [la.activation for la in st.layers], pre), repeats)
    for la in layers:
        t_rev, _ = timed(lambda la=la: jacobians_reverse(lambda: model(x), {la.name: la.module},
                                                          tracked, budget), repeats)
        if units[la.name] > MAX_FORWARD_UNITS:  # one jvp per unit: hopeless, as auto knows
            rows.append(f"{name} | {la.name} | {units[la.name]} | {p} | not run | "
                        f"{t_rev * 1e3:.2f} | — | {auto[la.name]} | —")
            continue
        t_fwd, fwd = timed(lambda la=la: jacobian_forward(
            lambda: model(x), la.module, tracked[la.name], s, la.geometry.output_shape, budget),
            repeats)
        err = float((fwd - rev[la.name]).abs().max())  # type: ignore[operator,index]
        rows.append(f"{name} | {la.name} | {units[la.name]} | {p} | {t_fwd * 1e3:.2f} | "
                    f"{t_rev * 1e3:.2f} | {t_rev / t_fwd:.2f}× | {auto[la.name]} | {err:.1e}")
    tail = f"all layers in one reverse pass: {t_rev_all * 1e3:.2f} ms"
    if rec_t is not None:
        tail += f"; chain recursion (all layers): {rec_t * 1e3:.2f} ms"
    rows.append(f"{name} | ({tail}) | | | | | | |")
    watcher.remove()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    s = args.samples
    rows = bench("mnist-autoencoder", autoencoder((784,)), torch.rand(s, 784), args.repeats)
    rows += bench("cifar10-convnet", convnet((3, 32, 32)), torch.rand(s, 3, 32, 32),
                  args.repeats)
    print(f"\nJacobian capture per layer, {s} samples, CPU ({torch.get_num_threads()} threads)\n")
    head = ("model", "layer", "tracked units", "outputs", "forward ms", "reverse ms",
            "reverse ÷ forward", "auto picks", "max |fwd − rev|")
    print(" | ".join(head))
    print(" | ".join("---" for _ in head))
    print("\n".join(rows))


if __name__ == "__main__":
    main()
