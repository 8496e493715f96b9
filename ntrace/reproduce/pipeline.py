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
from dataclasses import replace
from pathlib import Path

from ntrace.errors import UsageError
from ntrace.progress import OnProgress, Progress, quiet
from ntrace.reproduce.claims import judge
from ntrace.reproduce.measures import measure
from ntrace.reproduce.plan import Experiment, Plan
from ntrace.reproduce.report import write_report
from ntrace.reproduce.reproduction import Reproduction
from ntrace.reproduce.runs import (
    RunRecord,
    ensure_analysis,
    ensure_run,
    sweep_spec,
    traced_spec,
    write_marker,
)


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


def reproduce(out: str | os.PathLike[str], plan: Plan, progress: OnProgress | None = None,
              figures: bool = True) -> Reproduction:
    """Run (or resume) every run of ``plan`` under ``out``, analyse them, judge the claims
    and write the report. Finished runs and analyses are reused, never redone. ``progress``
    hears stages ``jobs`` (runs and analyses of the whole plan), ``rounds`` (training rounds of
    the current run) and ``analysis`` (its stages), ``label`` naming the job or stage."""
    say = progress or quiet
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

    def rounds(label: str) -> OnProgress:
        return lambda p: say(replace(p, label=label))

    for exp in plan.experiments:
        for opt, lrs in exp.sweep:
            recs = []
            for lr in lrs:
                spec = sweep_spec(plan, exp, opt, lr)
                label = f"sweep {exp.task} {spec.name}"
                say(Progress("jobs", done, total, label))
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
                say(Progress("jobs", done, total, f"train {label}"))
                run = ensure_run(spec, root / "runs" / exp.task / spec.name,
                                 plan.final_fraction, rounds(label))
                rep.runs.append(run)
                done += 1
                if run.diverged:
                    done += 1
                    continue
                say(Progress("jobs", done, total, f"analyse {label}"))
                ds, reused = ensure_analysis(run, plan.analysis, plan.device,
                                             lambda p: say(Progress("analysis", p.done, p.total,
                                                                   p.stage)))
                rep.analyses_reused += reused
                rep.results[str(run.path)] = ds
                rep.measures.append(measure(ds, exp.kind, opt, seed, run.final_loss))
                done += 1
    say(Progress("jobs", done, total, "claims and report"))
    rep.verdicts = judge(rep.measures, {e.kind: e.task for e in plan.experiments})
    rep.seconds = time.perf_counter() - start
    rep.files = write_report(rep, figures=figures)
    say(Progress("jobs", total, total, "done"))
    return rep


def experiment_of(plan: Plan, task: str) -> Experiment:
    return next(e for e in plan.experiments if e.task == task)
