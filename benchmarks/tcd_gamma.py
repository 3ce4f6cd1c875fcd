"""Re-score a run's students with TCD's stochastic sampler at several γ: a probe of the sampler beside the training.

    python -m benchmarks.tcd_gamma --run runs/tscd_seed0 --gammas 1.0 0.5 0.2 --steps 4 8 [--num-images 2000]
        [--threads 1] [--name NAME]

TCD's strategic stochastic sampling (Zheng et al., "Trajectory Consistency Distillation", 2024, arXiv:2402.19159)
takes each step to s' = (1 − γ) s with the student's (x0, ε) and re-noises from s' to the next timestep s with
fresh noise: γ = 0 is DDIM's deterministic jump (the stage students' export), γ = 1 the consistency model's
re-noising (LCM's sampler without its boundary scalings). For each γ this copies the run's student folders into
``runs/_tcd_gamma/NAME/NAME_g<γ>`` (its report rows are named so) with every sampling file rewritten to
TCDScheduler at the same timesteps with γ as the pipelines' ``eta`` (what ``method.tcd_gamma`` exports; the main
file keeps ``--steps``), then runs ``python -m eval`` on the copy. Reports: ``reports/tcd_gamma_NAME/g<γ>/``; the
table printed at the end has one row per student and step count. The run itself is not changed. VP teachers only
(diffusers' flow schedulers have no γ).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from benchmarks.quality import ROOT, cells
from distill_diffusion.provenance import command_line

REWRITTEN = ("LCMScheduler", "TCDScheduler")


def tcd_sampling(run: Path, steps: list[int], gamma: float) -> dict[str, dict]:
    """Every sampling*.json of ``run`` rewritten to TCDScheduler at its timesteps and ``gamma`` (file name ->
    contents); the main sampling.json keeps the step counts ``steps`` (those it has). ValueError for a run it cannot
    rewrite."""
    out = {}
    for f in sorted(run.glob("sampling*.json")):
        info = json.loads(f.read_text())
        kept = {k: v for k, v in info["steps"].items() if f.name != "sampling.json" or int(k) in steps}
        if not kept:
            raise ValueError(f"{run}/sampling.json has none of the step counts {steps}")
        for s in kept.values():
            if s["scheduler"] not in REWRITTEN:
                raise ValueError(f"{f.name}: {s['scheduler']} is not a VP consistency/TCD sampler")
            s["scheduler"] = "TCDScheduler"
            s["scheduler_kwargs"] = {k: v for k, v in s["scheduler_kwargs"].items() if k == "original_inference_steps"}
            s["eta"] = gamma
        info["steps"] = kept
        if str(info["default_steps"]) not in kept:
            info["default_steps"] = int(next(iter(kept)))
        out[f.name] = info
    return out


def tcd_copy(run: Path, dst: Path, steps: list[int], gamma: float) -> None:
    """``run`` without checkpoints, logs and validation grids in ``dst``, with :func:`tcd_sampling`'s files; nothing
    is written when the run cannot be rewritten."""
    files = tcd_sampling(run, steps, gamma)
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(run, dst, ignore=shutil.ignore_patterns("checkpoints", "logs", "validation"))
    for name, info in files.items():
        (dst / name).write_text(json.dumps(info, indent=1))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(prog="python -m benchmarks.tcd_gamma", description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--gammas", type=float, nargs="+", default=[1.0, 0.5, 0.2])
    ap.add_argument("--steps", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--num-images", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--name", default=None)
    a = ap.parse_args(argv)
    run = Path(a.run)
    name = a.name or run.name
    if not (run / "sampling.json").is_file() or not all(0 <= g <= 1 for g in a.gammas):
        print(f"error: {run} has no sampling.json, or a --gammas value is outside [0, 1]", file=sys.stderr)
        return 2
    table = []
    for g in a.gammas:
        copy = ROOT / "runs" / "_tcd_gamma" / name / f"{name}_g{g}"
        out = ROOT / "reports" / f"tcd_gamma_{name}" / f"g{g}"
        try:
            tcd_copy(run, copy, a.steps, g)
        except (ValueError, KeyError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        ev = ["--runs", str(copy), "--num-images", str(a.num_images), "--threads", str(a.threads),
              "--teacher-steps", "1", "--teacher-guidance", "3", "--out", str(out)]
        if subprocess.run([sys.executable, "-m", "eval", *ev], cwd=ROOT).returncode:
            print(f"error: python -m eval failed at γ = {g}", file=sys.stderr)
            return 1
        rows = json.loads((out / "report.json").read_text())["rows"]
        table += [(r["name"], r["steps"], g, *cells(r)) for r in rows if r.get("kind") != "teacher"]
    print(f"`{command_line('python -m benchmarks.tcd_gamma', argv)}`\n")
    print("| student | steps | γ | FID | accuracy | diversity |\n|---|---|---|---|---|---|")
    for row in sorted(table, key=lambda r: (r[0], r[1], -r[2])):
        print("| " + " | ".join(str(x) for x in row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
