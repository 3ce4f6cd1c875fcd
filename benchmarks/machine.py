"""How fast is this CPU, against the slow machine class our budgets are set for?

``python -m benchmarks.machine`` times a 1024×1024 float32 matmul on one torch thread (the median of several runs)
and prints its GFLOP/s and the ratio to the reference machine: 2 cores of an AMD EPYC with AVX2 and no AVX-512,
measured at 12–15 GFLOP/s a thread (we take the midpoint, 13.5). A wall time measured here, multiplied by that
ratio, estimates the same command's wall time on the reference machine. The ratio is only a guide for
matmul-bound work (UNet forwards and backwards); Python overhead scales less.

``python -m benchmarks.machine --step-json BENCHMARKS.json`` also prints a second ratio, for work like this project's
(small networks, where Python and small kernels weigh as much as matmul peak): the diffusers LCM-LoRA script's
float32 step, which issue 23 measured on the reference machine (3.44 s/step, ``benchmarks.reference_lcm --repeats 1
--short 5 --long 20``), against the same program's step in that JSON's ``reference`` section (measured here by
``benchmarks.reference_lcm``). A fixed program on both machines, so the ratio is the machines' alone.

``python -m benchmarks.machine --hold SECONDS`` instead keeps one core busy with one-thread 1024² matmuls for that
long: the "another job on the second core" under which the test command's time is budgeted, made repeatable.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from distill_diffusion.provenance import cpu_name

REFERENCE_GFLOPS = 13.5  # AMD EPYC, AVX2, no AVX-512; 12-15 GFLOP/s on one thread
REFERENCE_SCRIPT_STEP = 3.44  # s/step of diffusers' LCM-LoRA script in float32 there (issue 23)


def matmul_gflops(n: int = 1024, repeats: int = 7) -> float:
    """Median float32 GFLOP/s of an n×n matmul on one torch thread (the thread count is restored)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        g = torch.Generator().manual_seed(0)
        a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
        a @ b  # warm-up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    return 2 * n**3 / statistics.median(times) / 1e9


def hold_core(seconds: float, n: int = 1024) -> int:
    """One torch thread of back-to-back n×n matmuls for ``seconds``; returns how many ran."""
    import torch

    torch.set_num_threads(1)
    a = torch.randn(n, n, generator=torch.Generator().manual_seed(0))
    end, count = time.monotonic() + seconds, 0
    while time.monotonic() < end:
        a = (a @ a).tanh()  # tanh keeps the values bounded, so the loop never reaches inf
        count += 1
    return count


def machine_info() -> dict[str, object]:
    """CPU name, one-thread matmul rate and the slowdown factor a reference machine would show."""
    rate = matmul_gflops()
    return {"cpu": cpu_name(), "matmul_gflops_1thread": round(rate, 1), "reference_gflops": REFERENCE_GFLOPS,
            "reference_slowdown": round(rate / REFERENCE_GFLOPS, 2)}


def script_step_ratio(path: str) -> dict[str, object]:
    """The reference machine's script step over this machine's, from a benchmarks.reference_lcm JSON section."""
    ref = json.loads(Path(path).read_text())["reference"]
    here = ref["summary"]["median"]["ref_autocast_off"]
    return {"script_step_here": round(here, 3), "script_step_reference": REFERENCE_SCRIPT_STEP,
            "script_step_slowdown": round(REFERENCE_SCRIPT_STEP / here, 2), "script_step_measured": ref["date"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.machine", description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON line instead of text")
    ap.add_argument("--step-json", default=None, metavar="FILE",
                    help="a JSON with benchmarks.reference_lcm's section (BENCHMARKS.json): also the script-step ratio")
    ap.add_argument("--hold", type=float, default=None, metavar="SECONDS",
                    help="keep one core busy with matmuls for SECONDS (a stand-in for another job), then exit")
    args = ap.parse_args(argv)
    if args.hold is not None:
        if args.hold <= 0:
            print(f"error: --hold {args.hold}: give a positive number of seconds", file=sys.stderr)
            return 2
        hold_core(args.hold)
        return 0
    info = machine_info()
    if args.step_json:
        try:
            info.update(script_step_ratio(args.step_json))
        except (OSError, ValueError, KeyError, TypeError) as e:
            print(f"error: --step-json {args.step_json}: no benchmarks.reference_lcm section with the script's float32 "
                  f"step ({type(e).__name__}: {e})", file=sys.stderr)
            return 2
    if args.json:
        print(json.dumps(info))
    else:
        print(f"{info['cpu']}: 1024x1024 float32 matmul {info['matmul_gflops_1thread']} GFLOP/s on one thread; "
              f"the reference machine (AVX2, {REFERENCE_GFLOPS} GFLOP/s) is about "
              f"{info['reference_slowdown']}x slower for matmul-bound work")
        if "script_step_slowdown" in info:
            print(f"diffusers' LCM-LoRA script, float32 step: {info['script_step_here']} s here "
                  f"({info['script_step_measured']}), {REFERENCE_SCRIPT_STEP} s on the reference machine: about "
                  f"{info['script_step_slowdown']}x slower for small-network work like this project's tests")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
