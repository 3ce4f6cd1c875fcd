"""How fast is this CPU, against the slow machine class our budgets are set for?

``python -m benchmarks.machine`` times a 1024×1024 float32 matmul on one torch thread (the median of several runs)
and prints its GFLOP/s and the ratio to the reference machine: 2 cores of an AMD EPYC with AVX2 and no AVX-512,
measured at 12–15 GFLOP/s a thread (we take the midpoint, 13.5). A wall time measured here, multiplied by that
ratio, estimates the same command's wall time on the reference machine. The ratio is only a guide for
matmul-bound work (UNet forwards and backwards); Python overhead scales less.

``python -m benchmarks.machine --hold SECONDS`` instead keeps one core busy with one-thread 1024² matmuls for that
long: the "another job on the second core" under which the test command's time is budgeted, made repeatable.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from distill_diffusion.provenance import cpu_name

REFERENCE_GFLOPS = 13.5  # AMD EPYC, AVX2, no AVX-512; 12-15 GFLOP/s on one thread


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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.machine", description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON line instead of text")
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
    if args.json:
        print(json.dumps(info))
    else:
        print(f"{info['cpu']}: 1024x1024 float32 matmul {info['matmul_gflops_1thread']} GFLOP/s on one thread; "
              f"the reference machine (AVX2, {REFERENCE_GFLOPS} GFLOP/s) is about "
              f"{info['reference_slowdown']}x slower for matmul-bound work")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
