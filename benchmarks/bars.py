"""The quality bars of the issues, judged on a report that ``python -m eval`` wrote.

    python -m benchmarks.bars reports/flow_methods_2k/report.json [--bars embedded-flow] [--table] [--out FILE.md]

Every ratio divides a student's FID by a teacher row of the *same report* (same prompts, same seeds, the teacher at
its FID-minimising guidance of the report's grid), so a bar compares like with like. Untrained students (run folders
exported at step 0 with ``export_initial=true``) are listed beside the trained ones as the baseline, never judged.
Prints one line per (student row, bar) with PASS / MISS and writes the same table as markdown with ``--out``.
The exit code is 0 whether bars pass or not (a miss is a finding, not an error); 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Row = dict[str, Any]


@dataclass(frozen=True)
class Bar:
    """One bar: which student rows it judges, and how (``check`` returns (value, limit, passed, text))."""

    name: str
    applies: Callable[[Row], bool]
    check: Callable[[Row, dict[int, Row]], tuple[float, float, bool, str] | None]


def _fid_ratio(row: Row, teacher: Row | None, limit: float, what: str) -> tuple[float, float, bool, str] | None:
    if teacher is None:
        return None
    r = row["fid"] / teacher["fid"]
    return r, limit, r <= limit, f"FID {row['fid']:.2f} / {what} {teacher['fid']:.2f} = {r:.2f}x (bar <= {limit}x)"


def _accuracy_gap(row: Row, teacher: Row | None, points: float) -> tuple[float, float, bool, str] | None:
    if teacher is None or row.get("accuracy") is None or teacher.get("accuracy") is None:
        return None
    gap = 100 * (teacher["accuracy"] - row["accuracy"])
    side = f"{gap:.1f} points below" if gap >= 0 else f"{-gap:.1f} points above"
    return (gap, points, gap <= points, f"accuracy {100 * row['accuracy']:.1f}% vs teacher 25 steps "
            f"{100 * teacher['accuracy']:.1f}%: {side} (bar: at most {points:g} below)")


def teacher_at_nfe(teachers: dict[int, Row], nfe: float) -> Row | None:
    """The teacher row that costs ``nfe`` network evaluations per image, if the report has one."""
    return next((t for t in teachers.values() if t["nfe"] == nfe), None)


def _same_nfe(row: Row, teachers: dict[int, Row]) -> tuple[float, float, bool, str] | None:
    """Better than the teacher at the same cost: the teacher row whose NFE equals the student's."""
    t = teacher_at_nfe(teachers, row["nfe"])
    if t is None:
        return None
    r = row["fid"] / t["fid"]
    return (r, 1.0, r < 1.0, f"FID {row['fid']:.2f} vs teacher {t['steps']} step(s) at NFE {t['nfe']:g}: "
            f"{t['fid']:.2f} ({r:.2f}x, bar < 1x)")


def one_step_bars(methods: tuple[str, ...]) -> list[Bar]:
    """One-step students: FID <= 1.5x the teacher's 25 steps and <= 0.7x its own 1 step; accuracy within 5 points."""
    def one(r: Row) -> bool:
        return r["method"] in methods and r["steps"] == 1

    return [
        Bar("1-step FID vs teacher 25 steps", one, lambda r, t: _fid_ratio(r, t.get(25), 1.5, "teacher 25 steps")),
        Bar("1-step FID vs teacher 1 step", one, lambda r, t: _fid_ratio(r, t.get(1), 0.7, "teacher 1 step")),
        Bar("1-step accuracy", one, lambda r, t: _accuracy_gap(r, t.get(25), 5.0)),
    ]


def few_step_bars() -> list[Bar]:
    """Issue 18's few-step bars: at 2 and 4 steps FID <= 1.2x the 25-step teacher and below the teacher at the
    same NFE (a k-step student costs k evaluations, the teacher two per step with CFG)."""
    def few(r: Row) -> bool:
        return r["steps"] in (2, 4)

    return [
        Bar("2/4-step FID vs teacher 25 steps", few, lambda r, t: _fid_ratio(r, t.get(25), 1.2, "teacher 25 steps")),
        Bar("2/4-step FID vs teacher at the same NFE", few, _same_nfe),
    ]


