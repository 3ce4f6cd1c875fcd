"""The teacher's reference table: DDIM at several step counts, best guidance, three seed sets (mean ± std).

    python -m eval --teacher-only [--teacher embedded] [--teacher-steps 1 2 4 25] [--guidance-grid 1.5 2 3 5]
        [--num-images 2000] [--seed-sets 3] [--out reports/teacher_table]
    python -m eval.teacher_table [same options]      # the same, --teacher-only implied

Per step count the guidance is picked on the first seed set (FID-minimising over the grid); the other seed sets
(seeds shifted by 1e6 and 2e6, same prompts) are evaluated at that guidance. Every (steps, guidance, seed set) is
cached under the teacher's weights hash, so a rerun or a later ``python -m eval --runs ...`` with the same settings
does not regenerate.
"""

from __future__ import annotations

import statistics
import sys
from typing import Any

from .generate import Context, Row, best_teacher_rows, evaluate_row, with_seed_offset

AGGREGATED = ("fid", "fid_torchmetrics", "clip", "accuracy", "diversity", "latency_ms", "images_per_s")


def _mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
    v = [x for x in values if x is not None]
    if not v:
        return None, None
    return statistics.fmean(v), (statistics.stdev(v) if len(v) > 1 else 0.0)


def teacher_table(ctx: Context, steps: list[int], grid: list[float], seed_sets: int = 3,
                  offset: int = 1_000_000) -> list[dict[str, Any]]:
    """One entry per step count: best guidance, per-seed-set rows, mean and std of each metric (sample std)."""
    out = []
    for s in steps:
        (best,), every = best_teacher_rows(ctx, [s], grid)
        g = best["guidance"]
        per_set = [best] + [evaluate_row(ctx, Row("teacher", "teacher", s, g, method="ddim"),
                                         es=with_seed_offset(ctx.es, k * offset)) for k in range(1, seed_sets)]
        entry: dict[str, Any] = {"steps": s, "guidance": g, "nfe": best["nfe"], "n": best["n"],
                                 "grid_fid": {str(r["guidance"]): r["fid"] for r in every},
                                 "seed_offsets": [k * offset for k in range(seed_sets)],
                                 "per_seed_set": [{k: v for k, v in r.items() if k != "grid"} for r in per_set],
                                 "grid": best["grid"], "label": f"teacher {s} steps (w={g:g})"}
        for k in AGGREGATED:
            entry[f"{k}_mean"], entry[f"{k}_std"] = _mean_std([r.get(k) for r in per_set])
        out.append(entry)
    return out


def main(argv: list[str] | None = None) -> int:
    from .__main__ import main as eval_main

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--teacher-only" not in argv:
        argv.append("--teacher-only")
    return eval_main(argv)


if __name__ == "__main__":
    sys.exit(main())
