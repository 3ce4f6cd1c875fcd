"""Quality with its spread: one config trained with N training seeds, each scored on the same prompts and seeds.

    python -m benchmarks.quality --method sid [--config FILE] [--seeds 0 1 2] [--name NAME] [--runs-dir runs]
        [--bars embedded|embedded-flow] [--out reports/quality_NAME] [--threads 1] [--train-only] [--eval ARG ...]
        [key=value ...]

Trains ``train.py --method M [--config FILE] seed=k output_dir=RUNS/NAME_seed{k} key=value...`` for each seed (a
finished run, whose sampling.json records ``step == max_steps``, is kept, so the command resumes where it stopped),
exports the untrained student once (``export_initial=true``, ``RUNS/NAME_untrained``), scores all of them in one
``python -m eval --runs ...`` (the teacher's rows come from its cache), and writes ``quality.md`` / ``quality.json``:
per step count the mean ± sample std, min and max over the seeds of FID, accuracy and diversity, beside the teacher's
rows and the untrained row. With ``--bars`` the issues' bars (``benchmarks.bars``) are judged on the means.
``--eval`` passes options to ``python -m eval`` (default: the 2k-image protocol at the teacher's 1/2/4/25 steps).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from distill_diffusion.provenance import command_line

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_EVAL = ["--num-images", "2000", "--teacher-steps", "1", "2", "4", "25", "--guidance-grid", "2", "3", "4"]
METRICS = ("fid", "accuracy", "diversity")
SEED, UNTRAINED = "_seed", "_untrained"  # run folders: RUNS/NAME_seed{k}, RUNS/NAME_untrained


def finished(run: Path) -> bool:
    """A run folder whose export records its last step (config.yaml's max_steps)."""
    from omegaconf import OmegaConf

    try:
        info = json.loads((run / "sampling.json").read_text())
        max_steps = OmegaConf.load(run / "config.yaml").get("max_steps")
    except OSError:
        return False
    return max_steps is not None and info.get("step") == max_steps


def train_commands(a: argparse.Namespace) -> list[tuple[Path, list[str]]]:
    """(run folder, train.py argv) for each seed and the untrained export."""
    base = [sys.executable, "train.py", "--method", a.method] + (["--config", a.config] if a.config else [])
    out = []
    for k in a.seeds:
        run = Path(a.runs_dir) / f"{a.name}{SEED}{k}"
        out.append((run, base + [f"seed={k}", f"output_dir={run}", *a.overrides]))
    run = Path(a.runs_dir) / f"{a.name}{UNTRAINED}"
    out.append((run, base + ["export_initial=true", f"output_dir={run}", *a.overrides]))
    return out


def train_all(cmds: list[tuple[Path, list[str]]], env: dict[str, str]) -> bool:
    """Run each training command whose run is not finished (an untrained export counts once written), an
    interrupted one with ``resume=latest``; False, with one line, at the first failure (finished runs are kept, so a
    second call resumes)."""
    for run, cmd in cmds:
        if finished(run) or (run.name.endswith(UNTRAINED) and (run / "sampling.json").is_file()):
            print(f"[train] kept {run}", flush=True)
            continue
        if (run / "checkpoints").is_dir() and any((run / "checkpoints").iterdir()):
            cmd = [*cmd, "resume=latest"]  # an interrupted run continues from its last checkpoint
        print(f"[train] {shlex.join(cmd[1:])}", flush=True)
        if subprocess.run(cmd, cwd=ROOT, env=env).returncode != 0:
            print(f"error: training {run} failed (command above); finished runs are kept, run again to resume",
                  file=sys.stderr)
            return False
    return True


def score(runs: list[str], out: Path, threads: int, eval_args: list[str], env: dict[str, str]) -> bool:
    """One ``python -m eval --runs ...`` over ``runs`` into ``out`` (report.json); False, with one line, on failure."""
    ev = [sys.executable, "-m", "eval", "--runs", *runs, "--threads", str(threads), "--out", str(out), *eval_args]
    print(f"[eval] {shlex.join(ev[1:])}", flush=True)
    if subprocess.run(ev, cwd=ROOT, env=env).returncode != 0:
        print("error: python -m eval failed (command above)", file=sys.stderr)
        return False
    return True


def _stats(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def setting_name(run: str) -> str:
    """The setting a seed run belongs to: its folder's name without ``_seed<k>`` / ``_untrained`` (``--name``)."""
    return re.sub(rf"({SEED}\d+|{UNTRAINED})$", "", Path(run).name)


def aggregate(report: dict[str, Any], seed_runs: list[str], untrained: str | None) -> list[dict[str, Any]]:
    """Per step count, the spread over the seed runs' student rows (their main student only), with the teacher's
    rows and the untrained row as they are. Each row has ``fid`` / ``accuracy`` / ``diversity`` (the mean for
    seed rows, which ``benchmarks.bars`` judges) and ``spread`` (mean, std, min, max, n per metric). Rows are
    labelled by the setting's ``--name`` (the method's name by default), so that two settings' tables differ."""
    rows = report["rows"]
    same = {str(Path(x)) for x in seed_runs}
    untrained = str(Path(untrained)) if untrained is not None else None
    out = [dict(r, spread=None) for r in rows if r["kind"] == "teacher"]
    by_steps: dict[int, list[dict[str, Any]]] = {}
    for r in rows:
        if r["kind"] == "student" and str(Path(r["run"])) in same and "/" not in r["label"]:
            by_steps.setdefault(r["steps"], []).append(r)
    for steps, rs in sorted(by_steps.items()):
        spread = {m: _stats([x[m] for x in rs]) for m in METRICS if all(x.get(m) is not None for x in rs)}
        first = rs[0]
        out.append({"kind": "student", "label": f"{setting_name(first['run'])} x{len(rs)} seeds", "run": first["run"],
                    "method": first["method"], "steps": steps, "nfe": first["nfe"],
                    **{m: s["mean"] for m, s in spread.items()}, "spread": spread})
    out += [dict(r, label=f"{setting_name(r['run'])} untrained", spread=None) for r in rows
            if r["kind"] == "student" and str(Path(r["run"])) == untrained and "/" not in r["label"]]
    return out


def cells(r: dict[str, Any]) -> tuple[str, str, str]:
    """A report row's FID, accuracy and diversity as table cells ("n/a" where missing)."""
    fid = "n/a" if r.get("fid") is None else f"{r['fid']:.2f}"
    acc = "n/a" if r.get("accuracy") is None else f"{100 * r['accuracy']:.1f}%"
    div = "n/a" if r.get("diversity") is None else f"{r['diversity']:.3f}"
    return fid, acc, div


def markdown(rows: list[dict[str, Any]], command: str) -> str:
    lines = [f"`{command}`", "", "| model | steps | NFE | FID | accuracy | diversity |", "|---|---|---|---|---|---|"]
    for r in rows:
        sp = r.get("spread")
        if sp:
            f = sp["fid"]
            fid = f"{f['mean']:.2f} ± {f['std']:.2f} ({f['min']:.2f}–{f['max']:.2f})"
            acc = f"{100 * sp['accuracy']['mean']:.1f} ± {100 * sp['accuracy']['std']:.1f}%" if "accuracy" in sp \
                else "n/a"
            div = f"{sp['diversity']['mean']:.3f} ± {sp['diversity']['std']:.3f}" if "diversity" in sp else "n/a"
        else:
            fid, acc, div = cells(r)
        lines.append(f"| {r['label']} | {r['steps']} | {r['nfe']:g} | {fid} | {acc} | {div} |")
    return "\n".join(lines) + "\n"


def payload(command: str, rows: list[dict[str, Any]], report: dict[str, Any]) -> dict[str, Any]:
    """quality.json: the command, the aggregated rows and the eval report's list of scored runs (``meta.runs``, with
    their trained steps), so that ``python -m benchmarks.bars quality.json`` judges it as it judges a report."""
    return {"command": command, "rows": rows, "meta": {"runs": report.get("meta", {}).get("runs", [])}}


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", required=True)
    ap.add_argument("--config", default=None)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--name", default=None, help="run-folder prefix (default: the method)")
    ap.add_argument("--runs-dir", default="runs")
    ap.add_argument("--bars", default=None, help="judge these bars (benchmarks.bars) on the means")
    ap.add_argument("--out", default=None)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of every training and eval process")
    ap.add_argument("--train-only", action="store_true",
                    help="train (or keep) the runs and stop; a later call without it scores them")
    ap.add_argument("--eval", nargs=argparse.REMAINDER, default=None, help="options for python -m eval (last)")
    ap.add_argument("overrides", nargs="*", help="key=value for train.py")
    a = ap.parse_args(argv)
    a.name = a.name or a.method
    a.out = a.out or f"reports/quality_{a.name}"
    return a


def main(argv: list[str] | None = None) -> int:
    from benchmarks import bars

    a = parse(argv)
    if len(a.seeds) < 2:
        print("error: --seeds needs at least two seeds for a spread (the issue asks for three)", file=sys.stderr)
        return 2
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads)}
    cmds = train_commands(a)
    if not train_all(cmds, env):
        return 1
    if a.train_only:
        return 0
    out = Path(a.out)
    runs = [str(r) for r, _ in cmds]
    if not score(runs, out / "eval", a.threads, a.eval if a.eval is not None else DEFAULT_EVAL, env):
        return 1
    report = json.loads((ROOT / out / "eval" / "report.json").read_text())
    rows = aggregate(report, runs[:-1], runs[-1])
    command = command_line("python -m benchmarks.quality", argv)
    text = markdown(rows, command)
    if a.bars:
        seeds = [r for r in rows if r.get("spread")]
        teachers = {r["steps"]: r for r in rows if r["kind"] == "teacher"}
        text += "\n" + bars.markdown(bars.judge(teachers, seeds, {}, bars.BARS[a.bars]), out / "quality.json",
                                     a.bars)
    (ROOT / out / "quality.md").write_text(text)
    (ROOT / out / "quality.json").write_text(json.dumps(payload(command, rows, report), indent=1))
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
