"""A whole tiny reproduction: report, verdicts, figures, and reruns that skip finished work."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from ntrace.errors import UsageError
from ntrace.reproduce import VERDICTS, choose_lr, find_data, make_plan, reproduce
from ntrace.reproduce.runs import RUN_MARKER, RunRecord, final_loss, sweep_spec


@pytest.fixture(scope="module")
def first(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("repro") / "out"
    events: list[tuple[str, str, int, int | None]] = []
    rep = reproduce(out, make_plan("tiny"),
                    lambda p: events.append((p.stage, p.label, p.done, p.total)))
    return rep, events


def _mtimes(root: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in root.rglob("*")
            if p.name in (RUN_MARKER, "analysis.json") or p.parent.name == "trace.zarr"}


def test_report_has_every_claim_with_verdict_and_numbers(first) -> None:
    rep, events = first
    md = (rep.out / "report.md").read_text()
    page = (rep.out / "report.html").read_text()
    table = md.split("## Claims")[1].split("\n## ")[0]
    rows = [r for r in table.splitlines() if re.match(r"\| \d+ \|", r)]
    assert len(rows) == len(rep.verdicts) == 2 * 2 * 3 + 2 * 2 + 2
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split(" | ")]
        assert cells[3].strip("*") in VERDICTS
        assert re.search(r"\d", cells[4]), row  # numbers, not just words
    # the rules come before the numbers, and the settings are there to rerun it
    assert md.index("## Verdict rules") < md.index("## Claims")
    assert "ntrace reproduce --out" in md and "--scale tiny" in md
    settings = json.loads(md.split("## Settings")[1].split("```")[1])
    assert settings == json.loads((rep.out / "plan.json").read_text())
    assert settings["seeds"] == [0] and settings["experiments"][0]["task"] == "digits-autoencoder"
    # every traced run's final loss is the mean of its last 10% of minibatch losses
    for r in rep.runs:
        ds = rep.results[str(r.path)]
        expected = ds.minibatch_loss.values[-max(1, round(0.1 * r.rounds)):].mean()
        assert math.isclose(r.final_loss, expected, rel_tol=1e-9)
    assert events[-1][:2] == ("jobs", "done") and any(e[0] == "rounds" for e in events)
    assert any(e[0] == "analysis" for e in events)
    # the chosen rate is the sweep's best
    for (kind, opt), lr in rep.chosen.items():
        task = rep.plan.experiment(kind).task
        sweep = [s for s in rep.sweeps if s.spec.task == task and s.spec.optimizer == opt]
        assert lr == min(sweep, key=lambda s: s.final_loss).spec.lr
        assert f"| {task} | {opt} | {lr:g} |" in md
    assert page.count("<tr class='") >= len(rep.verdicts)


def test_figures_exist_and_are_embedded(first) -> None:
    rep, _ = first
    pngs = [p for p in rep.files if p.suffix == ".png"]
    names = {p.name for p in pngs}
    for task in ("digits-autoencoder", "digits-convnet"):
        assert {f"fig3_regret_{task}.png", f"fig4_optimizers_{task}.png",
                f"fig5_exploration_{task}.png"} <= names
    assert {"fig6_training_curves.png", "regret_exponents.png"} <= names
    for p in pngs:
        assert p.stat().st_size > 5000 and p.with_suffix(".svg").is_file()
        assert f"](figures/{p.name})" in (rep.out / "report.md").read_text()
    page = (rep.out / "report.html").read_text()
    assert page.count("src='data:image/png;base64,") == len(pngs)
    assert "<img src='figures" not in page  # self-contained


def test_rerun_skips_finished_runs_and_restarts_interrupted_ones(first) -> None:
    rep, _ = first
    before = _mtimes(rep.out)
    again = reproduce(rep.out, rep.plan, figures=False)
    assert again.skipped == len(rep.sweeps) + len(rep.runs)
    assert again.analyses_reused == len(rep.runs)
    assert _mtimes(rep.out) == before  # nothing re-recorded, no marker rewritten
    assert [v.verdict for v in again.verdicts] == [v.verdict for v in rep.verdicts]
    # a run killed before its marker was written is trained again, and only that one
    victim = rep.runs[0]
    (victim.path / RUN_MARKER).unlink()
    third = reproduce(rep.out, rep.plan, figures=False)
    retrained = [r for r in third.runs if not r.skipped]
    assert [r.path for r in retrained] == [victim.path]
    assert third.analyses_reused == len(rep.runs) - 1
    assert (victim.trace / "zarr.json").stat().st_mtime_ns > before[
        str(victim.trace / "zarr.json")]


def test_cli_reuses_the_runs_and_prints_the_claims(first) -> None:
    from ntrace.cli import main

    rep, _ = first
    res = CliRunner().invoke(main, ["reproduce", "--scale", "tiny", "--out", str(rep.out),
                                        "--no-figures"])
    assert res.exit_code == 0, res.output
    assert "claims" in res.output and "regret" in res.output.lower()
    assert f"{len(rep.sweeps) + len(rep.runs)} runs reused" in res.output
    res = CliRunner().invoke(main, ["reproduce", "--scale", "small", "--out", str(rep.out)])
    assert res.exit_code == 2 and "scale 'tiny'" in res.output


def test_find_data_accepts_the_folder_or_its_subfolders(tmp_path: Path) -> None:
    (tmp_path / "mnist").mkdir()
    (tmp_path / "mnist" / "t10k-images-idx3-ubyte.gz").write_bytes(b"")
    (tmp_path / "cifar10").mkdir()
    (tmp_path / "cifar10" / "subset.npz").write_bytes(b"")
    assert find_data(str(tmp_path)) == (str(tmp_path / "mnist"), str(tmp_path / "cifar10"))
    assert find_data(str(tmp_path / "mnist")) == (str(tmp_path / "mnist"), None)
    assert find_data(None) == (None, None)
    plan = make_plan("small", str(tmp_path / "mnist"))
    assert [e.task for e in plan.experiments] == ["mnist-autoencoder", "mnist-convnet"]
    assert [e.task for e in make_plan("small").experiments] == ["digits-autoencoder",
                                                                "digits-convnet"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="neither MNIST"):
        find_data(str(tmp_path / "empty"))
    paper = make_plan("paper", str(tmp_path), seeds=3)
    assert [e.task for e in paper.experiments] == ["mnist-autoencoder", "cifar10-convnet"]
    assert paper.seeds == (0, 1, 2) and all(len(e.learning_rates("adam")) == 5
                                            for e in paper.experiments)
    with pytest.raises(UsageError, match="full data sets"):
        make_plan("paper", str(tmp_path / "mnist"))


def test_choose_lr_and_final_loss() -> None:
    plan = make_plan("tiny")
    exp = plan.experiments[0]

    def rec(lr: float, loss: float) -> RunRecord:
        return RunRecord(sweep_spec(plan, exp, "sgd", lr), Path("."), loss, 1, 0.0, False,
                         not math.isfinite(loss))

    assert choose_lr([rec(0.1, math.inf), rec(0.01, 0.5), rec(0.001, 0.7)]) == 0.01
    with pytest.raises(UsageError, match="diverged"):
        choose_lr([rec(0.1, math.inf)])
    assert final_loss([4.0, 3.0, 2.0, 1.0] * 5, 0.1) == 1.5  # the last 2 of 20
    assert final_loss([4.0, 2.0], 0.1) == 2.0  # at least one round


def test_sweep_runs_carry_exploration_measures(first) -> None:
    """Sweep runs are probed; their measures, read straight from the trace, equal the
    analyzer's for the same trace (checked on the traced runs, which have both), and the
    report shows them with the ordering fractions."""
    from ntrace.format.reader import open_trace
    from ntrace.reproduce.measures import exploration, trace_exploration

    rep, _ = first
    assert all(set(r.exploration or {}) == {"min_distance", "switch", "log_volume"}
               for r in rep.sweeps if not r.diverged)
    for r in rep.runs:
        want = exploration(rep.results[str(r.path)])
        with open_trace(r.trace) as tr:
            got = trace_exploration(tr)
        assert got.keys() == want.keys() and all(
            math.isclose(got[k], want[k], rel_tol=1e-12) or (math.isnan(got[k])
                                                               and math.isnan(want[k]))
            for k in got)
    md = (rep.out / "report.md").read_text()
    sweep = md.split("## Learning-rate sweep")[1].split("\n## ")[0]
    assert "| min distance | switch | log-volume |" in sweep
    assert "digits-autoencoder: rmsprop > sgd" in sweep and " of 1" in sweep


def test_sweep_orderings_count_pairs() -> None:
    from ntrace.reproduce.report import sweep_orderings

    plan = make_plan("tiny")
    exp = plan.experiments[0]

    def rec(opt: str, lr: float, md: float, sw: float, lv: float) -> RunRecord:
        return RunRecord(sweep_spec(plan, exp, opt, lr), Path("."), 1.0, 1, 0.0, False,
                         False, {"min_distance": md, "switch": sw, "log_volume": lv})

    recs = [rec("sgd", 0.1, 0.1, 0.1, -5.0), rec("sgd", 0.3, 0.3, 0.05, -1.0),
            rec("rmsprop", 1e-3, 0.2, 0.2, -2.0), rec("rmsprop", 3e-3, 0.4, 0.01, -9.0)]
    # rmsprop > sgd: min distance in (0.2>0.1), (0.4>0.1), (0.4>0.3) = 3 of 4; switch
    # (0.2>0.1), (0.2>0.05) = 2; log-volume (-2>-5) = 1
    assert sweep_orderings(recs) == [
        "digits-autoencoder: rmsprop > sgd 3/2/1 of 4 (min distance/switch/log-volume)"]
