"""Running (or skipping) the runs of a reproduction, each in its own directory.

A run directory holds ``trace.zarr`` and, once the trace is closed complete, ``run.json``
(the run's settings and measured final loss); an analysed run also holds ``results.zarr``
and ``analysis.json``. Markers are written last and atomically (a temporary file, then
``os.replace``), so a run is finished exactly when its marker exists and names the same
settings: rerunning skips it. A run killed part-way has no marker and is restarted from
scratch (its partial trace or results are replaced); changed settings also rerun it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ntrace.errors import NonFiniteLossError
from ntrace.format.metadata import Sampling
from ntrace.progress import OnProgress
from ntrace.reproduce.plan import Analysis, Experiment, Plan

RUN_MARKER = "run.json"
ANALYSIS_MARKER = "analysis.json"


@dataclass(frozen=True)
class RunSpec:
    """One training run: a sweep run (short, loss-only sampling, a probe for the exploration
    measures) or a traced run."""

    role: str  # "sweep" | "traced"
    task: str
    optimizer: str
    lr: float
    seed: int
    steps: int
    taylor_every: int
    samples_per_round: int
    neurons: int | str
    probe_size: int
    probe_every: int
    data_dir: str | None
    device: str

    @property
    def name(self) -> str:
        return f"{self.optimizer}-lr{self.lr:g}-seed{self.seed}"

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class RunRecord:
    """A finished run: its spec, where it lives, the mean training loss over its last rounds
    (``inf`` if training diverged), wall time and whether this call skipped it."""

    spec: RunSpec
    path: Path
    final_loss: float
    rounds: int
    seconds: float
    skipped: bool
    diverged: bool = False
    exploration: dict[str, float] | None = None  # sweep runs: the three measures, if probed

    @property
    def trace(self) -> Path:
        return self.path / "trace.zarr"

    @property
    def results(self) -> Path:
        return self.path / "results.zarr"


SWEEP_SNAPSHOTS = 10
"""Probe snapshots of a sweep run: enough for the exploration measures of short runs, which
show how the optimizers' exploration depends on the learning rate."""


