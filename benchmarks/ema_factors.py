"""Does an EMA of LoRA factors track the EMA of the weight update they make? (issue 21, item 4)

    python -m benchmarks.ema_factors [--method lcm] [--steps 200] [--decays 0.95 0.99 0.999] [--threads 1]
        [key=value ...]

An EMA adapter (the EMA student of ``ema_decay``, and LCM's / TSCD's ``lora_ema_target``) averages the factors:
EMA(B) · EMA(A), which is not EMA(B · A). This trains a LoRA student on the embedded teacher through the real loop
(``train.py``'s ``train``; ``ema_decay`` is set so that the loop updates an EMA target after every student step) and,
after each of those steps, reads every LoRA layer's A and B. Per decay μ it keeps EMA(A), EMA(B) and EMA(B·A), all
started where the adapters start (B = 0), and prints, summed over layers in the Frobenius norm:

- gap: ‖EMA(B)·EMA(A) − EMA(B·A)‖ / ‖EMA(B·A)‖, how far the factor-wise average is from the average of the update;
- lag: ‖B·A − EMA(B·A)‖ / ‖EMA(B·A)‖, how far the average of the update is from the current update (what an EMA is
  for); a gap well below the lag means the factor-wise average is a small perturbation of the EMA's own smoothing.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from typing import Any

import torch

from distill_diffusion.provenance import command_line


def lora_pairs(net: torch.nn.Module, adapter: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(A, B) weights of ``adapter`` in every LoRA layer of ``net``, as matrices: A (r, in·k·k), B (out, r)."""
    out = []
    for m in net.modules():
        a, b = getattr(m, "lora_A", None), getattr(m, "lora_B", None)
        if isinstance(a, torch.nn.ModuleDict) and adapter in a:
            out.append((a[adapter].weight.detach().flatten(1), b[adapter].weight.detach().flatten(1)))
    return out


class FactorEMAs:
    """Per decay: EMA(A), EMA(B) and EMA(B·A) of every layer, started at the first observed factors."""

    def __init__(self, decays: list[float]) -> None:
        self.decays = decays
        self.state: dict[float, list[list[torch.Tensor]]] | None = None
        self.last: list[tuple[torch.Tensor, torch.Tensor]] = []

    def observe(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.last = [(a.clone(), b.clone()) for a, b in pairs]
        if self.state is None:
            self.state = {d: [[a.clone(), b.clone(), b @ a] for a, b in pairs] for d in self.decays}
            return
        for d, layers in self.state.items():
            for (a, b), (ea, eb, eba) in zip(pairs, layers):
                ea.lerp_(a, 1 - d)
                eb.lerp_(b, 1 - d)
                eba.lerp_(b @ a, 1 - d)

    def figures(self) -> dict[float, dict[str, float]]:
        """{decay: {"gap": ..., "lag": ...}} as defined in the module docstring."""
        out = {}
        for d, layers in (self.state or {}).items():
            ref = sum(float(eba.norm() ** 2) for _, _, eba in layers) ** 0.5
            gap = sum(float((eb @ ea - eba).norm() ** 2) for ea, eb, eba in layers) ** 0.5
            lag = sum(float((b @ a - eba).norm() ** 2) for (a, b), (_, _, eba) in zip(self.last, layers)) ** 0.5
            out[d] = {"gap": gap / ref, "lag": lag / ref}
        return out


def run(method: str, steps: int, decays: list[float], overrides: list[str]) -> dict[float, dict[str, float]]:
    from distill_diffusion import models as models_mod
    from distill_diffusion.config import parse_config
    from distill_diffusion.loop import STUDENT_EMA, train
    from methods import METHODS

    emas = FactorEMAs(decays)
    original = models_mod.Models.update_target

    def update_target(self: Any, name: str) -> None:
        original(self, name)
        if name == STUDENT_EMA:  # once per student update: read the factors the student now has
            emas.observe(lora_pairs(self.denoiser, "student"))

    with tempfile.TemporaryDirectory() as out:
        cfg, _ = parse_config(["--method", method, "student=lora", "ema_decay=0.999", f"max_steps={steps}",
                               f"output_dir={out}/run", "report_to=none", "validation_seeds=0",
                               f"checkpointing_steps={steps + 1}", *overrides], METHODS)
        models_mod.Models.update_target = update_target
        try:
            train(cfg, METHODS[method])
        finally:
            models_mod.Models.update_target = original
    return emas.figures()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.ema_factors", description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="lcm")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--decays", type=float, nargs="+", default=[0.95, 0.99, 0.999])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("overrides", nargs="*", help="key=value for train.py")
    a = ap.parse_args(argv)
    if a.steps < 2 or not all(0 < d < 1 for d in a.decays):
        print("error: --steps must be >= 2 and every --decays value in (0, 1)", file=sys.stderr)
        return 2
    torch.set_num_threads(a.threads)
    figs = run(a.method, a.steps, a.decays, a.overrides)
    cmd = command_line("python -m benchmarks.ema_factors", argv)
    print(f"`{cmd}`: {a.method} LoRA student, {a.steps} steps, factors read after every student update\n")
    print("| decay | gap ‖EMA(B)EMA(A) − EMA(BA)‖ / ‖EMA(BA)‖ | lag ‖BA − EMA(BA)‖ / ‖EMA(BA)‖ |\n|---|---|---|")
    for d, f in figs.items():
        print(f"| {d} | {f['gap']:.4f} | {f['lag']:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