def same_nfe_bars() -> list[Bar]:
    """Issue 21: every few-step student (more than one step) below the teacher at the same NFE (the teacher at k / 2
    steps with CFG); judged where the report has that teacher row. Its other half, better than the untrained start
    sampled the same way, compares two students: the README and benchmarks.quality's table show it."""
    return [Bar("few-step FID vs teacher at the same NFE", lambda r: r["steps"] > 1, _same_nfe)]


def tscd_bars() -> list[Bar]:
    """The TSCD issue's bars on the UNet teacher: 8 / 4 / 1 steps <= 1.1 / 1.2 / 2x the 25-step teacher, and
    <= 0.7x the teacher's DDIM at the same step count."""
    limit = {8: 1.1, 4: 1.2, 1: 2.0}

    def tscd(r: Row) -> bool:
        return r["method"] == "tscd" and r["steps"] in limit

    return [
        Bar("TSCD FID vs teacher 25 steps", tscd,
            lambda r, t: _fid_ratio(r, t.get(25), limit[r["steps"]], "teacher 25 steps")),
        Bar("TSCD FID vs teacher, same steps", tscd,
            lambda r, t: _fid_ratio(r, t.get(r["steps"]), 0.7, f"teacher {r['steps']} steps")),
    ]


def _diversity_share(row: Row, teacher: Row | None, share: float) -> tuple[float, float, bool, str] | None:
    if teacher is None or row.get("diversity") is None or teacher.get("diversity") is None:
        return None
    r = row["diversity"] / teacher["diversity"]
    return (r, share, r >= share, f"diversity {row['diversity']:.4f} / teacher {teacher['steps']} steps "
            f"{teacher['diversity']:.4f} = {r:.3f}x (bar >= {share}x)")


def dmd2_few_step_bars() -> list[Bar]:
    """Issue 21's DMD2 bars at 4 steps: FID <= 1.2x the 25-step teacher and diversity >= 0.8x the teacher's at 4
    steps. Its third bar, FID below DMD2's own one-step student, needs a row of another run: the README compares."""
    def four(r: Row) -> bool:
        return r["method"] == "dmd2" and r["steps"] == 4

    return [
        Bar("DMD2 4-step FID vs teacher 25 steps", four,
            lambda r, t: _fid_ratio(r, t.get(25), 1.2, "teacher 25 steps")),
        Bar("DMD2 4-step diversity vs teacher 4 steps", four, lambda r, t: _diversity_share(r, t.get(4), 0.8)),
    ]


def scm_bars() -> list[Bar]:
    """Issue 19's sCM bars on the embedded flow teacher: FID <= 1.5x (one step) and <= 1.2x (two steps) the
    teacher's 25 steps, and diversity >= 0.8x the teacher's at 25 steps at every step count the student exports."""
    limit = {1: 1.5, 2: 1.2}

    def scm(r: Row) -> bool:
        return r["method"] == "scm"

    return [
        Bar("sCM FID vs teacher 25 steps", lambda r: scm(r) and r["steps"] in limit,
            lambda r, t: _fid_ratio(r, t.get(25), limit[r["steps"]], "teacher 25 steps")),
        Bar("sCM diversity vs teacher 25 steps", scm, lambda r, t: _diversity_share(r, t.get(25), 0.8)),
    ]


BARS: dict[str, list[Bar]] = {
    "scm": scm_bars(),
    "embedded-flow": one_step_bars(("dmd2", "sid")) + few_step_bars(),
    "embedded": one_step_bars(("dmd2", "sid")) + tscd_bars() + dmd2_few_step_bars() + same_nfe_bars(),
}


