"""Benchmark every registered method on the embedded default: training step speed and memory, sampling speed.

    python -m benchmarks [--methods lcm dmd2 sid tscd] [--students lora full] [--steps 30] [--warmup 5]
        [--runs runs] [--sampling-batch 16] [--quality reports/NAME/report.json] [--reference ref.json]
        [--out BENCHMARKS.md]

Training: each (method, student) runs the real loop in a fresh process (``benchmarks.train_step``) for ``--steps``
steps with the method's embedded-default config; step time is the median after ``--warmup`` steps, split by phase;
memory is what the run's memory.json counted (parameters, gradients, optimizer states, frozen weights) and its peak
RSS above the baseline before the models loaded.
Sampling: in this process, one after another, the teacher (DDIM, CFG) at 25 and 50 steps and every student in
``--runs`` at its step counts, at ``--sampling-batch`` images per call, median latency per image after a warm-up
batch, with UNet, VAE-decode and text-encoder time apart; and a student's call through ``sample`` against a plain
diffusers pipeline call with the same timesteps (the overhead of our sampling path).
Quality: rows copied from a report that ``python -m eval`` wrote (``--quality``), with its command.
Reference: our LCM-LoRA step against diffusers' LCM-LoRA example script on the same teacher and work
(``--reference-lcm SCRIPT`` measures it with ``benchmarks.reference_lcm``; ``--reference`` reads the JSON that
``python -m benchmarks.reference_lcm --json`` wrote).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from distill_diffusion.provenance import command_line

ROOT = Path(__file__).resolve().parent.parent
MB = 1024 * 1024


def train_rows(methods: list[str], students: list[str], steps: int, warmup: int, threads: int) -> list[dict]:
    rows = []
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    for m in methods:
        for s in students:
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "r.json"
                cmd = [sys.executable, "-m", "benchmarks.train_step", "--method", m, "--student", s, "--steps",
                       str(steps), "--warmup", str(warmup), "--json", str(out)]
                print(f"[train] {m} student={s}: {steps} steps", flush=True)
                r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
                if r.returncode != 0:
                    rows.append({"method": m, "student": s, "error": r.stderr.strip().splitlines()[-1:]})
                    continue
                rows.append(json.loads(out.read_text()))
    return rows


def sampling_overhead(pipe: Any, prompts: list[str], seeds: list[int], steps: int, repeats: int = 5
                      ) -> tuple[float, float]:
    """Median seconds of our ``sample`` and of the bare pipeline call with the same timesteps, prompts and seeds,
    alternated, after one warm-up pair: (ours, plain)."""
    import torch

    from distill_diffusion import artifacts

    s = artifacts.configure(pipe, steps)
    res = pipe.unet.config.sample_size * pipe.vae_scale_factor
    ours, plain = [], []
    for i in range(repeats + 1):
        _, sec = artifacts.sample(pipe, prompts, steps, seeds, output_type="np")
        gens = [torch.Generator("cpu").manual_seed(x) for x in seeds]
        t0 = time.perf_counter()
        with torch.no_grad():
            pipe(prompt=prompts, timesteps=list(s.timesteps), guidance_scale=s.guidance_scale, generator=gens,
                 height=res, width=res, output_type="np")
        if i:  # the first pair is the warm-up
            ours.append(sec)
            plain.append(time.perf_counter() - t0)
    return statistics.median(ours), statistics.median(plain)


def sampling_rows(runs_dir: Path, batch: int, n_batches: int, teacher_guidance: float) -> dict[str, Any]:

    from distill_diffusion import artifacts
    from eval.generate import EvalSet, Generator, Row

    prompts = ["a photo of a sneaker", "a trouser", "a product photo of a bag", "a photo of a dress"]
    n = batch * n_batches
    es = EvalSet([prompts[i % 4] for i in range(n)], list(range(n)), [None] * n, "benchmark prompts")
    teacher = artifacts.load_teacher("embedded")
    out: list[dict[str, Any]] = []

    def measure(row: Row, student: Any = None) -> dict[str, Any]:
        g = Generator(row, teacher, student)
        for _ in g.stream(es, batch):
            pass
        sp = g.speed(batch)
        return {"model": row.label, "steps": row.steps, **sp.to_json()}

    for k in (25, 50):
        out.append(measure(Row("teacher", "teacher", k, teacher_guidance)))
    runs = sorted(p.parent for p in runs_dir.glob("*/sampling.json")) if runs_dir.is_dir() else []
    overhead = None
    for run in runs:
        try:
            pipe = artifacts.load_student(run)
        except Exception as e:  # a half-written run in the folder: say so, go on
            out.append({"model": run.name, "error": str(e)})
            continue
        for k in sorted(s for s in pipe.distill.steps if s <= 4):
            out.append(measure(Row(run.name, "student", k, run=str(run)), pipe) | {"model": run.name})
        if overhead is None:  # our sample() against the bare pipeline call, same timesteps and seeds
            k = pipe.distill.default_steps
            ours_s, plain_s = sampling_overhead(pipe, es.prompts[:batch], es.seeds[:batch], k, repeats=5)
            overhead = {"run": run.name, "steps": k, "batch": batch, "ours_s": ours_s, "plain_s": plain_s}
    t25 = out[0]["latency_ms"]
    for r in out:
        if "latency_ms" in r:
            r["speedup_realised"] = t25 / r["latency_ms"]
            r["speedup_ideal"] = out[0]["nfe"] / r["nfe"]
            r["quotient"] = r["speedup_realised"] / r["speedup_ideal"]
    return {"rows": out, "overhead": overhead, "batch": batch, "images": n}


def _fmt(x: float | None, f: str = ".3f") -> str:
    return "—" if x is None else format(x, f)


def markdown(meta: dict, train: list[dict], samp: dict | None, quality: list[dict] | None, ref: dict | None) -> str:
    L = ["# Benchmarks", "", f"- Command: `{meta['command']}`", f"- Machine: {meta['machine']}",
         f"- Versions: {meta['versions']}", f"- Date: {meta['date']}", ""]
    if train:
        L += train_step_section(meta, train) + train_memory_section(train)
    if ref:
        from benchmarks.reference_lcm import markdown_section

        L += [""] + markdown_section(ref)
    if samp:
        L += sampling_section(meta, samp)
    if quality:
        L += quality_section(quality)
    return "\n".join(L) + "\n"


def train_step_section(meta: dict, train: list[dict]) -> list[str]:
    L = ["## Training step (embedded default, each method's default config)", "",
         f"Median seconds per step over steps {meta['warmup'] + 1}..{meta['steps']} in a fresh process, "
         f"{meta['threads']} torch thread(s); phases are means per step.", "",
         "| method | student | batch | s/step | steps/s | teacher fwd | student fwd | critic fwd | target fwd | "
         "encoders | optimizer | backward + rest |", "|" + "---|" * 12]
    for r in train:
        if "error" in r:
            L.append(f"| {r['method']} | {r['student']} | error: {r['error']} |" + " |" * 9)
            continue
        p = r["phase_sec_per_step"]
        L.append(f"| {r['method']} | {r['student']} | {r['batch_size']} | {r['sec_per_step_median']:.3f} | "
                 f"{r['steps_per_s']:.2f} | " + " | ".join(f"{p[k]:.3f}" for k in (
                     "teacher forward", "student forward", "critic forward", "target forward", "encoders",
                     "optimizer", "backward and the rest")) + " |")
    return L


def train_memory_section(train: list[dict]) -> list[str]:
    L = ["", "## Training memory (counted from the models; peak RSS measured)", "",
         "| method | student | trainable MB | gradients MB (peak) | optimizer MB | frozen MB | counted total MB | "
         "LoRA / full (counted) | peak RSS above baseline MB |", "|" + "---|" * 9]
    full = {r["method"]: r["memory"]["total_counted_bytes"] for r in train
            if "memory" in r and r["student"] == "full"}
    for r in train:
        if "memory" not in r:
            continue
        m = r["memory"]
        ratio = (f"{m['total_counted_bytes'] / full[r['method']]:.2f}"
                 if r["student"] == "lora" and r["method"] in full else "")
        L.append(f"| {r['method']} | {r['student']} | {sum(m['trainable_bytes'].values()) / MB:.1f} | "
                 f"{m['gradient_bytes_peak'] / MB:.1f} | {sum(m['optimizer_state_bytes'].values()) / MB:.1f} | "
                 f"{m['frozen_bytes'] / MB:.1f} | {m['total_counted_bytes'] / MB:.1f} | {ratio} | "
                 f"{m['peak_rss_above_baseline_bytes'] / MB:.0f} |")
    return L


def sampling_section(meta: dict, samp: dict) -> list[str]:
    L = ["", f"## Sampling ({samp['images']} images per row, batch {samp['batch']}, median latency per image "
             "after a warm-up batch)", "",
         "| model | steps | NFE | ms/img | UNet ms | VAE decode ms | text enc ms | other ms | speed-up realised "
         "| ideal (NFE ratio) | realised / ideal |", "|" + "---|" * 11]
    if "measured" in samp and samp["measured"]["command"] != meta["command"]:
        L[-2:-2] = [f"Measured by `{samp['measured']['command']}` ({samp['measured']['date']}).", ""]
    for r in samp["rows"]:
        if "error" in r:
            L.append(f"| {r['model']} | error: {r['error']} |" + " |" * 9)
            continue
        c = r["ms_per_image"]
        L.append(f"| {r['model']} | {r['steps']} | {r['nfe']:g} | {r['latency_ms']:.2f} | {c['unet']:.2f} | "
                 f"{c['vae_decode']:.2f} | {c['text_encoder']:.2f} | {c['other']:.2f} | "
                 f"{r['speedup_realised']:.1f}× | {r['speedup_ideal']:.1f}× | {r['quotient']:.2f} |")
    o = samp.get("overhead")
    if o:
        L += ["", f"Our sampling path against a plain diffusers call ({o['run']}, {o['steps']} steps, batch "
                  f"{o['batch']}, median of 5): {o['ours_s'] * 1000:.1f} ms against {o['plain_s'] * 1000:.1f} "
                  f"ms ({o['ours_s'] / o['plain_s']:.2f}×)."]
    return L


def quality_section(quality: list[dict]) -> list[str]:
    L = ["", "## Quality after the default runs", "", "From " + " and ".join(
        f"`{q['meta']['command']}`" for q in quality) + " (2k images; teacher rows cached):", "",
         "| model | steps | FID | CLIP | accuracy | diversity |", "|---|---|---|---|---|---|"]
    seen, rows = set(), []
    for r in [r for q in quality for r in q["rows"]]:
        if (r["label"], r["steps"]) in seen:  # the teacher's rows appear in every report; the first one wins
            continue
        seen.add((r["label"], r["steps"]))
        rows.append(r)
    rows.sort(key=lambda r: (not r["label"].startswith("teacher"), r["steps"] if r["label"].startswith("teacher")
                             else 0))  # the teacher's rows first, by steps; students in report order
    if len(quality) > 1:
        L[-3:-3] = ["A run's rows come from the first report that has it, so a newer report listed first replaces "
                    "an older one's rows of the same run.", ""]
    for r in rows:
        acc = r.get("accuracy")
        L.append(f"| {r['label']} | {r['steps']} | {_fmt(r.get('fid'), '.2f')} | {_fmt(r.get('clip'), '.2f')} | "
                 f"{'—' if acc is None else f'{100 * acc:.1f}%'} | {_fmt(r.get('diversity'))} |")
    return L


def load_quality(paths: list[str] | None, kept: Path) -> list[dict] | None:
    """Quality reports: each path a report.json of ``python -m eval`` or a BENCHMARKS.json (its quality reports).

    Rows are shown first come, first kept (by label and steps), so a newer report listed before a BENCHMARKS.json
    replaces that file's rows of the same runs. With no paths, the reports already in ``kept`` stay.
    """
    if not paths:
        return json.loads(kept.read_text()).get("quality") if kept.is_file() else None
    out: list[dict] = []
    for p in paths:
        d = json.loads(Path(p).read_text())
        if "rows" in d:  # an eval report
            out.append({"meta": {"command": d["meta"]["command"]}, "rows": d["rows"]})
        else:  # a BENCHMARKS.json
            out += d.get("quality") or []
    unique = {q["meta"]["command"]: q for q in reversed(out)}  # a report listed twice counts once, where first
    return [q for q in out if unique[q["meta"]["command"]] is q]


def lean_section(a: argparse.Namespace) -> dict | None:
    """The lean-step table (benchmarks.lean): measured with --lean, else the one already in the JSON."""
    from benchmarks import lean

    if a.lean:
        return lean.run(lean.parser().parse_args([]), ["(via python -m benchmarks --lean)"])
    old = Path(a.out).with_suffix(".json")
    return json.loads(old.read_text()).get("lean") if old.is_file() else None


def lean_markdown(section: dict) -> str:
    from benchmarks import lean

    return "\n" + lean.markdown(section)


def keep_sections(old: str, new: str) -> str:
    """``new`` plus every ``<!-- name:start -->`` .. ``<!-- name:end -->`` section of ``old`` that ``new`` lacks:
    the sections other benchmark commands splice into the same file (the data path, FSDP memory) survive a
    regeneration of this command's tables."""
    for m in re.finditer(r"<!-- ([\w-]+):start -->.*?<!-- \1:end -->", old, re.S):
        if f"<!-- {m.group(1)}:start -->" not in new:
            new = new.rstrip("\n") + "\n\n" + m.group(0) + "\n"
    return new


