"""Issue 10, "make the step lean": a before/after figure for every item, measured on the embedded teacher.

    python -m benchmarks.lean [--before-tree DIR] [--repeats 3] [--steps 15] [--warmup 5] [--threads 1]
        [--methods lcm dmd2 sid tscd] [--no-flags] [--no-micro] [--out BENCHMARKS.md]

Micro-benchmarks (in this process, one torch thread, the two ways interleaved ``--repeats`` times, median per call):
  CFG: the teacher's conditional and unconditional passes as two forwards of B against one forward of 2B;
  prompts: the batch's prompts through the text encoder every step against the per-prompt cache;
  no_grad: a detached target's forward (the student adapter at LCM's batch) with autograd on against no_grad;
  VAE: encoding the batch's images one at a time against one batched call;
  role switch: the pre-change ``Models.role`` (peft set_adapter / enable_adapters, requires_grad saved and restored
  over every LoRA tensor; reproduced below as ``_old_role``) against the current one;
  validation: loading the teacher from disk twice (student + teacher rows) against building it from the weights the
  run already holds;
  sampling: our ``sample()`` against a plain diffusers pipeline call with the same timesteps and seeds.
End to end (``--before-tree``: a git worktree of the commit before the change, run with this interpreter): seconds
per step of ``benchmarks.train_step`` for each method's LoRA default, before and after, interleaved per repeat.
Flags: ``channels_last=true`` and ``compile=true`` against neither, on LCM-LoRA, interleaved per repeat.
``--merge``: each method's LoRA default with ``lora_merge=off`` (peft's wrappers everywhere), ``no_grad`` and ``auto``
(merged weights with gradient too, on a CPU), interleaved per repeat (issue 23); with ``--bf16``, also
``mixed_precision=bf16`` with ``lora_merge=off`` (a bf16 base through peft) and ``auto`` (a float32 base, merged).
``--keep``: rows of the earlier lean section (BENCHMARKS.json) that this run did not measure stay, with the command
and date that measured them.

Writes its section into ``--out`` (between the lean markers, replacing an earlier one) and ``"lean"`` into the
JSON next to it; ``python -m benchmarks --lean`` re-renders that section from the JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from distill_diffusion.provenance import command_line, git_state

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- lean:start -->", "<!-- lean:end -->"
PROMPTS = ["a photo of a sneaker", "a trouser", "a product photo of a bag", "a photo of a dress"]


def ab(before: Callable[[], Any], after: Callable[[], Any], repeats: int, inner: int = 1) -> tuple[float, float]:
    """Median seconds per call of ``before`` and ``after``, timed alternately (one warm-up call each first)."""
    before(), after()
    tb, ta = [], []
    for _ in range(repeats):
        for fn, acc in ((before, tb), (after, ta)):
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            acc.append((time.perf_counter() - t0) / inner)
    return statistics.median(tb), statistics.median(ta)


def row(item: str, how: str, before: float, after: float, unit: str = "ms", status: str = "") -> dict[str, Any]:
    scale = 1000.0 if unit == "ms" else 1.0
    return {"item": item, "how": how, "before": before * scale, "after": after * scale, "unit": unit,
            "ratio": before / after if after else None, "status": status}


@contextlib.contextmanager
def _old_role(m: Any, name: str) -> Iterator[Any]:
    """``Models.role`` as it was before this change (commit cadd282), kept here to measure it."""
    saved = [(p, p.requires_grad) for n, p in m.denoiser.named_parameters() if "lora_" in n]
    prev_active, prev_disabled = m._base_active, m._tuners[0].disable_adapters
    adapter = m.targets[name].source if name in m.targets and m.targets[name].decay is None else name
    try:
        if name == "teacher":
            for layer in m._tuners:
                layer.enable_adapters(False)
        else:
            for layer in m._tuners:
                layer.enable_adapters(True)
                layer.set_adapter(adapter)
            m._base_active = adapter
        yield m.denoiser
    finally:
        for layer in m._tuners:
            layer.enable_adapters(True)
            layer.set_adapter(prev_active)
            if prev_disabled:
                layer.enable_adapters(False)
        m._base_active = prev_active
        for p, flag in saved:
            p.requires_grad_(flag)
    m._activate(m._base_active, m._base_disabled)  # the new code's bookkeeping, unchanged by the old switch


def micro_rows(repeats: int) -> list[dict[str, Any]]:
    import torch

    from distill_diffusion.data import build_source
    from distill_diffusion.method import TargetSpec
    from distill_diffusion.models import Models

    rows: list[dict[str, Any]] = []
    m = Models("embedded", "lora", roles=("student", "critic"), targets={"target": TargetSpec("student", None)},
               lora_rank=16, lora_alpha=16)
    B = 32  # LCM's and TSCD's default batch
    g = torch.Generator().manual_seed(0)
    xt = torch.randn(B, *m.latent_shape, generator=g)
    t = torch.randint(20, 980, (B,), generator=g)
    prompts = [PROMPTS[i % 4] for i in range(B)]
    cond, uncond = m.encode_prompts(prompts), m.encode_uncond(B)
    both = cond.cat(uncond)

    with torch.no_grad():
        def two() -> None:
            m.net_out("teacher", xt, t, cond)
            m.net_out("teacher", xt, t, uncond)

        def one() -> None:
            m.net_out("teacher", torch.cat([xt, xt]), torch.cat([t, t]), both)

        b, a = ab(two, one, repeats)
    rows.append(row("CFG: cond + uncond teacher passes in one forward", f"teacher UNet, batch {B}: two forwards "
                    f"of {B} vs one of {2 * B}", b, a, status="already in"))

    xt2, t2 = torch.cat([xt, xt]), torch.cat([t, t])
    with torch.no_grad():
        def wrapped() -> None:  # the teacher as it ran before issue 23: peft's layers with adapters disabled
            m._activate(m._base_active, True)
            try:
                m.family.forward(m.denoiser, xt2, t2, both)
            finally:
                m._activate(m._base_active, False)

        def tied() -> None:
            m.net_out("teacher", xt2, t2, both)

        b, a = ab(wrapped, tied, repeats)
    rows.append(row("teacher forward through a weight-tied plain network (issue 23)", f"batch {2 * B} (CFG): the "
                    "LoRA-wrapped base with adapters disabled vs a plain UNet on the same tensors", b, a))

    def per_step() -> None:
        m.pipe.encode_prompt(prompts, m.device, 1, True, negative_prompt=None)

    def cached() -> None:
        m.encode_prompts(prompts), m.encode_uncond(B)

    b, a = ab(per_step, cached, repeats, inner=5)
    rows.append(row("prompt embeddings once per batch, cached", f"{B} prompts + empty prompt: text encoder every "
                    "step vs the per-prompt cache", b, a, status="already in"))

    def with_grad() -> None:
        with m.trainable("student"):
            m.net_out("target", xt, t, cond)

    def without() -> None:
        with m.trainable("student"), torch.no_grad():
            m.net_out("target", xt, t, cond)

    b, a = ab(with_grad, without, repeats)
    rows.append(row("detached targets under torch.no_grad", f"LCM's target forward (student adapter, batch {B}, its "
                    "LoRA trainable): autograd on vs no_grad", b, a, status="already in"))

    imgs = _images(build_source(_data_cfg(), m.resolution, True, True), B)

    def each() -> None:
        for i in range(B):
            m.encode_images(imgs[i:i + 1])

    def batched() -> None:
        m.encode_images(imgs)

    b, a = ab(each, batched, repeats)
    rows.append(row("VAE encoding of real images batched", f"{B} Fashion-MNIST images: one encode each vs one "
                    "batched call", b, a, status="already in (not cached: see below)"))

    def old() -> None:
        with _old_role(m, "critic"):
            pass
        with _old_role(m, "teacher"):
            pass

    def new() -> None:
        with m.role("critic"):
            pass
        with m.role("teacher"):
            pass

    b, a = ab(old, new, repeats, inner=10)
    rows.append(row("Models.role: no requires_grad snapshot, no peft set_adapter", "two role switches (critic, "
                    "teacher), enter + exit: before vs after this change", b, a, status="changed"))

    rows.append(_merged_weight_row(m, repeats))
    return rows + _validation_rows(m, repeats)


def _merged_weight_row(m: Any, repeats: int) -> dict[str, Any]:
    """W + s·B·A of every LoRA layer of the student adapter: peft's ``W + get_delta_weight`` (what
    ``lora_merge._merged_weight`` did before issue 23's in-place build) against the current build."""
    import torch

    from distill_diffusion.lora_merge import _merged_weight

    pairs = list(m._merged.layers.items())  # (plain layer, its peft LoRA layer)
    with torch.no_grad():
        def peft() -> None:
            for layer, lora in pairs:
                layer._parameters["weight"] + lora.get_delta_weight("student")

        def in_place() -> None:
            for layer, lora in pairs:
                _merged_weight(layer, lora, "student")

        b, a = ab(peft, in_place, repeats, inner=3)
    return row("merged LoRA weight: one matmul, scaled and summed in place (issue 23)", f"W + s·B·A of the "
               f"{len(pairs)} LoRA layers (built 3 times per LCM step: student forward, its backward, target): peft's "
               "W + get_delta_weight vs the in-place build", b, a, status="changed")


