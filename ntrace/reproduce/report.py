"""The report of a reproduction: Markdown and a self-contained HTML page (figures embedded
as base64 PNG), both rendered from one list of blocks so that they say the same thing.

Order: how it was run, the verdict rules (before any number), the claims table, then the
sweep, the runs, the exponents, the figures and every setting.
"""

from __future__ import annotations

import base64
import html
import json
import math
import platform
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ntrace import __version__
from ntrace.reproduce.claims import RULES, STATEMENTS, VERDICTS, sqrt_consistent
from ntrace.reproduce.measures import EXPLORATION_MEASURES
from ntrace.reproduce.reproduction import Reproduction
from ntrace.reproduce.runs import SWEEP_SNAPSHOTS, RunRecord


@dataclass(frozen=True)
class Block:
    """One piece of the report: ``h2``/``h3`` heading, ``p`` paragraph, ``ul`` list,
    ``table`` (header + rows), ``code`` or ``img`` (path, caption)."""

    kind: str
    content: Any


def _g(x: float, spec: str = ".4g") -> str:
    return "–" if x is None or not math.isfinite(x) else format(x, spec)


def _figures(rep: Reproduction, out: Path) -> list[tuple[Path, str]]:
    """Write the figures (PNG and SVG) and return (png, caption) pairs."""
    from ntrace.plot import exploration_figure, optimizers_figure, regret_figure, save_figure
    from ntrace.plot.reproduce import exponents_figure, training_curves_figure

    grid: dict[str, dict[str, list[Any]]] = {}
    for run in rep.runs:
        ds = rep.results.get(str(run.path))
        if ds is not None:
            grid.setdefault(run.spec.task, {}).setdefault(run.spec.optimizer, []).append(ds)
    figs: list[tuple[Path, str]] = []

    def save(fig: Any, name: str, caption: str) -> None:
        figs.append((save_figure(fig, out, name)[0], caption))

    for task, by_opt in grid.items():
        dss = [v[0] for v in by_opt.values()]
        labels = list(by_opt)
        save(regret_figure(dss, labels), f"fig3_regret_{task}", f"Fig. 3 analogue, {task} "
             "(first seed): neuron and layer regret / √N, loss at the iterate, cumulative "
             "loss and N × Taylor optimum.")
        if len(dss) > 1:
            save(optimizers_figure(dss, labels), f"fig4_optimizers_{task}",
                 f"Fig. 4 analogue, {task} (first seed): optimizers compared.")
        if any("min_distance" in ds for ds in dss):
            save(exploration_figure(dss, labels), f"fig5_exploration_{task}",
                 f"Fig. 5 analogue, {task} (first seed): (a) distance to the nearest earlier "
                 "activation configuration, (b) switch fraction per probe point, (c) "
                 "log-volume per unit.")
    if grid:
        save(training_curves_figure(grid), "fig6_training_curves", "Fig. 6 analogue: "
             "minibatch training loss (moving average), mean ± 1 s.d. over seeds.")
        save(exponents_figure(grid), "regret_exponents", "Regret exponents per optimizer "
             "and layer ('n': mean neuron regret of the layer) with 95% intervals (first "
             "seed; dots: further seeds); grey band [0.3, 0.7], dotted 0.5.")
    return figs


