"""What a reproduction produced (:func:`ntrace.reproduce.reproduce` fills it, the report reads
it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ntrace.reproduce.claims import Verdict
from ntrace.reproduce.measures import RunMeasures
from ntrace.reproduce.plan import Plan
from ntrace.reproduce.runs import RunRecord


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
