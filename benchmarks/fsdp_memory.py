"""Memory of a full-student step on two CPU ranks against one process (issue 20).

    python -m benchmarks.fsdp_memory [--method sid] [--steps 6] [--batch 8] [--threads 1] [--out BENCHMARKS.md]

Trains ``--method`` with ``student=full`` on the embedded teacher for ``--steps`` steps three ways, each in fresh
processes with the same per-process batch (so every process holds the same activations): one process; two ranks
with replicated networks (gradients averaged by the loop's bucketed all-reduce); two ranks with FSDP2
(``configs/accelerate/fsdp_cpu_2proc.yaml``). It reads each run's ``memory.json`` (written by the main process): the
counted bytes it holds (weights, gradients, optimizer states; a sharded run counts its own shards), its resident
set's peak during the training steps (``steps_peak_rss_bytes``: the high-water mark is reset after set-up, which
builds the full copies before sharding them) and its peak above the pre-model baseline over the whole run. The goal:
two ranks' step peak at most 1.1x one process's (no flat copy of the gradients).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import sections

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- fsdp-memory:start -->", "<!-- fsdp-memory:end -->"
WAYS = {  # name -> accelerate config (None: a plain process)
    "1 process": None,
    "2 ranks, replicated": "configs/accelerate/cpu_2proc.yaml",
    "2 ranks, FSDP2": "configs/accelerate/fsdp_cpu_2proc.yaml",
}


def run(method: str, way: str, steps: int, batch: int, threads: int, out: Path) -> dict[str, Any]:
    """One training run; its memory.json, with the wall time."""
    args = ["train.py", "--method", method, "student=full", f"max_steps={steps}", f"batch_size={batch}",
            f"output_dir={out}", "report_to=none", "validation_seeds=0", "checkpointing_steps=100000"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "ACCELERATE_USE_CPU": "true"}
    accel = Path(sys.executable).with_name("accelerate")
    cfg = WAYS[way]
    cmd = [sys.executable, *args] if cfg is None else [str(accel), "launch", "--config_file", cfg, *args]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{way}: training failed\n{r.stderr[-2000:]}")
    mem = json.loads((out / "memory.json").read_text())
    return {**mem, "wall_s": time.perf_counter() - t0}


def section(method: str, steps: int, batch: int, threads: int, rows: dict[str, dict[str, Any]]) -> str:
    mb = 1 << 20
    base = rows["1 process"]["steps_peak_rss_bytes"]
    lines = [START, "## Full student on two CPU ranks: memory per process (issue 20)", "",
             f"Command: `python -m benchmarks.fsdp_memory --method {method} --steps {steps} --batch {batch} "
             f"--threads {threads} --out BENCHMARKS.md` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}). "
             f"`{method}` with `student=full` on the embedded teacher, {steps} steps at batch {batch} per process, "
             f"{threads} torch thread(s) per process; figures of the main process (its memory.json). Counted: the "
             "weights, gradients and optimizer states it holds (a sharded run: its own shards). Step peak: the "
             "resident set's high-water mark during the training steps (process memory, activations and libraries "
             "included). Run peak: the peak above the baseline taken before the models load, set-up included.",
             "", "| run | counted MB | trainable MB (all roles) | optimizer MB | step peak RSS MB | "
             "step peak vs 1 process | run peak above baseline MB |", "|---|---|---|---|---|---|---|"]
    for way, m in rows.items():
        peak = m["steps_peak_rss_bytes"]
        lines.append(f"| {way} | {m['total_counted_bytes'] / mb:.1f} | {sum(m['trainable_bytes'].values()) / mb:.1f}"
                     f" | {sum(m['optimizer_state_bytes'].values()) / mb:.1f} | {peak / mb:.0f} | "
                     f"{peak / base:.2f}x | {m['peak_rss_above_baseline_bytes'] / mb:.0f} |")
    lines += ["", END]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", default="sid")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        rows = {way: run(a.method, way, a.steps, a.batch, a.threads, Path(tmp) / f"run{i}")
                for i, way in enumerate(WAYS)}
    text = section(a.method, a.steps, a.batch, a.threads, rows)
    print(text)
    if a.out:
        sections.write(a.out, START, END, text, "fsdp_memory", rows)


if __name__ == "__main__":
    main()
