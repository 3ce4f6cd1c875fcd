"""The data path at scale (issue 22): decoding in DataLoader workers, batched text encoding, the on-disk text store.

    python -m benchmarks.data_scale [--images 48] [--size 1024] [--batch 8] [--steps 12] [--workers 0 1]
        [--prompts 128] [--threads 1] [--out BENCHMARKS.md]

1. **Workers.** Writes ``--images`` JPEGs of ``--size`` px (smooth random colour fields, so the files have a photo's
   size, not noise's) with captions, and times ``--steps`` steps of batch ``--batch`` at 1024 px through the
   loop's data path (:meth:`distill_diffusion.data.Stream.batches`), each step followed by a stand-in for the
   accelerator's work: a matmul loop timed to take as long as decoding one batch (on a GPU machine the step runs on
   the GPU while the CPU decodes; here it takes one core while a worker uses the other). Seconds per step with 0
   workers (decoding in the training process, before the step) against ``--workers``.
2. **Text encoding.** ``--prompts`` distinct captions through the embedded teacher's CLIP text encoder, batch 1
   (the default) against ``data.text_encode_batch`` 8 and 32: milliseconds per prompt.
3. **The text store.** Conditioning of a batch of 32 new prompts: encoded against read from the store that
   ``python -m distill_diffusion.precompute`` fills.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

START, END = "<!-- data-scale:start -->", "<!-- data-scale:end -->"


def write_images(root: Path, n: int, size: int) -> None:
    """n JPEGs of size² px: a random 8×8 colour field upsampled (photo-like entropy), each with a .txt caption."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        small = Image.fromarray((rng.random((8, 8, 3)) * 255).astype("uint8"))
        small.resize((size, size), Image.BICUBIC).save(root / f"{i:05d}.jpg", quality=90)
        (root / f"{i:05d}.txt").write_text(f"a photo of item {i}")


def _busy(seconds: float) -> None:
    """The accelerator's share of a step, as CPU work of a fixed duration (one core)."""
    a = torch.randn(256, 256)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a = torch.tanh(a @ a * 1e-3)


def time_workers(folder: Path, batch: int, steps: int, workers: list[int], size: int) -> dict[str, Any]:
    from distill_diffusion.data import ImageFolder, Stream

    stream = Stream(ImageFolder(str(folder), size), seed=0, batch_size=batch)
    t0 = time.perf_counter()
    for k in range(3):
        stream.get(k)
    decode = (time.perf_counter() - t0) / 3
    out: dict[str, Any] = {"decode_s_per_batch": decode, "s_per_step": {}}
    for w in workers:
        it = stream.batches(0, steps + 1, num_workers=w)
        next(it)  # workers started and the first batch decoded: steady state from here
        t0 = time.perf_counter()
        for _ in range(steps):
            next(it)
            _busy(decode)
        out["s_per_step"][w] = (time.perf_counter() - t0) / steps
    return out


def time_text(prompts: int) -> dict[str, Any]:
    from distill_diffusion.encoders import Encoders, PromptStore
    from distill_diffusion.models import Models

    models = Models("embedded", roles=("student",))
    caps = [f"a photo of a {c} number {i}" for i, c in enumerate(["shirt", "sneaker", "bag", "dress"] * prompts)]
    caps = caps[:prompts]
    per_prompt = {}
    for k in (1, 8, 32):
        enc = Encoders(models.family, encode_batch=k)
        enc.encode_rows(caps[:k])  # warm-up
        t0 = time.perf_counter()
        enc.encode_rows(caps)
        per_prompt[k] = (time.perf_counter() - t0) / len(caps) * 1e3
    with tempfile.TemporaryDirectory() as d:
        store = PromptStore(d, {"bench": 1})
        Encoders(models.family, store=store).encode_rows(caps[:32])
        t0 = time.perf_counter()
        Encoders(models.family).encode_prompts(caps[:32])
        cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        Encoders(models.family, store=store).encode_prompts(caps[:32])
        stored = time.perf_counter() - t0
    return {"ms_per_prompt": per_prompt, "batch32_encode_s": cold, "batch32_store_s": stored}


def markdown(r: dict[str, Any]) -> str:
    w, t = r["workers"], r["text"]
    base = next(iter(w["s_per_step"].values()))  # the first --workers value (0 by default)
    rows = "\n".join(f"| {k} | {v:.3f} | {base / v:.2f}× |" for k, v in w["s_per_step"].items())
    one = next(iter(t["ms_per_prompt"].values()))  # batch 1
    enc = "\n".join(f"| {k} | {v:.2f} | {one / v:.2f}× |" for k, v in t["ms_per_prompt"].items())
    return f"""{START}
## The data path at scale (issue 22)

Command: `{r['command']}` ({r['when']}, {r['cpu']}, {r['threads']} torch thread(s) in the training process).

Decoding {r['args']['batch']} JPEGs of {r['args']['size']} px into a batch takes {w['decode_s_per_batch']:.3f} s
here. Each step below is that batch plus a stand-in for the accelerator's work of the same length (module
docstring):

| data.num_workers | s/step | speed-up |
|---|---|---|
{rows}

Text encoding, {r['args']['prompts']} distinct prompts through the embedded teacher's CLIP text encoder:

| data.text_encode_batch | ms/prompt | speed-up |
|---|---|---|
{enc}

A batch of 32 new prompts: {t['batch32_encode_s'] * 1e3:.1f} ms encoded, {t['batch32_store_s'] * 1e3:.1f} ms read from
the store `python -m distill_diffusion.precompute` fills. The embedded teacher's text encoder is tiny; a larger one
costs more per prompt, while a read from the store costs the same.
{END}
"""


def write(out: Path, r: dict[str, Any]) -> None:
    from benchmarks import sections

    sections.write(out, START, END, markdown(r), "data_scale", r)


def main(argv: list[str] | None = None) -> int:
    from distill_diffusion.provenance import command_line, cpu_name

    ap = argparse.ArgumentParser(prog="python -m benchmarks.data_scale", description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--prompts", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="BENCHMARKS.md to update (its data-scale section)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as d:
        write_images(Path(d), a.images, a.size)
        workers = time_workers(Path(d), a.batch, a.steps, a.workers, a.size)
    r = {"command": command_line("python -m benchmarks.data_scale", argv),
         "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": cpu_name(), "threads": a.threads,
         "args": vars(a), "workers": workers, "text": time_text(a.prompts)}
    print(json.dumps(r, indent=1, default=str))
    if a.out:
        write(Path(a.out), json.loads(json.dumps(r)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
