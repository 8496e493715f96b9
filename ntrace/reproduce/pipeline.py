"""A whole reproduction: sweep, traced runs, analyses, claims and report, resumable.

    from ntrace.reproduce import make_plan, reproduce
    result = reproduce("repro/", make_plan("small", data_dir="data/"))

Layout of the output directory: ``sweep/<task>/<run>/`` (the learning-rate sweep),
``runs/<task>/<run>/`` (traced and analysed runs), ``figures/``, ``report.md``,
``report.html`` and ``plan.json``. Rerunning with the same plan skips every finished run
and analysis (see :mod:`ntrace.reproduce.runs`).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ntrace.errors import UsageError
from ntrace.reproduce.claims import Verdict, judge
from ntrace.reproduce.measures import RunMeasures, measure
from ntrace.reproduce.plan import Experiment, Plan
from ntrace.reproduce.runs import (
    RunRecord,
    ensure_analysis,
    ensure_run,
    sweep_spec,
    traced_spec,
    write_marker,
)

Progress = Callable[[str, str, int, int], None]
"""``progress(stage, label, done, total)``. Stages: ``jobs`` (runs and analyses of the whole
plan), ``rounds`` (training rounds of the current run), ``analysis`` (stages of the current
analysis, ``label`` naming the stage)."""


def _quiet(stage: str, label: str, done: int, total: int) -> None:
    del stage, label, done, total


@dataclass
class Reproduction:
    """What a reproduction produced: the sweep and traced runs, each run's results Dataset
    and measurements, the verdicts, the report files and the wall time of this call."""

    plan: Plan
    out: Path
    sweeps: list[RunRecord] = field(default_factory=list)
    chosen: dict[tuple[str, str], float] = field(default_factory=dict)  # (kind, opt) → lr
    runs: list[RunRecord] = field(default_factory=list)
    results: dict[str, Any] = field(default_factory=dict)  # run path → results Dataset
    measures: list[RunMeasures] = field(default_factory=list)
    verdicts: list[Verdict] = field(default_factory=list)
    analyses_reused: int = 0
    files: list[Path] = field(default_factory=list)
    seconds: float = 0.0
    started: str = ""

    @property
    def skipped(self) -> int:
        """Runs (sweep and traced) this call found finished and did not train again."""
        return sum(r.skipped for r in self.sweeps + self.runs)

    def by_kind(self, kind: str) -> list[RunRecord]:
        return [r for r in self.runs if self.kind_of(r) == kind]

    def kind_of(self, run: RunRecord) -> str:
        return next(e.kind for e in self.plan.experiments if e.task == run.spec.task)


def choose_lr(records: list[RunRecord]) -> float:
    """The learning rate whose sweep run ended with the lowest final training loss (ties:
    the smaller rate); diverged runs count as infinite loss."""
    finite = [r for r in records if math.isfinite(r.final_loss)]
    if not finite:
        raise UsageError(f"every learning rate of the {records[0].spec.optimizer} sweep on "
                         f"{records[0].spec.task} diverged; lower the sweep grid")
    return min(finite, key=lambda r: (r.final_loss, r.spec.lr)).spec.lr


def _check_out(out: Path, plan: Plan) -> None:
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory")
    if not out.parent.exists():
        raise UsageError(f"cannot write to {out}: directory {out.parent} does not exist")
    saved = out / "plan.json"
    if saved.is_file():
        try:
            old = json.loads(saved.read_text())
        except ValueError:
            old = None
        if isinstance(old, dict) and old.get("scale") != plan.scale:
            raise UsageError(f"{out} holds a reproduction at scale {old.get('scale')!r}, not "
                             f"{plan.scale!r}; choose another --out or remove it")


def reproduce(out: str | os.PathLike[str], plan: Plan, progress: Progress | None = None,
              figures: bool = True) -> Reproduction:
    """Run (or resume) every run of ``plan`` under ``out``, analyse them, judge the claims
    and write the report. Finished runs and analyses are reused, never redone."""
    say = progress or _quiet
    root = Path(out)
    _check_out(root, plan)
    root.mkdir(exist_ok=True)
    write_marker(root / "plan.json", plan.to_dict())
    rep = Reproduction(plan, root, started=time.strftime("%Y-%m-%d %H:%M:%S UTC",
                                                         time.gmtime()))
    start = time.perf_counter()
    n_sweep = sum(len(lrs) for e in plan.experiments for _, lrs in e.sweep)
    n_runs = len(plan.experiments) * len(plan.optimizers) * len(plan.seeds)
    total, done = n_sweep + 2 * n_runs, 0

    def rounds(label: str) -> Callable[[int, int], None]:
        return lambda d, t: say("rounds", label, d, t)

    for exp in plan.experiments:
        for opt, lrs in exp.sweep:
            recs = []
            for lr in lrs:
                spec = sweep_spec(plan, exp, opt, lr)
                label = f"sweep {exp.task} {spec.name}"
                say("jobs", label, done, total)
                recs.append(ensure_run(spec, root / "sweep" / exp.task / spec.name,
                                       plan.final_fraction, rounds(label)))
                done += 1
            rep.sweeps += recs
            rep.chosen[(exp.kind, opt)] = choose_lr(recs)
    for exp in plan.experiments:
        for opt in plan.optimizers:
            for seed in plan.seeds:
                spec = traced_spec(plan, exp, opt, rep.chosen[(exp.kind, opt)], seed)
                label = f"{exp.task} {spec.name}"
                say("jobs", f"train {label}", done, total)
                run = ensure_run(spec, root / "runs" / exp.task / spec.name,
                                 plan.final_fraction, rounds(label))
                rep.runs.append(run)
                done += 1
                if run.diverged:
                    done += 1
                    continue
                say("jobs", f"analyse {label}", done, total)
                ds, reused = ensure_analysis(run, plan.analysis, plan.device,
                                             lambda s, d, t: say("analysis", s, d, t))
                rep.analyses_reused += reused
                rep.results[str(run.path)] = ds
                rep.measures.append(measure(ds, exp.kind, opt, seed, run.final_loss))
                done += 1
    say("jobs", "claims and report", done, total)
    rep.verdicts = judge(rep.measures, {e.kind: e.task for e in plan.experiments})
    from ntrace.reproduce.report import write_report

    rep.seconds = time.perf_counter() - start
    rep.files = write_report(rep, figures=figures)
    say("jobs", "done", total, total)
    return rep


def experiment_of(plan: Plan, task: str) -> Experiment:
    return next(e for e in plan.experiments if e.task == task)