def _validation_rows(m: Any, repeats: int) -> list[dict[str, Any]]:
    """The validation grid's pipelines from disk vs from memory, and the sampling path's overhead (needs run folders:
    untrained LCM and DMD2 exports in a temporary folder)."""
    from distill_diffusion import artifacts

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        from distill_diffusion.config import parse_config
        from distill_diffusion.loop import train
        from methods import METHODS

        cfg, _ = parse_config(["--method", "lcm", "export_initial=true", f"output_dir={out}", "report_to=none",
                               "validation_seeds=1"], METHODS)
        train(cfg, METHODS["lcm"])

        def from_disk() -> None:
            artifacts.load_student(out)
            artifacts.load_teacher("embedded")

        def from_memory() -> None:
            artifacts.load_student(out, base=m.teacher_pipeline())
            artifacts.load_teacher("embedded", base=m.teacher_pipeline())

        b, a = ab(from_disk, from_memory, repeats)
        rows.append(row("validation does not reload the teacher from disk", "the validation grid's two pipelines "
                        "(LoRA student, DDIM teacher): from disk vs from the weights in memory", b, a,
                        status="changed"))
        rows.append(_sampling_overhead(Path(tmp) / "dmd2", repeats))
    return rows


def _data_cfg() -> Any:
    from distill_diffusion.config import DataConfig

    return DataConfig()


