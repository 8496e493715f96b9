"""Reproducing the experiments of Balduzzi et al. (ICML 2017), Sec. 2.4 and 3.3, with a
report that judges each of the paper's claims on the measurements.

    from ntrace.reproduce import make_plan, reproduce
    rep = reproduce("repro/", make_plan("small", data_dir="data/", seeds=1))
    print(rep.files)  # report.md, report.html, figures
"""

from __future__ import annotations

from ntrace.reproduce.claims import RULES, VERDICTS, Verdict, judge
from ntrace.reproduce.pipeline import choose_lr, reproduce
from ntrace.reproduce.plan import SCALES, Analysis, Experiment, Plan, find_data, make_plan
from ntrace.reproduce.reproduction import Reproduction

__all__ = ["RULES", "SCALES", "VERDICTS", "Analysis", "Experiment", "Plan", "Reproduction",
           "Verdict", "choose_lr", "find_data", "judge", "make_plan", "reproduce"]
