"""Check the shipped teacher with the shipped evaluator: sample every class at a few guidance scales, classify.

    python -m distill_diffusion.toy.sample_check [--teacher DIR] [--evaluator DIR] [--guidance 1.5,2,3,5] \
        [--steps 25] [--per-class 20] [--grid runs/teacher_samples.png]

For each guidance scale, ``per-class`` images of each class are drawn with DDIM from the prompt "a photo of a
<class>" (the same initial noise at every scale, so the scales are compared on equal draws) and the evaluator's
zero-shot class is compared with the prompted one. Prints the accuracy per scale and per class, and writes a grid
(rows = classes, columns = samples) for each scale.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import Tensor

from .fmnist import CLASS_NAMES, caption
from .zero_shot import classify, load_evaluator

ASSETS = Path(__file__).resolve().parent.parent / "assets"


def load_teacher(path: str | Path = ASSETS / "fmnist_teacher"):
    """The teacher as a float32 StableDiffusionPipeline (progress bars off)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def sample_classes(pipe, per_class: int, guidance: float, steps: int, seed: int, batch: int = 100) -> Tensor:
    """(10 * per_class, 3, 32, 32) images in [-1, 1], class-major (class c at rows c * per_class ...)."""
    prompts = [caption(c, 0) for c in range(len(CLASS_NAMES)) for _ in range(per_class)]
    size = pipe.unet.config.sample_size
    latents = torch.randn(len(prompts), pipe.unet.config.in_channels, size, size,
                          generator=torch.Generator().manual_seed(seed))
    out = []
    for i in range(0, len(prompts), batch):
        im = pipe(prompts[i : i + batch], height=32, width=32, num_inference_steps=steps, guidance_scale=guidance,
                  latents=latents[i : i + batch] * pipe.scheduler.init_noise_sigma, output_type="pt").images
        out.append(im * 2 - 1)
    return torch.cat(out)


def save_grid(images: Tensor, rows: int, cols: int, path: Path, upscale: int = 3) -> None:
    """Images (rows * n, 3, H, W) in [-1, 1], row-major by class -> a PNG grid of the first ``cols`` per row."""
    from PIL import Image

    n = len(images) // rows
    x = images.view(rows, n, *images.shape[1:])[:, :cols]
    x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (rows, cols, 3, H, W)
    grid = x.permute(0, 3, 1, 4, 2).reshape(rows * x.shape[3], cols * x.shape[4], 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid.numpy()).resize((grid.shape[1] * upscale, grid.shape[0] * upscale), Image.NEAREST).save(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", default=str(ASSETS / "fmnist_teacher"))
    ap.add_argument("--evaluator", default=str(ASSETS / "fmnist_evaluator"))
    ap.add_argument("--guidance", default="1.5,2,3,5", help="comma-separated classifier-free guidance scales")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--per-class", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--grid", default="runs/teacher_samples.png", help="PNG path; one file per scale (_g<scale>)")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pipe = load_teacher(args.teacher)
    model, tok = load_evaluator(args.evaluator)
    labels = torch.arange(len(CLASS_NAMES)).repeat_interleave(args.per_class)
    results = {}
    for gs in (float(v) for v in args.guidance.split(",")):
        t0 = time.time()
        images = sample_classes(pipe, args.per_class, gs, args.steps, args.seed)
        correct = (classify(model, tok, images) == labels).float().view(len(CLASS_NAMES), -1).mean(1)
        grid = Path(args.grid)
        save_grid(images, len(CLASS_NAMES), min(8, args.per_class), grid.with_name(f"{grid.stem}_g{gs:g}.png"))
        results[gs] = {"accuracy": float(correct.mean()), "per_class": {c: round(float(a), 3) for c, a in
                                                                        zip(CLASS_NAMES, correct, strict=True)},
                       "seconds": round(time.time() - t0, 1)}
        per = ", ".join(f"{c} {a:.2f}" for c, a in zip(CLASS_NAMES, correct.tolist(), strict=True))
        print(f"guidance {gs:g}: evaluator accuracy {correct.mean():.3f} ({args.steps} DDIM steps, "
              f"{len(images)} images, {time.time() - t0:.0f} s) | {per}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"steps": args.steps, "per_class": args.per_class, "seed": args.seed,
                                               "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