def _images(src: Any, n: int) -> Any:
    import torch

    from distill_diffusion.data import Stream

    s = Stream(src, 0, n, 0, 1, 1, 0.0, load_images=True)
    imgs = s.get(0, 0).images
    return imgs if isinstance(imgs, torch.Tensor) else torch.stack(list(imgs))


def _sampling_overhead(out: Path, repeats: int) -> dict[str, Any]:
    """Our ``sample()`` against a plain pipeline call: DMD2's one-step student as exported untrained (the same UNet
    cost as a trained one), batch 16, same timesteps and seeds; median of 5 after a warm-up pair (BENCHMARKS.md's
    figure was measured the same way on runs/dmd2)."""
    from benchmarks.__main__ import sampling_overhead
    from distill_diffusion import artifacts
    from distill_diffusion.config import parse_config
    from distill_diffusion.loop import train
    from methods import METHODS

    cfg, _ = parse_config(["--method", "dmd2", "export_initial=true", f"output_dir={out}", "report_to=none",
                           "validation_seeds=1"], METHODS)
    train(cfg, METHODS["dmd2"])
    pipe = artifacts.load_student(out)
    k = pipe.distill.default_steps
    batch = 16
    ours, plain = sampling_overhead(pipe, [PROMPTS[i % 4] for i in range(batch)], list(range(batch)), k,
                                    repeats=max(5, repeats))
    r = row("student sampling path vs a plain pipeline call", f"dmd2 1-step student, batch {batch}: plain "
            "diffusers call (before) vs our sample() (after)", plain, ours, status="already in")
    return r