def blocks(rep: Reproduction, figures: list[tuple[Path, str]]) -> list[Block]:
    """The report's content."""
    plan = rep.plan
    b: list[Block] = []
    import torch

    counts = Counter(v.verdict for v in rep.verdicts)
    b.append(Block("p", f"Generated {rep.started} by ntrace {__version__} (torch "
                        f"{torch.__version__}, Python {platform.python_version()}, "
                        f"{platform.machine()}) on device `{plan.device}`; scale "
                        f"`{plan.scale}`; wall time of this invocation up to the report "
                        f"{rep.seconds / 60:.1f} min ({rep.skipped} of "
                        f"{len(rep.sweeps) + len(rep.runs)} runs and {rep.analyses_reused} "
                        "analyses reused from an earlier invocation). Verdicts: "
                        + ", ".join(f"{counts.get(v, 0)} {v}" for v in VERDICTS) + "."))
    b.append(Block("p", "Paper: D. Balduzzi, B. McWilliams, T. Butler-Yeoman, *Neural Taylor "
                        "Approximations: Convergence and Exploration in Rectifier Networks*, "
                        "ICML 2017. Claims are paraphrased, with the section they come from."))
    b.append(Block("h2", "Rerun"))
    b.append(Block("code", plan.command(str(rep.out))))
    b.append(Block("p", "Every setting is listed under *Settings* below and saved in "
                        "`plan.json`; rerunning into the same directory reuses finished runs."))
    b.append(Block("h2", "Verdict rules"))
    b.append(Block("p", "Each rule was fixed before the measurements; the verdict is computed "
                        "by it, not chosen."))
    b.append(Block("ul", [f"**{STATEMENTS[c][0]}** ({STATEMENTS[c][1]}): "
                          + RULES[c].replace("{final}", f"{plan.final_fraction * 100:g}")
                          for c in RULES]))
    b.append(Block("h2", "Claims"))
    b.append(Block("table", (["#", "claim (paper)", "on", "verdict", "numbers"],
                             [[str(i + 1), f"{v.statement} ({v.section})", v.scope,
                               f"**{v.verdict}**", v.numbers]
                              for i, v in enumerate(rep.verdicts)])))
    b.append(Block("h2", "Learning-rate sweep"))
    b.append(Block("p", "Per task and optimizer each learning rate was trained for the sweep "
                        "length with seed "
                        f"{plan.sweep_seed}; the one with the lowest final training loss (mean "
                        f"minibatch loss over the last {plan.final_fraction:.0%} of rounds) "
                        "was chosen, as the paper tuned each optimizer for performance."))
    rows = []
    for r in rep.sweeps:
        kind = rep.kind_of(r)
        ex = r.exploration or {}
        rows.append([r.spec.task, r.spec.optimizer, f"{r.spec.lr:g}", str(r.spec.steps),
                     "diverged" if r.diverged else _g(r.final_loss),
                     "✓" if rep.chosen.get((kind, r.spec.optimizer)) == r.spec.lr else "",
                     *(_g(ex[m]) if m in ex else "—" for m in EXPLORATION_MEASURES)])
    b.append(Block("table", (["task", "optimizer", "lr", "rounds", "final loss", "chosen",
                              "min distance", "switch", "log-volume"], rows)))
    robust = sweep_orderings(rep.sweeps)
    if robust:
        b.append(Block("p", "The exploration claims are judged at the chosen learning rates. "
                            "Across the sweep (short runs, the same probe, "
                            f"{SWEEP_SNAPSHOTS} snapshots; compare within a task only) the "
                            "claimed orderings hold in these fractions of learning-rate "
                            "pairs: " + "; ".join(robust) + "."))
    edges = [f"{e.task} {opt} ({lr:g})" for e in plan.experiments for opt, lrs in e.sweep
             if (lr := rep.chosen.get((e.kind, opt))) is not None and len(lrs) > 1
             and lr in (min(lrs), max(lrs))]
    if edges:
        b.append(Block("p", "Chosen at the edge of its grid (a wider sweep might choose "
                            "differently): " + ", ".join(edges) + "."))
    b.append(Block("h2", "Traced runs"))
    meas = {(m.kind, m.optimizer, m.seed): m for m in rep.measures}
    rows = []
    for r in rep.runs:
        m = meas.get((rep.kind_of(r), r.spec.optimizer, r.spec.seed))
        ex = m.exploration if m else {}
        rows.append([r.spec.task, r.spec.optimizer, f"{r.spec.lr:g}", str(r.spec.seed),
                     str(r.rounds), "diverged" if r.diverged else _g(r.final_loss),
                     *(_g(ex.get(k, math.nan)) for k in EXPLORATION_MEASURES),
                     f"{r.seconds:.0f}", "reused" if r.skipped else "trained"])
    b.append(Block("table", (["task", "optimizer", "lr", "seed", "rounds", "final loss",
                              "min distance", "switch", "log-volume", "train s", "this call"],
                             rows)))
    stalled = _stalled(rep)
    if stalled:
        b.append(Block("p", "**Caveat:** these runs barely trained (final training loss above "
                            f"{STALLED:.0%} of the mean loss of their first 10% of rounds), so "
                            "loss and exploration comparisons involving them say little about "
                            "the paper's setting: " + "; ".join(stalled) + "."))
    b.append(Block("h2", "Regret exponents"))
    b.append(Block("p", "Least-squares slope of log regret on log N over the checkpoints with "
                        f"N ≥ {plan.analysis.fit_from:g} × the last, with a "
                        f"{plan.analysis.confidence:.0%} Student-t interval. Checkpoint "
                        "regrets are cumulative and so correlated: the interval describes the "
                        "fit and is narrower than one over independent runs. `neurons`: the "
                        "mean regret of the layer's tracked neurons."))
    rows = []
    for m in rep.measures:
        task = plan.experiment(m.kind).task
        for e in m.exponents:
            ok = sqrt_consistent(e)
            rows.append([task, m.optimizer, str(m.seed), e.unit, e.scale, _g(e.slope, ".3f"),
                         f"[{_g(e.low, '.3f')}, {_g(e.high, '.3f')}]",
                         "–" if ok is None else ("yes" if ok else "no")])
    b.append(Block("table", (["task", "optimizer", "seed", "layer", "scale", "exponent",
                              "95% interval", "like √N"], rows)))
    if figures:
        b.append(Block("h2", "Figures"))
        for path, caption in figures:
            b.append(Block("img", (path, caption)))
    b.append(Block("h2", "Data"))
    b.append(Block("ul", [f"{e.kind}: `{e.task}`: {e.data}" for e in plan.experiments]))
    b.append(Block("h2", "Analysis notes"))
    notes = []
    for r in rep.runs:
        ds = rep.results.get(str(r.path))
        if ds is not None and r.spec.seed == plan.seeds[0]:
            a = ds.attrs["ntrace"]
            for line in [*a["skipped"], *a["notes"]]:
                item = f"{r.spec.task}: {line}"
                if item not in notes:
                    notes.append(item)
            comparison = f"{r.spec.task}: {a['comparison']}"
            if comparison not in notes:
                notes.append(comparison)
    b.append(Block("ul", notes or ["none"]))
    b.append(Block("h2", "Settings"))
    b.append(Block("code", json.dumps(plan.to_dict(), indent=1)))
    return b