def sweep_spec(plan: Plan, exp: Experiment, optimizer: str, lr: float) -> RunSpec:
    """A sweep run records the loss (one Taylor round at the start) and the experiment's
    probe about ``SWEEP_SNAPSHOTS`` times."""
    every = max(1, exp.sweep_steps // SWEEP_SNAPSHOTS)
    return RunSpec("sweep", exp.task, optimizer, lr, plan.sweep_seed, exp.sweep_steps,
                   exp.sweep_steps + 1, 1, 1, exp.probe_size, every, exp.data_dir,
                   plan.device)


def traced_spec(plan: Plan, exp: Experiment, optimizer: str, lr: float, seed: int) -> RunSpec:
    return RunSpec("traced", exp.task, optimizer, lr, seed, exp.steps, exp.taylor_every,
                   exp.samples_per_round, exp.neurons, exp.probe_size, exp.probe_every,
                   exp.data_dir, plan.device)


def write_marker(path: Path, doc: dict[str, Any]) -> None:
    """Write a JSON marker atomically: it exists whole or not at all."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc, indent=1, sort_keys=True, allow_nan=True))
    os.replace(tmp, path)


def read_marker(path: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def final_loss(losses: np.ndarray, fraction: float) -> float:
    """Mean of the last ``fraction`` of the per-round minibatch losses (at least one)."""
    losses = np.asarray(losses, dtype=np.float64)
    if not losses.size:
        return math.nan
    k = max(1, int(round(fraction * losses.size)))
    return float(np.mean(losses[-k:]))


def _trace_complete(trace: Path) -> bool:
    from ntrace.format.reader import open_trace

    try:
        with open_trace(trace) as t:
            return t.attrs.status == "complete"
    except Exception:  # noqa: BLE001 - any unreadable trace is simply not finished
        return False


def ensure_run(spec: RunSpec, path: Path, fraction: float,
               progress: OnProgress | None = None) -> RunRecord:
    """The finished run at ``path``, training (and recording) it first unless its marker
    says it already finished with these settings."""
    from ntrace.format.reader import open_trace
    from ntrace.tasks import get_task
    from ntrace.tasks.runner import RunOptions, run_task

    marker = path / RUN_MARKER
    doc = read_marker(marker)
    if doc is not None and doc.get("spec") == spec.to_dict() and (
            doc.get("diverged") or _trace_complete(path / "trace.zarr")):
        return RunRecord(spec, path, float(doc["final_loss"]), int(doc["rounds"]),
                         float(doc["seconds"]), True, bool(doc.get("diverged")),
                         doc.get("exploration"))
    for stale in (marker, path / ANALYSIS_MARKER):
        stale.unlink(missing_ok=True)
    path.mkdir(parents=True, exist_ok=True)
    sampling = Sampling(taylor_every=spec.taylor_every, samples_per_round=spec.samples_per_round,
                        neurons=spec.neurons)
    opts = RunOptions(out=str(path / "trace.zarr"), optimizer=spec.optimizer, lr=spec.lr,
                      steps=spec.steps, seed=spec.seed, device=spec.device,
                      data_dir=spec.data_dir, overwrite=True, sampling=sampling,
                      probe_size=spec.probe_size,
                      probe_every=spec.probe_every if spec.probe_size else None)
    start = time.perf_counter()
    diverged = False
    try:
        run_task(get_task(spec.task), opts,
                 progress)
    except NonFiniteLossError:  # a learning rate too large: recorded as diverged
        diverged = True
    seconds = time.perf_counter() - start
    explored = None
    with open_trace(path / "trace.zarr") as t:
        losses = t.read("loss")
        rounds = t.rounds
        if spec.role == "sweep" and spec.probe_size and not diverged:
            from ntrace.reproduce.measures import trace_exploration

            explored = trace_exploration(t) or None
    loss = math.inf if diverged else final_loss(losses, fraction)
    write_marker(marker, {"spec": spec.to_dict(), "final_loss": loss, "rounds": rounds,
                          "seconds": seconds, "diverged": diverged, "exploration": explored})
    return RunRecord(spec, path, loss, rounds, seconds, False, diverged, explored)


def analysis_options(a: Analysis, device: str, progress: OnProgress | None) -> Any:
    from ntrace.analyze import AnalysisOptions

    kw: dict[str, Any] = {} if progress is None else {"progress": progress}
    return AnalysisOptions(domain=a.domain, checkpoints=a.checkpoints, tol=a.tol,
                           scales=a.scales, max_dim=a.max_dim, fit_from=a.fit_from,
                           confidence=a.confidence, device=device, **kw)


def ensure_analysis(run: RunRecord, analysis: Analysis, device: str,
                    progress: OnProgress | None = None
                    ) -> tuple[Any, bool]:
    """The results Dataset of ``run`` and whether it was reused: analysed now unless its
    marker says it was analysed with these settings."""
    from ntrace.analyze import analyze_trace, open_results

    marker = run.path / ANALYSIS_MARKER
    doc = read_marker(marker)
    settings = {"analysis": _plain(analysis), "device": device, "run": run.spec.to_dict()}
    if doc is not None and doc.get("settings") == settings and run.results.exists():
        return open_results(run.results), True
    marker.unlink(missing_ok=True)
    if run.results.exists():  # a partial store of an interrupted analysis: ours to replace
        shutil.rmtree(run.results)
    ds = analyze_trace(run.trace, analysis_options(analysis, device, progress), out=run.results)
    write_marker(marker, {"settings": settings})
    return ds, False


def _plain(a: Analysis) -> dict[str, Any]:
    return json.loads(json.dumps({k: getattr(a, k) for k in a.__dataclass_fields__}))
