"""What a LoRA student's forward with gradient keeps for its backward, and what it costs, per ``lora_merge`` mode.

    python -m benchmarks.lora_backward [--batch 32] [--repeats 5] [--threads 1] [--teacher embedded]

On the teacher's denoiser with a rank-16 LoRA on the default targets, one student forward + backward at ``--batch``
(the student's turn of a training step, without the method's arithmetic): the bytes autograd saves for the backward
(parameters are shared, not copies, and left out) and the median wall time over interleaved repeats, for
``lora_merge=off`` (peft's wrappers) and ``always`` (merged forward, factored backward,
``distill_diffusion.lora_merge``). The whole training step is ``benchmarks.train_step``'s.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from distill_diffusion.models import Models, resolve_teacher
from distill_diffusion.provenance import command_line

MODES = ("off", "always")


def build(teacher: str, mode: str) -> Models:
    torch.manual_seed(0)
    return Models(resolve_teacher(teacher), "lora", roles=("student",), lora_rank=16, lora_alpha=16, lora_merge=mode)


def forward_backward(m: Models, xt: torch.Tensor, t: torch.Tensor, cond) -> int:
    """One student forward + backward; the bytes saved for the backward (non-parameter tensors)."""
    params = {p.data_ptr() for p in m.denoiser.parameters()}
    saved = 0

    def pack(x: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        if x.data_ptr() not in params:
            saved += x.numel() * x.element_size()
        return x

    with m.trainable("student"), torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        m.net_out("student", xt, t, cond).square().mean().backward()
    for p in m.parameters("student"):
        p.grad = None
    return saved


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.lora_backward")
    ap.add_argument("--teacher", default="embedded")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    models = {mode: build(a.teacher, mode) for mode in MODES}
    m0 = models[MODES[0]]
    g = torch.Generator().manual_seed(0)
    xt = torch.randn(a.batch, *m0.latent_shape, generator=g)
    t = torch.randint(0, m0.num_train_timesteps, (a.batch,), generator=g)
    cond = m0.encode_prompts([f"a photo of item {i % 10}" for i in range(a.batch)])
    saved = {mode: forward_backward(m, xt, t, cond) for mode, m in models.items()}  # also the warm-up
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    for _ in range(a.repeats):
        for mode, m in models.items():
            t0 = time.perf_counter()
            forward_backward(m, xt, t, cond)
            times[mode].append(time.perf_counter() - t0)
    print(f"# {command_line('python -m benchmarks.lora_backward', argv)}")
    print(f"{a.teacher} teacher, LoRA rank 16, batch {a.batch}, {a.threads} thread(s), median of {a.repeats}")
    print("| lora_merge | saved for backward MB | forward + backward ms |")
    print("|---|---|---|")
    for mode in MODES:
        print(f"| {mode} | {saved[mode] / 2**20:.1f} | {1e3 * statistics.median(times[mode]):.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