STALLED = 0.95  # final / initial training loss above which a run counts as barely trained


def sweep_orderings(sweeps: list[RunRecord]) -> list[str]:
    """Per task, in how many pairs of (non-diverged, probed) sweep runs each exploration
    ordering claimed by the paper holds: RMSProp > SGD, Adam > SGD, Adam < RMSProp."""
    by: dict[tuple[str, str], list[dict[str, float]]] = {}
    for r in sweeps:
        if r.exploration and not r.diverged:
            by.setdefault((r.spec.task, r.spec.optimizer), []).append(r.exploration)
    out = []
    for task in dict.fromkeys(t for t, _ in by):
        parts = []
        for hi, lo in (("rmsprop", "sgd"), ("adam", "sgd"), ("rmsprop", "adam")):
            a, b = by.get((task, hi), []), by.get((task, lo), [])
            if not a or not b:
                continue
            counts = [sum(x[m] > y[m] for x in a for y in b) for m in EXPLORATION_MEASURES]
            parts.append(f"{hi} > {lo} " + "/".join(str(c) for c in counts)
                         + f" of {len(a) * len(b)}")
        if parts:
            out.append(f"{task}: " + ", ".join(parts) + " (min distance/switch/log-volume)")
    return out


def _stalled(rep: Reproduction) -> list[str]:
    out = []
    for r in rep.runs:
        ds = rep.results.get(str(r.path))
        if ds is None or r.diverged:
            continue
        loss = ds.minibatch_loss.values
        first = float(loss[:max(1, round(0.1 * loss.size))].mean())
        if first > 0 and r.final_loss > STALLED * first:
            out.append(f"{r.spec.task} {r.spec.optimizer} seed {r.spec.seed} "
                       f"({_g(first)} → {_g(r.final_loss)})")
    return out


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def to_markdown(title: str, content: list[Block], out: Path) -> str:
    lines = [f"# {title}", ""]
    for blk in content:
        if blk.kind in ("h2", "h3"):
            lines += [f"{'#' * int(blk.kind[1])} {blk.content}", ""]
        elif blk.kind == "p":
            lines += [blk.content, ""]
        elif blk.kind == "ul":
            lines += [f"- {item}" for item in blk.content] + [""]
        elif blk.kind == "code":
            lines += ["```", blk.content, "```", ""]
        elif blk.kind == "table":
            head, rows = blk.content
            lines.append("| " + " | ".join(head) + " |")
            lines.append("|" + "|".join(" --- " for _ in head) + "|")
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
            lines.append("")
        elif blk.kind == "img":
            path, caption = blk.content
            lines += [f"![{caption}]({path.relative_to(out).as_posix()})", "", f"*{caption}*",
                      ""]
    return "\n".join(lines)


