"""Encode every prompt a training run will draw, once, into an on-disk store that the run then reads.

    python -m distill_diffusion.precompute --method M [--config FILE] data.text_cache_dir=DIR [--processes W]
        [key=value ...]

The same arguments as ``train.py`` (plus ``data.text_cache_dir``): the prompts are those of the run's keyed stream
for steps 0 .. max_steps - 1 over ``W`` processes (empty-prompt drops included), encoded
``data.text_encode_batch`` at a time. The usual practice for teachers whose text encoders cost more than a training
step (SD3 / FLUX with T5-XXL): afterwards ``train.py ... data.text_cache_dir=DIR`` never runs an encoder for those
prompts, and a second precompute over the same store encodes nothing.
"""

from __future__ import annotations

import argparse
import sys
import time

from .errors import UserError


def run_prompts(cfg, processes: int) -> list[str]:  # noqa: ANN001 (an OmegaConf TrainConfig)
    """The distinct prompts of steps 0 .. max_steps - 1 on ``processes`` ranks, in first-use order: a one-rank
    stream with a ``processes``-fold batch covers every rank's global sample indices."""
    from .artifacts import is_embedded_teacher
    from .data import Stream, build_source

    source = build_source(cfg.data, cfg.resolution or 0, is_embedded_teacher(cfg.teacher), needs_images=False)
    stream = Stream(source, cfg.seed, cfg.batch_size * processes, accum=cfg.gradient_accumulation_steps,
                    empty_prompt_prob=cfg.data.empty_prompt_prob, load_images=False)
    return list(dict.fromkeys(q for s in stream.batches(0, cfg.max_steps) for q in s.prompts))


def main(argv: list[str] | None = None) -> int:
    from methods import METHODS

    from .config import parse_config
    from .models import build_models

    ap = argparse.ArgumentParser(prog="python -m distill_diffusion.precompute", add_help=False)
    ap.add_argument("--processes", type=int, default=1, help="training processes the store is made for")
    a, rest = ap.parse_known_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg, _ = parse_config(rest, METHODS)
        if not cfg.data.text_cache_dir:
            raise UserError("set data.text_cache_dir=DIR: the folder the prompts' embeddings go to")
        if a.processes < 1:
            raise UserError(f"--processes {a.processes}: must be at least 1")
        prompts = run_prompts(cfg, a.processes)
        cfg.student = "lora"  # the encoders do not depend on the student; a full copy would only cost memory
        models = build_models(cfg, METHODS[cfg.method_name].spec(cfg.method, "lora"))
        enc = models.encoders
        todo = [q for q in prompts if enc.store.get(q) is None]
        t0 = time.perf_counter()
        for i in range(0, len(todo), 256):  # bounded memory: the rows go to disk, the memory cache stays small
            enc.encode_rows(todo[i: i + 256])
        dt = time.perf_counter() - t0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{len(prompts)} distinct prompts, {len(todo)} encoded in {dt:.1f} s "
          f"({dt / max(len(todo), 1) * 1e3:.1f} ms each, batch {cfg.data.text_encode_batch}) into "
          f"{cfg.data.text_cache_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