def load(path: Path) -> tuple[dict[int, Row], list[Row], dict[str, int | None]]:
    """(teacher rows by step count, student rows, trained steps by run folder) of a ``python -m eval`` report."""
    from distill_diffusion.errors import UserError

    try:
        rep = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    if "rows" not in rep:
        raise UserError(f"{path} has no student rows (a --teacher-only report?): give a report of "
                        f"`python -m eval --runs ...`")
    teachers = {r["steps"]: r for r in rep["rows"] if r["kind"] == "teacher"}
    students = [r for r in rep["rows"] if r["kind"] == "student"]
    trained = {r["dir"]: r.get("trained_steps") for r in rep.get("meta", {}).get("runs", [])}
    return teachers, students, trained


def judge(teachers: dict[int, Row], students: list[Row], trained: dict[str, int | None], bars: list[Bar]
          ) -> list[dict[str, Any]]:
    """One result per (trained student row, bar that applies); untrained rows (trained steps 0) are skipped."""
    out = []
    for r in students:
        if trained.get(r["run"]) == 0:
            continue
        for b in bars:
            if not b.applies(r):
                continue
            res = b.check(r, teachers)
            if res is not None:
                value, limit, ok, text = res
                out.append({"student": r["label"], "steps": r["steps"], "bar": b.name, "value": value,
                            "limit": limit, "pass": ok, "text": text})
    return out


def students_table(teachers: dict[int, Row], students: list[Row], trained: dict[str, int | None]) -> str:
    """The report's rows with the ratios the bars use: FID ÷ the teacher's 25 steps (its most steps) and ÷ the
    teacher at the same NFE, with accuracy and diversity; untrained runs are marked."""
    top = teachers[max(teachers)] if teachers else None
    lines = ["| model | steps | NFE | FID | ÷ teacher " + (f"{top['steps']} steps" if top else "") +
             " | ÷ teacher, same NFE | accuracy | diversity |", "|---|---|---|---|---|---|---|---|"]

    def pct(x: float | None) -> str:
        return "n/a" if x is None else f"{100 * x:.1f}%"

    rows = [dict(t, label=t.get("label", "teacher")) for t in sorted(teachers.values(), key=lambda t: t["steps"])]
    rows += [dict(r, label=r["label"] + (" (untrained)" if trained.get(r["run"]) == 0 else "")) for r in students]
    for r in rows:
        same = teacher_at_nfe(teachers, r["nfe"])
        top_ratio = f"{r['fid'] / top['fid']:.2f}" if top else "n/a"
        same_ratio = f"{r['fid'] / same['fid']:.2f}" if same else "—"
        div = "n/a" if r.get("diversity") is None else f"{r['diversity']:.3f}"
        lines.append(f"| {r['label']} | {r['steps']} | {r['nfe']:g} | {r['fid']:.2f} | {top_ratio} | {same_ratio} | "
                     f"{pct(r.get('accuracy'))} | {div} |")
    return "\n".join(lines) + "\n"


def markdown(results: list[dict[str, Any]], report: Path, bars_name: str) -> str:
    lines = [f"Bars `{bars_name}` judged on `{report}` (`python -m benchmarks.bars {report} --bars {bars_name}`):",
             "", "| student | steps | bar | result | |", "|---|---|---|---|---|"]
    for x in results:
        lines.append(f"| {x['student']} | {x['steps']} | {x['bar']} | {x['text']} | "
                     f"{'PASS' if x['pass'] else 'MISS'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from distill_diffusion.errors import UserError

    ap = argparse.ArgumentParser(prog="python -m benchmarks.bars", description=__doc__.split("\n\n")[0])
    ap.add_argument("report", type=Path, help="report.json of python -m eval --runs ...")
    ap.add_argument("--bars", default="embedded-flow", choices=sorted(BARS))
    ap.add_argument("--out", type=Path, default=None, help="also write the table as markdown here")
    ap.add_argument("--table", action="store_true", help="first the report's rows with the bars' ratios")
    a = ap.parse_args(argv)
    try:
        teachers, students, trained = load(a.report)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    results = judge(teachers, students, trained, BARS[a.bars])
    text = markdown(results, a.report, a.bars)
    if a.table:
        text = students_table(teachers, students, trained) + "\n" + text
    print(text, end="")
    if a.out:
        a.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