def train_step(tree: Path, method: str, steps: int, warmup: int, threads: int, overrides: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        cmd = [sys.executable, "-m", "benchmarks.train_step", "--method", method, "--student", "lora", "--steps",
               str(steps), "--warmup", str(warmup), "--json", str(out), *overrides]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(tree)}
        r = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            return {"error": (r.stderr.strip().splitlines() or ["?"])[-1]}
        res = json.loads(out.read_text())
        res["stderr_warnings"] = [ln for ln in r.stderr.splitlines() if ln.startswith("warning:")]
        return res


def _commit(tree: Path) -> str:
    """The short commit a tree is checked out at (with "+changes" when it has uncommitted ones), or "?"."""
    sha, dirty = git_state(tree)
    return "?" if sha is None else sha[:7] + ("+changes" if dirty else "")


def end_to_end_rows(before_tree: Path, methods: list[str], repeats: int, steps: int, warmup: int,
                    threads: int) -> tuple[list[dict], dict]:
    runs: dict[str, dict[str, list[float]]] = {m: {"before": [], "after": []} for m in methods}
    raw: dict[str, Any] = {}
    for rep in range(repeats):
        for m in methods:
            for which, tree in (("before", before_tree), ("after", ROOT)):
                print(f"[lean] {m} {which} repeat {rep + 1}/{repeats}", flush=True)
                res = train_step(tree, m, steps, warmup, threads, [])
                raw.setdefault(f"{m}/{which}", []).append(res)
                if "error" not in res:
                    runs[m][which].append(res["sec_per_step_median"])
    rows = []
    commits = " vs ".join(_commit(t) for t in (before_tree, ROOT))
    for m in methods:
        b, a = runs[m]["before"], runs[m]["after"]
        if b and a:
            rows.append(row(f"whole step, {m} LoRA (default config)", f"benchmarks.train_step s/step, median of "
                            f"{len(b)} interleaved runs, before tree vs this tree ({commits})", statistics.median(b),
                            statistics.median(a), unit="s", status="changed"))
    return rows, raw


FLAG_VARIANTS = {"default": [], "channels_last": ["channels_last=true"], "compile": ["compile=true"],
                 "retain off": ["retain_freed_memory=false"]}
FLAG_PAIRS = [  # (before, after, item, status)
    ("default", "channels_last", "flag channels_last=true", "flag, default off"),
    ("default", "compile", "flag compile=true", "flag, default off"),
    ("retain off", "default", "retain_freed_memory (the allocator keeps freed pages)", "default"),
]


def timed_runs(jobs: list[tuple[str, str, list[str], str]], repeats: int, steps: int, warmup: int, threads: int,
               skip: Callable[[int, str], bool] = lambda rep, key: False) -> dict[str, list[dict]]:
    """``benchmarks.train_step`` results per job key, the jobs interleaved within each repeat. ``jobs``: (key, method,
    overrides, progress label); ``skip(rep, key)``: leave that run out. Each result also holds its process's wall."""
    raw: dict[str, list[dict]] = {}
    for rep in range(repeats):
        for key, method, overrides, label in jobs:
            if skip(rep, key):
                continue
            print(f"[lean] {label} repeat {rep + 1}/{repeats}", flush=True)
            t0 = time.perf_counter()
            res = train_step(ROOT, method, steps, warmup, threads, overrides)
            res["process_wall_s"] = time.perf_counter() - t0
            raw.setdefault(key, []).append(res)
    return raw


