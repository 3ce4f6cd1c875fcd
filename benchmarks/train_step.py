"""Time one method's training step on a teacher, split by phase, in a process of its own (so peak RSS is its own).

    python -m benchmarks.train_step --method dmd2 --student lora --steps 30 --warmup 5 --json out.json [key=value ...]

Runs the real loop (``distill_diffusion.loop.train``) for ``--steps`` steps with the method's embedded-default
config, and times, for the steps after ``--warmup``:
  teacher / student / critic / target forward: ``Models.net_out_at`` (``net_out`` calls it) by the role it runs
  (with or without autograd; sCM's JVP counts as a student forward),
  encoders: prompt, unconditional and image encoding (``Models.encode_*``),
  optimizer: ``torch.optim.AdamW.step``,
  backward and the rest: the step's wall time minus the above (autograd, the method's own arithmetic, the loop).
Step time is the median of the per-step wall times the loop logs (``logging_steps=1``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

PHASES = ("teacher forward", "student forward", "critic forward", "target forward", "encoders", "optimizer")


class PhaseClock:
    """Wall time per phase, counted only while ``on`` (after the warm-up steps)."""

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self.on = False
        self.depth = 0  # nested timed calls (net_out inside encode_images) count once, in the outer phase

    @contextlib.contextmanager
    def time(self, phase: str) -> Any:
        if not self.on or self.depth:
            self.depth += 1
            try:
                yield
            finally:
                self.depth -= 1
            return
        self.depth += 1
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] += time.perf_counter() - t0
            self.depth -= 1


def _phase_of(role: str) -> str:
    if role == "teacher":
        return "teacher forward"
    if role == "student":
        return "student forward"
    if role == "critic":
        return "critic forward"
    return "target forward"  # EMA / target networks (LCM's target, TSCD's)


def instrument(clock: PhaseClock, method_cls: type, warmup: int) -> Any:
    """Wrap the library's calls with the clock (class-level); returns a function that undoes it."""
    from distill_diffusion import loop
    from distill_diffusion.models import Models

    saved = [(owner, name, owner.__dict__.get(name)) for owner, name in (
        (Models, "net_out_at"), (Models, "encode_prompts"), (Models, "encode_uncond"), (Models, "encode_images"),
        (torch.optim.AdamW, "step"), (loop.Stream, "get"))]
    saved.append((method_cls, "loss", method_cls.__dict__.get("loss")))

    def wrap(owner: Any, name: str, phase_fn: Any) -> None:
        fn = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            with clock.time(phase_fn(args, kwargs)):
                return fn(*args, **kwargs)

        setattr(owner, name, timed)

    wrap(Models, "net_out_at", lambda a, k: _phase_of(a[1] if len(a) > 1 else k["role"]))
    for name in ("encode_prompts", "encode_uncond", "encode_images"):
        wrap(Models, name, lambda a, k: "encoders")
    wrap(torch.optim.AdamW, "step", lambda a, k: "optimizer")
    loss = method_cls.loss

    def loss_with_step(self: Any, role: str, batch: Any, step: int) -> Any:
        clock.on = step >= warmup
        return loss(self, role, batch, step)

    method_cls.loss = loss_with_step
    # make_batch (prompt and image encoding) runs before the step's first loss: switch the clock on there too.
    stream_get = loop.Stream.get

    def get(self: Any, step: int, micro: int) -> Any:
        clock.on = step >= warmup
        return stream_get(self, step, micro)

    loop.Stream.get = get

    def undo() -> None:
        for owner, name, fn in saved:
            if fn is None:  # was inherited: drop the wrapper, the base class's method shows through again
                delattr(owner, name)
            else:
                setattr(owner, name, fn)

    return undo


def run(method: str, student: str, steps: int, warmup: int, overrides: list[str], out_dir: Path) -> dict[str, Any]:
    from distill_diffusion.config import parse_config
    from distill_diffusion.loop import train
    from methods import METHODS

    clock = PhaseClock()
    undo = instrument(clock, METHODS[method], warmup)
    argv = ["--method", method, f"student={student}", f"max_steps={steps}", "logging_steps=1",
            f"checkpointing_steps={steps + 1}", "report_to=none", f"output_dir={out_dir}", "validation_seeds=1",
            *overrides]
    cfg, _ = parse_config(argv, METHODS)
    t0 = time.perf_counter()
    try:
        train(cfg, METHODS[method])
    finally:
        undo()
    wall = time.perf_counter() - t0
    logged = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    per_step = [r["sec_per_step"] for r in logged if r["step"] > warmup]
    n = len(per_step)
    phases = {k: v / n for k, v in clock.seconds.items()}
    median = statistics.median(per_step)
    phases["backward and the rest"] = max(0.0, statistics.fmean(per_step) - sum(phases.values()))
    mem = json.loads((out_dir / "memory.json").read_text())
    return {"method": method, "student": student, "steps": steps, "warmup": warmup, "timed_steps": n,
            "sec_per_step_median": median, "sec_per_step_mean": statistics.fmean(per_step),
            "steps_per_s": 1.0 / median, "phase_sec_per_step": phases, "memory": mem, "wall_s": wall,
            "batch_size": cfg.batch_size, "overrides": overrides, "torch_threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.train_step")
    ap.add_argument("--method", required=True)
    ap.add_argument("--student", default="lora", choices=["lora", "full"])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--json", required=True)
    ap.add_argument("overrides", nargs="*", help="key=value for train.py")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        res = run(a.method, a.student, a.steps, a.warmup, a.overrides, Path(tmp) / "run")
    Path(a.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
