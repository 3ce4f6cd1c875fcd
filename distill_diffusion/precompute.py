"""Encode every prompt and image a training run will draw, once, into on-disk stores that the run then reads.

    python -m distill_diffusion.precompute --method M [--config FILE] [data.text_cache_dir=DIR]
        [data.latent_cache_dir=DIR] [--processes W] [key=value ...]

The same arguments as ``train.py`` (plus one or both stores): the samples are those of the run's keyed stream for
steps 0 .. max_steps - 1 over ``W`` processes (empty-prompt drops included). Prompts are encoded
``data.text_encode_batch`` at a time; images one at a time (the VAE posterior, mean and std). The usual practice
for teachers whose encoders cost more than a training step (SD3 / FLUX with T5-XXL; large images): afterwards
``train.py ... data.text_cache_dir=DIR data.latent_cache_dir=DIR2`` runs no text encoder, decodes no image and runs
no VAE encoder for them, and a second precompute over the same stores encodes nothing.
"""

from __future__ import annotations

import argparse
import sys
import time

from .errors import UserError


def run_samples(cfg, source, processes: int) -> tuple[list[str], list[int]]:  # noqa: ANN001 (a TrainConfig)
    """The distinct prompts and source indices of steps 0 .. max_steps - 1 on ``processes`` ranks, in first-use
    order: a one-rank stream with a ``processes``-fold batch covers every rank's global sample indices."""
    from .data import Stream

    stream = Stream(source, cfg.seed, cfg.batch_size * processes, accum=cfg.gradient_accumulation_steps,
                    empty_prompt_prob=cfg.data.empty_prompt_prob, load_images=False)
    batches = list(stream.batches(0, cfg.max_steps))
    return (list(dict.fromkeys(q for s in batches for q in s.prompts)),
            list(dict.fromkeys(i for s in batches for i in s.index)))


def main(argv: list[str] | None = None) -> int:
    from methods import METHODS

    from .artifacts import is_embedded_teacher
    from .config import parse_config
    from .data import build_source
    from .models import build_models

    ap = argparse.ArgumentParser(prog="python -m distill_diffusion.precompute", add_help=False)
    ap.add_argument("--processes", type=int, default=1, help="training processes the store is made for")
    a, rest = ap.parse_known_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg, _ = parse_config(rest, METHODS)
        if not (cfg.data.text_cache_dir or cfg.data.latent_cache_dir):
            raise UserError("set data.text_cache_dir=DIR and / or data.latent_cache_dir=DIR: where the prompts' "
                            "embeddings and the images' latents go")
        if a.processes < 1:
            raise UserError(f"--processes {a.processes}: must be at least 1")
        spec = METHODS[cfg.method_name].spec(cfg.method, "lora")
        cfg.student = "lora"  # the encoders do not depend on the student; a full copy would only cost memory
        models = build_models(cfg, spec)
        source = build_source(cfg.data, models.resolution, is_embedded_teacher(cfg.teacher), spec.needs_images)
        prompts, index = run_samples(cfg, source, a.processes)
        lines = [fill_prompts(models.encoders, prompts)] if cfg.data.text_cache_dir else []
        if cfg.data.latent_cache_dir:
            if not spec.needs_images:
                raise UserError(f"{cfg.method_name} trains from prompts alone: it reads no image latents")
            lines.append(fill_latents(models.encoders, source, index))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


def fill_prompts(enc, prompts: list[str]) -> str:  # noqa: ANN001 (Encoders)
    todo = [q for q in prompts if not enc.store.has(q)]
    t0 = time.perf_counter()
    for i in range(0, len(todo), 256):  # bounded memory: the rows go to disk, the memory cache stays small
        enc.encode_rows(todo[i: i + 256])
    dt = time.perf_counter() - t0
    return (f"{len(prompts)} distinct prompts, {len(todo)} encoded in {dt:.1f} s ({dt / max(len(todo), 1) * 1e3:.1f}"
            f" ms each, batch {enc.encode_batch}) into {enc.store.root}")


def fill_latents(enc, source, index: list[int]) -> str:  # noqa: ANN001 (Encoders, data.Source)
    todo = [i for i in index if not enc.latent_store.has(str(i))]
    t0 = time.perf_counter()
    for i in todo:
        enc.stored_posterior([i], source.image)
    dt = time.perf_counter() - t0
    return (f"{len(index)} distinct images, {len(todo)} encoded in {dt:.1f} s ({dt / max(len(todo), 1) * 1e3:.1f} "
            f"ms each) into {enc.latent_store.root}")


if __name__ == "__main__":
    sys.exit(main())