def _step_times(results: list[dict]) -> list[float]:
    return [r["sec_per_step_median"] for r in results if "error" not in r]


def flag_rows(repeats: int, steps: int, warmup: int, threads: int, compile_repeats: int,
              method: str = "lcm") -> tuple[list[dict], dict]:
    jobs = [(k, method, ov, f"flags {method} {k}") for k, ov in FLAG_VARIANTS.items()]
    raw = timed_runs(jobs, repeats, steps, warmup, threads,
                     skip=lambda rep, k: k == "compile" and rep >= compile_repeats)
    times = {k: _step_times(raw.get(k, [])) for k in FLAG_VARIANTS}
    rows = []
    for before, after, item, status in FLAG_PAIRS:
        if times[before] and times[after]:
            warn = next((w for r in raw[after] for w in r.get("stderr_warnings", [])), "")
            wall = {v: statistics.median(r["process_wall_s"] for r in raw[v] if "error" not in r)
                    for v in (before, after)}
            named = [" ".join(FLAG_VARIANTS[v]) or "defaults" for v in (before, after)]
            how = (f"{method} LoRA s/step after {warmup} warm-up steps, `{named[0]}` vs `{named[1]}`, medians of "
                   f"{len(times[before])} / {len(times[after])} interleaved runs of {steps} steps; whole process "
                   f"{wall[before]:.0f} s vs {wall[after]:.0f} s")
            rows.append(row(item, how, statistics.median(times[before]), statistics.median(times[after]), unit="s",
                            status=status + (f"; {warn}" if warn else "")))
    return rows, raw


MERGE_VARIANTS = {"off": ["lora_merge=off"], "no_grad": ["lora_merge=no_grad"], "auto": ["lora_merge=auto"],
                  "bf16 off": ["mixed_precision=bf16", "lora_merge=off"], "bf16 auto": ["mixed_precision=bf16"]}
MERGE_PAIRS = [  # (before, after, item, status)
    ("off", "no_grad", "LoRA on merged weights, forwards without gradient", "option"),
    ("off", "auto", "LoRA on merged weights, every forward (auto on a CPU)", "default"),
    ("bf16 off", "bf16 auto", "mixed_precision=bf16 on a CPU: bf16 base through peft vs float32 base merged",
     "default"),
]


def merge_rows(methods: list[str], repeats: int, steps: int, warmup: int, threads: int,
               bf16: bool = False) -> tuple[list[dict], dict]:
    """Whole-step s/step of each method's LoRA default through peft's wrappers and on merged weights; ``bf16``: also
    under mixed_precision=bf16, the bf16 base through peft (before) against the float32 base merged (after)."""
    variants = [v for v in MERGE_VARIANTS if bf16 or not v.startswith("bf16")]
    jobs = [(f"{m}/{v}", m, MERGE_VARIANTS[v], f"{m} {' '.join(MERGE_VARIANTS[v])}") for m in methods for v in variants]
    raw = timed_runs(jobs, repeats, steps, warmup, threads)
    times = {m: {v: _step_times(raw.get(f"{m}/{v}", [])) for v in variants} for m in methods}
    rows = []
    for m in methods:
        for before, after, item, status in MERGE_PAIRS:
            b, a = times[m].get(before), times[m].get(after)
            if b and a:
                how = (f"benchmarks.train_step s/step, `{' '.join(MERGE_VARIANTS[before])}` vs "
                       f"`{' '.join(MERGE_VARIANTS[after])}`, medians of {len(b)} interleaved runs of {steps} steps")
                rows.append(row(f"{item}: {m} (issue 23)", how, statistics.median(b), statistics.median(a), unit="s",
                                status=status))
    return rows, raw