def _inline(text: str) -> str:
    """Escape, then the two Markdown marks the report uses: **bold**, `code`, *italic*."""
    import re

    t = html.escape(text)
    t = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", t)
    t = re.sub(r"`(.+?)`", r"<code>\1</code>", t)
    return re.sub(r"\*(.+?)\*", r"<i>\1</i>", t)


STYLE = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto;line-height:1.4}"
         "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;"
         "padding:3px 6px;vertical-align:top}pre{background:#f4f4f4;padding:8px;"
         "overflow-x:auto}img{max-width:100%}figure{margin:1em 0}"
         ".supported{background:#e3f6e3}.not-supported{background:#fbe1e1}"
         ".inconclusive{background:#fdf5d8}")


def to_html(title: str, content: list[Block]) -> str:
    """A self-contained page: styles inline, figures as base64 PNG."""
    out = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
           f"</title><style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"]
    for blk in content:
        if blk.kind in ("h2", "h3"):
            out.append(f"<{blk.kind}>{html.escape(blk.content)}</{blk.kind}>")
        elif blk.kind == "p":
            out.append(f"<p>{_inline(blk.content)}</p>")
        elif blk.kind == "ul":
            out.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in blk.content)
                       + "</ul>")
        elif blk.kind == "code":
            out.append(f"<pre>{html.escape(blk.content)}</pre>")
        elif blk.kind == "table":
            head, rows = blk.content
            cells = ["<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"]
            for row in rows:
                verdict = next((c.strip("*") for c in row if c.strip("*") in VERDICTS), "")
                cls = f" class='{verdict.replace(' ', '-')}'" if verdict else ""
                cells.append(f"<tr{cls}>" + "".join(f"<td>{_inline(c)}</td>" for c in row)
                             + "</tr>")
            out.append("<table>" + "".join(cells) + "</table>")
        elif blk.kind == "img":
            path, caption = blk.content
            data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
            out.append(f"<figure><img alt='{html.escape(caption, quote=True)}' "
                       f"src='data:image/png;base64,{data}'><figcaption>{_inline(caption)}"
                       "</figcaption></figure>")
    out.append("</body></html>")
    return "\n".join(out)


def write_report(rep: Reproduction, figures: bool = True) -> list[Path]:
    """Write ``figures/``, ``report.md`` and ``report.html`` into the reproduction's
    directory; returns the files written (reports first)."""
    out = rep.out
    figs = _figures(rep, out / "figures") if figures else []
    title = (f"Neural Taylor Approximations (Balduzzi et al., ICML 2017): reproduction, "
             f"scale {rep.plan.scale}")
    content = blocks(rep, figs)
    md, page = out / "report.md", out / "report.html"
    md.write_text(to_markdown(title, content, out), encoding="utf-8")
    page.write_text(to_html(title, content), encoding="utf-8")
    return [md, page] + [p for p, _ in figs]
