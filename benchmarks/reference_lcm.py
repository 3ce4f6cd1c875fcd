"""Our LCM-LoRA training step against diffusers' reference script, on the same teacher and the same work.

    python -m benchmarks.reference_lcm --script /elsewhere/train_lcm_distill_lora_sd_wds.py [--repeats 3]
        [--short 10] [--long 40] [--work /tmp/reference_lcm] [--json ref.json] [--autocast off|on|both]

The reference is diffusers' ``examples/consistency_distillation/train_lcm_distill_lora_sd_wds.py``. It is not part of
this repository: fetch it yourself (BENCHMARKS.md gives the URL and the commit measured) and
``pip install webdataset braceexpand`` into the environment; our own code needs neither.

What runs:
  1. A webdataset shard (``shard-000000.tar``: ``NNNNNN.png`` + ``NNNNNN.txt`` pairs, the layout the script's
     ``SDText2ImageDataset`` reads) of Fashion-MNIST training images as our data code makes them (32x32 RGB, the same
     padding) with the same class-name captions.
  2. The reference script, in a subprocess, through a wrapper written next to the shard (outside the repository)
     that changes only what the embedded teacher needs (see ``WRAPPER``): the unconditional prompt is tokenised
     to the tokenizer's own length (the script hard-codes 77 tokens; our text encoder has 16 positions), and with
     ``--autocast off`` the script's unconditional ``torch.autocast("cpu")`` around the teacher and target forwards
     is disabled, so both programs compute in float32. The wrapper also records the time of each optimizer step
     (a global post-hook; it does not change the step).
  3. ``python train.py --method lcm`` with the same settings (``MATCHED``).
Seconds per step, the same way for both: each program runs ``--short`` and ``--long`` optimizer steps in fresh
processes, and (T_long - T_short) / (long - short) of the wall times cancels start-up, model loading, the final
save and our end-of-run validation grid. Runs are interleaved (ref short, ours short, ref long, ours long per
repeat) so both see the same machine load; medians over repeats, ratio ours / reference of the medians.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from distill_diffusion.provenance import command_line, git_state

ROOT = Path(__file__).resolve().parent.parent
SCRIPT_NAME = "train_lcm_distill_lora_sd_wds.py"
SCRIPT_URL = ("https://raw.githubusercontent.com/huggingface/diffusers/{commit}/examples/consistency_distillation/"
              + SCRIPT_NAME)

# The shared settings, each as the script's flag and our key. Our guidance w is diffusers' convention (1 = none); the
# script's code forms cond + w (cond - uncond), i.e. the paper's omega = our w - 1, so its range is ours minus one.
BATCH, RANK, LR, WARMUP = 32, 16, 5e-4, 50
W_MIN, W_MAX, HUBER_C, DDIM_STEPS, RESOLUTION, SEED = 1.5, 3.0, 0.001, 50, 32, 0
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj"]
MATCHED = [  # (what, script's flags, our overrides)
    ("resolution", ["--resolution", str(RESOLUTION)], [f"resolution={RESOLUTION}"]),
    ("batch", ["--train_batch_size", str(BATCH)], [f"batch_size={BATCH}"]),
    ("LoRA rank / alpha", ["--lora_rank", str(RANK), "--lora_alpha", str(RANK)],
     [f"lora_rank={RANK}", f"lora_alpha={RANK}"]),
    ("LoRA target modules", ["--lora_target_modules", ",".join(LORA_TARGETS)],
     ["lora_targets=[" + ",".join(LORA_TARGETS) + "]"]),
    ("learning rate, warm-up",
     ["--learning_rate", str(LR), "--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", str(WARMUP)],
     [f"learning_rate={LR}", f"lr_warmup_steps={WARMUP}"]),
    ("AdamW", ["--adam_weight_decay", "0.0", "--max_grad_norm", "1.0"],
     ["adam_weight_decay=0.0", "max_grad_norm=1.0"]),
    ("guidance range", ["--w_min", str(W_MIN - 1), "--w_max", str(W_MAX - 1)],
     [f"method.w_min={W_MIN}", f"method.w_max={W_MAX}"]),
    # The script's target is the LoRA's own weights and it exports them raw; our embedded default uses EMAs of both
    ("target network, export", [], ["method.lora_ema_target=false", "ema_decay=null"]),
    ("loss", ["--loss_type", "huber", "--huber_c", str(HUBER_C)],
     ["method.loss_type=huber", f"method.huber_c={HUBER_C}"]),
    ("DDIM solver steps, boundary scaling",
     ["--num_ddim_timesteps", str(DDIM_STEPS), "--timestep_scaling_factor", "10"],
     [f"method.num_ddim_timesteps={DDIM_STEPS}", "method.timestep_scaling=10"]),
    ("precision", ["--mixed_precision", "no"], []),  # our default is "no" (a bare `no` override reads as false)
    ("seed", ["--seed", str(SEED)], [f"seed={SEED}"]),
    ("logging", ["--report_to", "tensorboard"], ["report_to=tensorboard", "logging_steps=1"]),
]

# Runs the script as __main__ after the patches. Written into the work folder, never into the repository.
WRAPPER = r'''
import atexit, json, os, runpy, sys, time
import torch, transformers
from torch.optim.optimizer import register_optimizer_step_post_hook

script, times_file, autocast = sys.argv[1], sys.argv[2], sys.argv[3]
sys.argv = [script] + sys.argv[4:]

# 1. The script tokenises "" to a hard-coded 77 tokens; the teacher's text encoder has model_max_length positions.
_from_pretrained = transformers.AutoTokenizer.from_pretrained
def from_pretrained(*a, **k):
    tok = _from_pretrained(*a, **k)
    base = type(tok)
    def call(self, *ca, **ck):
        if ck.get("max_length") == 77:
            ck["max_length"] = self.model_max_length
        return base.__call__(self, *ca, **ck)
    tok.__class__ = type(base.__name__, (base,), {"__call__": call})
    return tok
transformers.AutoTokenizer.from_pretrained = from_pretrained

# 2. --autocast off: the script wraps its teacher and target forwards in torch.autocast("cpu"), bfloat16 on CPU
#    whatever --mixed_precision says; disable it so that both programs compute in float32.
if autocast == "off":
    class autocast_cls(torch.autocast):
        def __init__(self, device_type, dtype=None, enabled=True, cache_enabled=None):
            super().__init__(device_type, dtype=dtype, enabled=enabled and device_type != "cpu",
                             cache_enabled=cache_enabled)
    torch.autocast = autocast_cls

# Measurement only: the time of each optimizer step.
stamps = []
register_optimizer_step_post_hook(lambda opt, a, k: stamps.append(time.perf_counter()))
atexit.register(lambda: open(times_file, "w").write(json.dumps(stamps)))
runpy.run_path(script, run_name="__main__")
'''


# ---- data --------------------------------------------------------------------------------------------------------


def write_shard(path: Path, samples: Iterable[tuple[Any, str]]) -> int:
    """A webdataset tar of ``NNNNNN.png`` (uint8 RGB) + ``NNNNNN.txt`` pairs from (image (3, R, R) in [-1, 1],
    caption). Returns the number of samples."""
    import numpy as np
    from PIL import Image

    n = 0
    with tarfile.open(path, "w") as tar:
        for i, (img, cap) in enumerate(samples):
            arr = ((img.float().clamp(-1, 1) + 1) * 127.5).round().to(dtype=__import__("torch").uint8)
            buf = io.BytesIO()
            Image.fromarray(np.ascontiguousarray(arr.permute(1, 2, 0).numpy()), "RGB").save(buf, format="PNG")
            for ext, data in (("png", buf.getvalue()), ("txt", cap.encode("utf-8"))):
                info = tarfile.TarInfo(f"{i:06d}.{ext}")
                info.size, info.mtime = len(data), 0
                tar.addfile(info, io.BytesIO(data))
            n += 1
    return n


def build_fmnist_shard(path: Path, n: int, fashion_mnist: str | None = None) -> int:
    """The first ``n`` Fashion-MNIST training images as our data code loads them, captions with template i mod 3."""
    from distill_diffusion.data import FashionMNISTSource

    src = FashionMNISTSource(fashion_mnist, RESOLUTION)
    return write_shard(path, ((src.image(i), src.caption(i, i)) for i in range(min(n, len(src)))))


# ---- commands ----------------------------------------------------------------------------------------------------


def reference_argv(wrapper: Path, script: Path, times: Path, autocast: str, shard: Path, teacher: Path, out: Path,
                   steps: int) -> list[str]:
    flags = [f for _, ref, _ in MATCHED for f in ref]
    return [sys.executable, str(wrapper), str(script), str(times), autocast,
            "--pretrained_teacher_model", str(teacher), "--train_shards_path_or_url", str(shard),
            "--output_dir", str(out), "--max_train_steps", str(steps), "--max_train_samples", str(BATCH * 10_000),
            # the script's WebLoader sets persistent_workers=True, which torch refuses with 0 workers
            "--dataloader_num_workers", "1", "--checkpointing_steps", "1000000", "--validation_steps", "1000000",
            *flags]


def ours_argv(out: Path, steps: int, root: Path = ROOT, bf16: bool = False) -> list[str]:
    """Our train.py with the matched settings; ``bf16``: our bf16 option (accelerate's CPU autocast; on a CPU the LoRA
    run's frozen base stays float32 so its adapters run merged, ``models.frozen_dtype``), against the script as
    shipped."""
    keys = [k for _, _, ours in MATCHED for k in ours] + (["mixed_precision=bf16"] if bf16 else [])
    return [sys.executable, str(root / "train.py"), "--method", "lcm", "teacher=embedded", "student=lora",
            f"output_dir={out}", f"max_steps={steps}", "checkpointing_steps=1000000", "validation_steps=0",
            "validation_seeds=1", *keys]


def timed_run(argv: list[str], env: dict[str, str], log: Path, cwd: Path = ROOT) -> float:
    t0 = time.perf_counter()
    with log.open("w") as fh:
        r = subprocess.run(argv, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-5:]
        raise RuntimeError(f"{argv[1]} exited with {r.returncode} (log {log}):\n" + "\n".join(tail))
    return wall


# ---- arithmetic --------------------------------------------------------------------------------------------------


def per_step(t_short: float, t_long: float, n_short: int, n_long: int) -> float:
    """Seconds per step from two runs of the same program that differ only in their step count."""
    if n_long <= n_short:
        raise ValueError(f"need long > short steps, got {n_long} <= {n_short}")
    return (t_long - t_short) / (n_long - n_short)


def steady_median(stamps: list[float], skip: int) -> float | None:
    """Median interval between consecutive step time stamps after the first ``skip`` steps."""
    d = [b - a for a, b in zip(stamps[skip:], stamps[skip + 1:])]
    return statistics.median(d) if d else None


def summarize(records: list[dict[str, Any]], n_short: int, n_long: int) -> dict[str, Any]:
    """Per (program, variant) and repeat: seconds per step from the two wall times; medians; ratios ours / ref."""
    per: dict[str, list[float]] = {}
    inproc: dict[str, list[float]] = {}
    for rep in sorted({r["repeat"] for r in records}):
        for who in sorted({r["who"] for r in records}):
            rs = {r["steps"]: r for r in records if r["repeat"] == rep and r["who"] == who}
            if n_short in rs and n_long in rs:
                per.setdefault(who, []).append(per_step(rs[n_short]["wall_s"], rs[n_long]["wall_s"], n_short, n_long))
            if rs.get(n_long, {}).get("inproc_s") is not None:
                inproc.setdefault(who, []).append(rs[n_long]["inproc_s"])
    med = {w: statistics.median(v) for w, v in per.items()}
    out: dict[str, Any] = {"sec_per_step": per, "median": med,
                           "inproc_median": {w: statistics.median(v) for w, v in inproc.items()}, "ratio": {}}
    out["inproc_ratio"] = {}
    # ratio[w]: ours (float32) / reference variant w; ratio["ours_bf16"]: our bf16 option / the script as shipped
    pairs = {w: ("ours", w) for w in med if w.startswith("ref")} | {"ours_bf16": ("ours_bf16", "ref_autocast_on")}
    ip = out["inproc_median"]
    for key, (mine, ref) in pairs.items():
        if mine in med and ref in med:
            out["ratio"][key] = med[mine] / med[ref]
        if mine in ip and ref in ip:
            out["inproc_ratio"][key] = ip[mine] / ip[ref]
    return out


# ---- the measurement ---------------------------------------------------------------------------------------------


def script_info(script: Path) -> dict[str, Any]:
    text = script.read_text()
    return {"path": str(script), "sha256": hashlib.sha256(text.encode()).hexdigest(),
            "min_version": next((ln.split('"')[1] for ln in text.splitlines() if ln.startswith("check_min_version")),
                                None)}


def measure(script: Path, work: Path, repeats: int, short: int, long: int, autocast: list[str],
            shard_size: int = 4096, threads: int = 1, fashion_mnist: str | None = None,
            commit: str | None = None, ours_rev: str | None = None) -> dict[str, Any]:
    """``ours_rev``: run our train.py from ``git archive`` of this revision (unpacked in ``work``), not from the
    working tree, e.g. while others edit the tree."""
    from distill_diffusion.models import embedded_teacher_path

    script, work = script.resolve(), work.resolve()
    if not script.is_file():
        raise FileNotFoundError(f"--script {script}: no such file (see BENCHMARKS.md for where to get it)")
    if work == ROOT or ROOT in work.parents:
        raise ValueError(f"--work {work} is inside the repository; choose a folder outside it")
    work.mkdir(parents=True, exist_ok=True)
    shard = work / "shard-000000.tar"
    n = build_fmnist_shard(shard, shard_size, fashion_mnist)
    git = ["git", "-C", str(ROOT)]
    ours_root = ROOT
    ours_sha, dirty = git_state(ROOT, ours_rev or "HEAD")
    if dirty is not None:
        dirty = dirty and not ours_rev
    if ours_rev:
        import shutil

        ours_root = work / "ours_src"
        shutil.rmtree(ours_root, ignore_errors=True)
        ours_root.mkdir()
        arch = subprocess.run([*git, "archive", ours_sha], capture_output=True, check=True).stdout
        with tarfile.open(fileobj=io.BytesIO(arch)) as t:
            t.extractall(ours_root, filter="data")
    wrapper = work / "run_reference.py"
    wrapper.write_text(WRAPPER)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled",
           "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    teacher = embedded_teacher_path()
    records: list[dict[str, Any]] = []
    import shutil

    for rep in range(repeats):
        for steps in (short, long):
            ours = ["ours", "ours_bf16"] if "on" in autocast else ["ours"]
            for who in [f"ref_autocast_{a}" for a in autocast] + ours:
                out = work / f"{who}_{steps}_{rep}"
                shutil.rmtree(out, ignore_errors=True)
                times = work / f"{who}_{steps}_{rep}.times.json"
                if who.startswith("ours"):
                    argv = ours_argv(out, steps, ours_root, bf16=who == "ours_bf16")
                else:
                    argv = reference_argv(wrapper, script, times, who.rsplit("_", 1)[1], shard, teacher, out, steps)
                print(f"[reference_lcm] repeat {rep + 1}/{repeats}: {who}, {steps} steps", flush=True)
                wall = timed_run(argv, env, work / f"{who}_{steps}_{rep}.log",
                                 ours_root if who.startswith("ours") else ROOT)
                if who.startswith("ours"):  # logging_steps=1: each line's sec_per_step is that step's wall time
                    logged = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
                    series = [r["sec_per_step"] for r in logged]
                    d = series[min(5, steps - 1) + 1:]
                    inproc = statistics.median(d) if d else None
                else:
                    stamps = json.loads(times.read_text())
                    series = [b - a for a, b in zip(stamps, stamps[1:])]
                    inproc = steady_median(stamps, min(5, steps - 1))
                records.append({"who": who, "repeat": rep, "steps": steps, "wall_s": wall, "inproc_s": inproc,
                                "step_s": series})
                print(f"    {wall:.1f} s wall, in-process median {inproc if inproc is None else round(inproc, 3)} "
                      "s/step", flush=True)
                shutil.rmtree(out, ignore_errors=True)
    import diffusers
    import torch

    return {"script": {**script_info(script), "commit": commit,
                       "url": SCRIPT_URL.format(commit=commit or "main")},
            "command": command_line("python -m benchmarks.reference_lcm"),
            "ours": {"commit": ours_sha, "uncommitted_changes": dirty, "from": "git archive" if ours_rev else "tree"},
            "settings": {"batch": BATCH, "resolution": RESOLUTION, "lora_rank": RANK, "lora_alpha": RANK,
                         "lora_targets": LORA_TARGETS, "learning_rate": LR, "warmup": WARMUP, "w_ours": [W_MIN, W_MAX],
                         "w_script": [W_MIN - 1, W_MAX - 1], "huber_c": HUBER_C, "num_ddim_timesteps": DDIM_STEPS,
                         "threads": threads, "shard_samples": n},
            "matched": [{"what": w, "script": r, "ours": o} for w, r, o in MATCHED],
            "short": short, "long": long, "repeats": repeats, "autocast": autocast, "records": records,
            "summary": summarize(records, short, long),
            "versions": f"torch {torch.__version__}, diffusers {diffusers.__version__}",
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


# ---- BENCHMARKS.md -----------------------------------------------------------------------------------------------

START, END = "<!-- reference-lcm:start -->", "<!-- reference-lcm:end -->"
LABELS = {"ours": "distill-diffusion `train.py --method lcm` (LoRA)",
          "ours_bf16": "distill-diffusion, `mixed_precision=bf16` (CPU autocast; float32 LoRA base, merged adapters)",
          "ref_autocast_off": "diffusers script, its CPU autocast disabled (float32, the same arithmetic as ours)",
          "ref_autocast_on": "diffusers script as shipped (teacher and target forwards under CPU bfloat16 autocast)"}


def markdown_section(ref: dict[str, Any]) -> list[str]:
    """The BENCHMARKS.md section of a ``measure`` result."""
    s, st = ref["summary"], ref["settings"]
    sc = ref["script"]
    L = [START, "## LCM-LoRA step against diffusers' reference script", "",
         f"Command: `{ref['command']}` ({ref['date']}; {ref['versions']}). Script: `{SCRIPT_NAME}` "
         f"(sha256 {sc['sha256'][:12]}…), from {sc['url']}; not in this repository.", "",
         f"Both on the embedded teacher, {st['resolution']}×{st['resolution']} pixels, batch {st['batch']}, LoRA rank "
         f"{st['lora_rank']} (alpha {st['lora_alpha']}) on the same {len(st['lora_targets'])} target module names, "
         f"lr {st['learning_rate']:g} with {st['warmup']} warm-up steps, guidance w ∈ [{st['w_ours'][0]}, "
         f"{st['w_ours'][1]}] (the script's ω ∈ [{st['w_script'][0]}, {st['w_script'][1]}]: the same "
         f"cond + ω(cond − uncond)), pseudo-Huber c = {st['huber_c']}, {st['num_ddim_timesteps']} DDIM solver steps, "
         f"no mixed precision, CPU, {st['threads']} thread. Seconds per step = (T{ref['long']} − T{ref['short']}) / "
         f"{ref['long'] - ref['short']} of the wall times of fresh processes running {ref['short']} and {ref['long']} "
         f"steps, {ref['repeats']} repeats interleaved; median (and the per-repeat values); the in-process column is "
         f"the median time of steps 7 to {ref['long']} inside the {ref['long']}-step runs (between optimizer steps), "
         "a cross-check that start-up does not enter.",
         "", "| program | s/step (median) | per repeat | ours / this (bf16 row: ours bf16 / script as shipped) | "
         "in-process s/step | in-process ours / this |",
         "|---|---|---|---|---|---|"]
    for who in ["ours"] + [w for w in s["median"] if w != "ours"]:
        if who not in s["median"]:
            continue
        ip = s["inproc_median"].get(who)
        ratio, ipr = s["ratio"].get(who), s.get("inproc_ratio", {}).get(who)
        L.append(f"| {LABELS.get(who, who)} | {s['median'][who]:.3f} | "
                 f"{', '.join(f'{x:.3f}' for x in s['sec_per_step'][who])} | "
                 f"{'' if ratio is None else f'**{ratio:.2f}**'} | {'—' if ip is None else f'{ip:.3f}'} | "
                 f"{'' if ipr is None else f'{ipr:.2f}'} |")
    o = ref.get("ours") or {}
    if o.get("commit"):
        where = "git archive of it" if o.get("from") == "git archive" else "the working tree"
        dirty = ", with uncommitted changes" if o.get("uncommitted_changes") else ""
        L += ["", f"Ours ran from commit {o['commit'][:7]} ({where}{dirty})."]
    off, bf = s["ratio"].get("ref_autocast_off"), s["ratio"].get("ours_bf16")
    if off is not None:
        L += ["", f"Issue 23's bars, recorded and not asserted: our float32 step at most 0.9× the script's float32 "
                  f"step: measured {off:.2f}×, {'met' if off <= 0.9 else 'not met'}."]
    if bf is not None:
        L += [f"Our bf16 option at most 1.0× the script's shipped bf16-autocast step: measured {bf:.2f}×, "
              f"{'met' if bf <= 1.0 else 'not met'}."]
    L += ["", "Getting the script (it is not in this repository): `curl -LO " + sc["url"] + "`, and "
              "`pip install webdataset braceexpand` into the same environment (its other imports, and tensorboard "
              "for its logger, are already dependencies here).", "",
          "What the run changes in the script, through a wrapper written to the work folder (`run_reference.py`, "
          "outside the repository) that patches at run time and then runs the file unmodified with `runpy`:",
          "1. `AutoTokenizer.from_pretrained` returns a tokenizer whose call turns `max_length=77` into the "
          "tokenizer's own `model_max_length`: the script tokenises its unconditional prompt to a hard-coded 77 "
          "tokens, and the embedded teacher's CLIP text encoder has 16 positions (SD's has 77, where this changes "
          "nothing).",
          "2. Rows marked float32 only: `torch.autocast` on the CPU device is built disabled. The script wraps its "
          "teacher and target forwards in `torch.autocast(device)` whatever `--mixed_precision` says, which is "
          "bfloat16 on a CPU (float16 on CUDA); ours runs them in float32 with `mixed_precision=no`.",
          "3. Measurement only: a global optimizer-step post-hook records a time stamp per step.",
          "", "Given as flags, not patched: `--dataloader_num_workers 1` (its `WebLoader` sets "
              "`persistent_workers=True`, which torch refuses with 0 workers), `--max_train_samples` (its epoch "
              "length), `--checkpointing_steps` and `--validation_steps` beyond the run, `--report_to tensorboard` "
              "(accelerate has no `none`; ours logs to tensorboard every step here too), offline `HF_*` variables "
              "and no CUDA device.",
          "", "The same work per step, read from both codes: the UNet sees 4B samples, the student at x_{t_n} with "
              "gradient (B), the teacher conditional and unconditional (2B: two calls of B in the script, one batched "
              "call in ours), and the target, the LoRA student without gradient at t_n − k (B); one backward through "
              "the student's forward; one VAE encode of the B images with a posterior sample; a gradient-norm clip at "
              "1.0; one AdamW step over LoRA tensors on the same 14 module names. What differs: the script runs the "
              "text encoder on the B captions every step, ours encodes each distinct caption once and reuses it "
              "(frozen encoder; 30 distinct captions here), so ours skips a small 2-layer text encoder forward; the "
              "script decodes PNGs from the shard in a DataLoader worker process (work in a second process), ours "
              "indexes decoded tensors in memory; the script's teacher is a separate plain UNet, ours a plain UNet "
              "whose tensors are the LoRA base's own (no copy, no peft wrappers); ours also checks every "
              "gradient for finiteness and draws per-sample keyed noise (for bit-identical resume).",
          *(["", *ref["notes"]] if ref.get("notes") else []), END]
    return L


def write(out: Path, ref: dict[str, Any]) -> None:
    """Put the section into ``out`` (replacing an earlier one between the markers, else before the sampling
    section) and the result under ``"reference"`` into the JSON next to it; the rest of both files is kept."""
    from benchmarks import sections

    sections.write(out, START, END, "\n".join(markdown_section(ref)), "reference", ref, before="## Sampling")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.reference_lcm", description=__doc__.split("\n\n")[0])
    ap.add_argument("--script", required=True, help=f"path of diffusers' {SCRIPT_NAME} (outside this repository)")
    ap.add_argument("--commit", default=None, help="the diffusers commit the script came from (recorded)")
    ap.add_argument("--work", default="/tmp/reference_lcm", help="shard, wrapper, logs (outside the repository)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--short", type=int, default=10)
    ap.add_argument("--long", type=int, default=40)
    ap.add_argument("--autocast", default="off", choices=["off", "on", "both"],
                    help="the script's CPU autocast around teacher and target: off (float32 like ours), on (as "
                         "shipped), both")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ours-rev", default=None, help="run our train.py from this git revision (git archive), not "
                    "from the working tree")
    ap.add_argument("--json", default=None, help="write the result here (python -m benchmarks --reference reads it)")
    ap.add_argument("--out", default=None, help="write the section into this BENCHMARKS.md (and the result into the "
                    "JSON next to it), keeping the rest")
    a = ap.parse_args(argv)
    res = measure(Path(a.script), Path(a.work), a.repeats, a.short, a.long,
                  ["off", "on"] if a.autocast == "both" else [a.autocast], threads=a.threads, commit=a.commit,
                  ours_rev=a.ours_rev)
    print("\n".join(markdown_section(res)))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    if a.out:
        write(Path(a.out), res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