def earlier_section(json_path: Path) -> dict[str, Any]:
    """The lean section already in ``json_path`` (BENCHMARKS.json), or {} when there is none."""
    try:
        return json.loads(json_path.read_text()).get("lean") or {}
    except (OSError, ValueError, AttributeError):
        return {}


def kept_rows(new: list[dict], old: dict[str, Any]) -> list[dict]:
    """The earlier lean section's rows that ``new`` does not re-measure, each naming the command that did."""
    measured = {r["item"] for r in new}
    out = []
    for r in old.get("rows", []):
        if r["item"] not in measured:
            src = r.get("source") or f"`{old.get('command', '?')}` ({old.get('date', '?')})"
            out.append({**r, "source": src})
    return out


def markdown(lean: dict[str, Any]) -> str:
    L = [START, "## Lean step (issue 10): before and after, item by item", "",
         f"Command: `{lean['command']}` ({lean['date']}, {lean['threads']} torch thread(s)). Ratio = before / after "
         "(above 1: the change is faster). Items marked *already in* were in the code before this issue's work; their "
         "figure times the operation both ways in one process.", "",
         "| item | how measured | before | after | ratio | status |", "|---|---|---|---|---|---|"]
    for r in lean["rows"]:
        ratio = "—" if r["ratio"] is None else f"{r['ratio']:.2f}×"
        how = r["how"] + (f"; measured by {r['source']}" if r.get("source") else "")
        L.append(f"| {r['item']} | {how} | {r['before']:.3f} {r['unit']} | {r['after']:.3f} {r['unit']} | "
                 f"{ratio} | {r['status']} |")
    L += ["", *lean.get("notes", []), END]
    return "\n".join(L) + "\n"


NOTES = [
    "- VAE latents are not cached: the default runs draw 25,600 (LCM, TSCD) and 16,000 (DMD2) samples from "
    "60,000 Fashion-MNIST images, so a cache would almost never be hit; encoding is batched (one call per batch).",
    "- No forward runs twice within a step in LCM, TSCD (without its adversarial option) or SiD: every UNet call has "
    "its own input (SiD's critic and generator turns draw their own noise, as its reference does). DMD2 at a "
    "generator step runs the generator twice (with gradient before its update, again without after it, for the "
    "critic); its reference reuses the first, detached. Not changed here (methods/dmd2.py belongs to another task).",
    "- The role-switch change also stops a LoRA critic's tensors from requiring gradients inside the student's loss "
    "(peft's set_adapter made the active adapter trainable), so SiD's student backward no longer computes critic "
    "weight gradients that were discarded. Checked once against a worktree of the commit before (cadd282): trained "
    "tensors, validation grids and teacher rows are bit-identical before and after for all four methods, LoRA and "
    "full (embedded teacher, 3 steps at batch 4; TSCD 4 steps).",
    "- compile=true (default off) compiles for minutes before its first step: about 12 minutes of the first run "
    "with an empty inductor cache here (three graphs for LCM: the student with gradient, the teacher's batched CFG "
    "pass, the target without gradient; dynamo recompiles once on grad mode and once on the adapters' enabled "
    "state, never afterwards), about 30 s once /tmp/torchinductor_* holds the kernels. The two cold-cache runs "
    "measured 5.07 and 4.61 s/step after warm-up (taken while the test suite ran alongside; not understood), the "
    "warm-cache runs 1.1-1.2x faster than eager.",
    "- The whole-step rows were measured while other jobs shared the two cores (about 1.6x the s/step of the "
    "training table above; each run's figure is in BENCHMARKS.json, lean.raw): read them with that spread. The "
    "role-switch row is the direct figure: before, every role entry cost about 20 ms (snapshot of every LoRA "
    "tensor's requires_grad, peft's set_adapter on 129 layers, both again on exit), even when the role was already "
    "active; an LCM-LoRA step enters roles 4 times (about 80 ms of a 0.65 s step), a SiD-LoRA step 7 times.",
    "- LoRA on merged weights (issue 23; distill_diffusion.lora_merge): a LoRA forward through peft runs the base "
    "layer, then the adapter's two small products, through a Python wrapper per layer; on the embedded teacher that "
    "wrapper, not the arithmetic, is most of the adapter's cost (a LoRA student's forward cost about 1.4x a full "
    "student's in the training table). The merged forward runs one plain layer on W + s*B*A. With gradient, the "
    "backward then computes a full-size weight gradient per layer, cheap here and costly on a large network on a "
    "GPU, so lora_merge=auto merges every forward on a CPU and only forwards without gradient on an accelerator.",
    "- CFG in one forward of 2B is not faster than two forwards of B on this one-thread CPU (no parallelism to "
    "fill); it stays, as it is on GPUs, where the batched pass is the usual win.",
]