def main(argv: list[str] | None = None) -> int:
    from methods import METHODS

    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", nargs="+", default=sorted(METHODS))
    ap.add_argument("--students", nargs="+", default=["lora", "full"], choices=["lora", "full"])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2, help="torch threads of each training process")
    ap.add_argument("--runs", default="runs", help="folder of trained runs for the sampling table")
    ap.add_argument("--sampling-batch", type=int, default=16)
    ap.add_argument("--sampling-batches", type=int, default=4)
    ap.add_argument("--teacher-guidance", type=float, default=2.5)
    ap.add_argument("--no-train", action="store_true")
    ap.add_argument("--no-sampling", action="store_true")
    ap.add_argument("--quality", nargs="+", default=None, help="report.json files of python -m eval on the runs")
    ap.add_argument("--reference", default=None, help="JSON of python -m benchmarks.reference_lcm (--json), or a "
                    "BENCHMARKS.json holding one")
    ap.add_argument("--reference-lcm", default=None, metavar="SCRIPT",
                    help="diffusers' train_lcm_distill_lora_sd_wds.py (outside the repository): time it against ours")
    ap.add_argument("--lean", action="store_true", help="measure the lean-step section (benchmarks.lean, its "
                    "defaults); without it, the section already in --out's JSON is kept")
    ap.add_argument("--out", default="BENCHMARKS.md")
    a = ap.parse_args(argv)
    unknown = [m for m in a.methods if m not in METHODS]
    if unknown:
        print(f"error: unknown method(s) {unknown}; registered: {sorted(METHODS)}", file=sys.stderr)
        return 2
    import diffusers
    import torch

    meta = {"command": command_line("python -m benchmarks", argv),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
            "versions": f"python {platform.python_version()}, torch {torch.__version__}, diffusers "
                        f"{diffusers.__version__}", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "steps": a.steps, "warmup": a.warmup, "threads": a.threads}
    # --no-train / --no-sampling keep the table measured earlier (in --out's JSON), as other commands' sections are
    out, out_json = Path(a.out), Path(a.out).with_suffix(".json")
    old = json.loads(out_json.read_text()) if out_json.is_file() else {}
    train = (old.get("train") or []) if a.no_train else train_rows(a.methods, a.students, a.steps, a.warmup,
                                                                    a.threads)
    if a.no_train and old.get("meta"):  # the kept table's own settings head it
        meta.update({k: old["meta"][k] for k in ("steps", "warmup", "threads") if k in old["meta"]})
    samp = old.get("sampling")
    if samp and "measured" not in samp and old.get("meta"):  # say where a kept table came from
        samp["measured"] = {k: old["meta"][k] for k in ("command", "date")}
    if not a.no_sampling:
        torch.set_num_threads(a.threads)
        samp = sampling_rows(Path(a.runs), a.sampling_batch, a.sampling_batches, a.teacher_guidance)
        samp["measured"] = {k: meta[k] for k in ("command", "date")}
    quality = load_quality(a.quality, Path(a.out).with_suffix(".json"))
    ref = json.loads(Path(a.reference).read_text()) if a.reference else None
    if ref and "summary" not in ref:  # a BENCHMARKS.json: its reference section
        ref = ref.get("reference")
    if a.reference_lcm:
        from benchmarks.reference_lcm import measure

        ref = measure(Path(a.reference_lcm), Path(tempfile.gettempdir()) / "reference_lcm", repeats=3, short=10,
                      long=40, autocast=["off", "on"], threads=a.threads)
    elif ref is None:  # keep the section measured earlier
        ref = old.get("reference")
    lean = lean_section(a)
    text = markdown(meta, train, samp, quality, ref) + (lean_markdown(lean) if lean else "")
    out.write_text(keep_sections(out.read_text() if out.is_file() else "", text))
    old.update({"meta": meta, "train": train, "sampling": samp, "quality": quality, "reference": ref, "lean": lean})
    out_json.write_text(json.dumps(old, indent=1))  # other commands' keys stay
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
