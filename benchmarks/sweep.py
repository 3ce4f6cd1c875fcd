"""A grid of training settings, each point trained and scored on the same prompts and seeds, in one table.

    python -m benchmarks.sweep --method dmd2 [--config FILE] --grid method.student_update_every=2,5,10 \
        learning_rate=1e-5,3e-4 [--name NAME] [--runs-dir runs/sweeps] [--num-images 500] [--threads 1]
        [--eval ARG ...] [key=value ...]

Each point of the grid's cartesian product trains ``train.py --method M [--config FILE] key=value... <point>`` into
``RUNS/NAME/<point>`` (a finished run is kept, so the command resumes), then one ``python -m eval --runs ...``
scores every point (default: ``--num-images`` images at the teacher's 1 / 2 / 4 / 25 steps, guidance 2.5 and 3)
and ``sweep.md`` / ``sweep.json`` list each point's FID, accuracy and diversity per step count beside the teacher's
rows: diversity next to FID, because a collapsing few-step student can improve FID while every seed of a prompt
gives the same image.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from pathlib import Path
from typing import Any

from benchmarks.quality import ROOT, cells, score, train_all
from distill_diffusion.provenance import command_line

DEFAULT_EVAL = ["--teacher-steps", "1", "2", "4", "25", "--guidance-grid", "2.5", "3"]


def parse_grid(items: list[str]) -> list[tuple[str, list[str]]]:
    """``key=v1,v2`` items -> [(key, [v1, v2])]; a value list is split on commas outside brackets."""
    out = []
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key or not values:
            raise ValueError(f"--grid {item!r}: write key=value1,value2")
        parts, depth, cur = [], 0, ""
        for ch in values:
            if ch in "[(":
                depth += 1
            elif ch in "])":
                depth -= 1
            if ch == "," and depth == 0:
                parts.append(cur)
                cur = ""
            else:
                cur += ch
        out.append((key, parts + [cur]))
    return out


def points(grid: list[tuple[str, list[str]]]) -> list[dict[str, str]]:
    """The cartesian product of the grid, in order (the last key varies fastest)."""
    keys = [k for k, _ in grid]
    return [dict(zip(keys, combo)) for combo in itertools.product(*[v for _, v in grid])]


def point_name(point: dict[str, str]) -> str:
    """A folder name for a point: ``student_update_every=5,learning_rate=1e-5`` (the last dotted part of each key)."""
    name = ",".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in point.items())
    return "".join(c if c.isalnum() or c in "=,.-_" else "_" for c in name)


def table(report: dict[str, Any], runs: dict[str, dict[str, str]]) -> list[dict[str, Any]]:
    """The teacher's rows, then per point and step count its main student's FID, accuracy and diversity."""
    rows = [dict(r, point=None) for r in report["rows"] if r["kind"] == "teacher"]
    for run, point in runs.items():
        mine = [r for r in report["rows"] if r["kind"] == "student" and str(Path(r["run"])) == str(Path(run))
                and "/" not in r["label"]]
        rows += [dict(r, point=point) for r in sorted(mine, key=lambda r: r["steps"])]
    return rows


def markdown(rows: list[dict[str, Any]], command: str) -> str:
    lines = [f"`{command}`", "", "| point | steps | NFE | FID | accuracy | diversity |", "|---|---|---|---|---|---|"]
    for r in rows:
        label = r["label"] if r["point"] is None else ", ".join(f"{k}={v}" for k, v in r["point"].items())
        fid, acc, div = cells(r)
        lines.append(f"| {label} | {r['steps']} | {r['nfe']:g} | {fid} | {acc} | {div} |")
    return "\n".join(lines) + "\n"


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.sweep", description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", required=True)
    ap.add_argument("--config", default=None)
    ap.add_argument("--grid", nargs="+", required=True, help="key=value1,value2 ... (train.py keys)")
    ap.add_argument("--name", default=None, help="sweep folder name (default: the method)")
    ap.add_argument("--runs-dir", default="runs/sweeps")
    ap.add_argument("--num-images", type=int, default=500)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="report folder (default reports/sweep_NAME)")
    ap.add_argument("--eval", nargs=argparse.REMAINDER, default=None, help="options for python -m eval (last)")
    ap.add_argument("overrides", nargs="*", help="fixed key=value for every point")
    a = ap.parse_args(argv)
    a.name = a.name or a.method
    a.out = a.out or f"reports/sweep_{a.name}"
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    try:
        grid = parse_grid(a.grid)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    base = [sys.executable, "train.py", "--method", a.method] + (["--config", a.config] if a.config else [])
    runs: dict[str, dict[str, str]] = {}
    cmds = []
    for p in points(grid):
        run = Path(a.runs_dir) / a.name / point_name(p)
        runs[str(run)] = p
        cmds.append((run, base + [*a.overrides, *(f"{k}={v}" for k, v in p.items()), f"output_dir={run}"]))
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads)}
    ev = ["--num-images", str(a.num_images), *(a.eval if a.eval is not None else DEFAULT_EVAL)]
    if not train_all(cmds, env) or not score(list(runs), Path(a.out) / "eval", a.threads, ev, env):
        return 1
    report = json.loads((ROOT / a.out / "eval" / "report.json").read_text())
    command = command_line("python -m benchmarks.sweep", argv)
    rows = table(report, runs)
    text = markdown(rows, command)
    (ROOT / a.out / "sweep.md").write_text(text)
    (ROOT / a.out / "sweep.json").write_text(json.dumps({"command": command, "rows": rows}, indent=1))
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