def write(out: Path, lean: dict[str, Any]) -> None:
    from benchmarks import sections

    def head_line(text: str) -> str:
        head = f"- Lean-step table (issue 10): `{lean['command']}`"
        lines = [ln for ln in text.split("\n") if not ln.startswith("- Lean-step table")]
        at = next((i + 1 for i, ln in enumerate(lines) if ln.startswith("- Command:")), 1)
        return "\n".join(lines[:at] + [head] + lines[at:])

    sections.write(out, START, END, markdown(lean), "lean", lean, edit=head_line)


def run(a: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(a.threads)
    rows: list[dict] = []
    raw: dict[str, Any] = {}
    if not a.no_micro:
        rows += micro_rows(a.repeats_micro)
    if a.before_tree:
        r, raw["end_to_end"] = end_to_end_rows(Path(a.before_tree), a.methods, a.repeats, a.steps, a.warmup,
                                               a.threads)
        rows += r
    if not a.no_flags:
        r, raw["flags"] = flag_rows(a.repeats, a.steps, a.warmup, a.threads, a.compile_repeats)
        rows += r
    if a.merge:
        r, raw["merge"] = merge_rows(a.methods, a.repeats, a.steps, a.warmup, a.threads, a.bf16)
        rows += r
    if a.keep:
        old = earlier_section(Path(a.out).with_suffix(".json"))
        rows = kept_rows(rows, old) + rows
        if "raw" in old:
            raw["earlier"] = old["raw"]
    return {"command": command_line("python -m benchmarks.lean", argv), "date": time.strftime("%Y-%m-%d %H:%M UTC",
            time.gmtime()), "threads": a.threads, "rows": rows, "notes": NOTES, "raw": raw}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.lean", description=__doc__.split("\n\n")[0])
    ap.add_argument("--before-tree", default=None, help="a worktree of the commit before the change")
    ap.add_argument("--methods", nargs="+", default=["lcm", "dmd2", "sid", "tscd"])
    ap.add_argument("--repeats", type=int, default=3, help="interleaved runs per end-to-end / flag variant")
    ap.add_argument("--repeats-micro", type=int, default=7)
    ap.add_argument("--compile-repeats", type=int, default=1, help="compile=true runs (each compiles for minutes)")
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-flags", action="store_true")
    ap.add_argument("--no-micro", action="store_true")
    ap.add_argument("--merge", action="store_true", help="lora_merge=off / no_grad / auto, each method's LoRA step")
    ap.add_argument("--bf16", action="store_true", help="with --merge: mixed_precision=bf16 too, "
                    "lora_merge=off / auto")
    ap.add_argument("--keep", action="store_true", help="keep the earlier section's rows this run does not measure")
    ap.add_argument("--out", default="BENCHMARKS.md")
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    a = parser().parse_args(argv)
    lean = run(a, argv)
    write(Path(a.out), lean)
    print(markdown(lean))
    return 0


if __name__ == "__main__":
    sys.exit(main())
