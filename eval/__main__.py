"""``python -m eval``: compare the teacher and distilled students on the same prompts and seeds, write a report.

    python -m eval --runs runs/dmd2 runs/lcm [--teacher PATH_OR_ID] [--teacher-steps 1 2 4 25]
        [--teacher-guidance G | --guidance-grid 1.5 2 3 5] [--prompts FILE] [--reference DIR_OR_STATS]
        [--num-images 2000] [--seed 0] [--batch-size 64] [--hybrid] [--features auto|evaluator|inception]
        [--inception-weights FILE] [--clip PATH] [--out reports/NAME] [--config configs/eval/x.yaml]
    python -m eval --teacher-only [--teacher ...] [...]     # the teacher's table over three seed sets

With no --prompts/--reference on the embedded teacher, the prompts are captions of the Fashion-MNIST test labels and
the reference is the test images. Bad input: one line ``error: ...`` on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

from distill_diffusion.errors import UserError
from distill_diffusion.provenance import command_line

DEFAULT_TEACHER_STEPS = [1, 2, 4, 25]
DEFAULT_GUIDANCE = 2.5  # the embedded teacher's best is low (≈2-3, diffusers convention); --guidance-grid searches
DEFAULT_GRID = [1.5, 2.0, 3.0, 5.0]
SEED_SET_OFFSET = 1_000_000  # --teacher-only: seed sets seed, seed + 1e6, seed + 2e6


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit code 2 (argparse prints usage + message)
        raise UserError(message)


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="python -m eval", description=__doc__.split("\n\n")[0],
                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="+", default=[], metavar="RUN", help="run folders (train.py's output_dir), or "
                    "checkpoint folders (RUN/checkpoints/checkpoint-N: exported once into the cache, row RUN_atN)")
    ap.add_argument("--teacher", default=None, help="teacher folder or hub id (default: the runs' teacher, or "
                    "'embedded' with --teacher-only)")
    ap.add_argument("--teacher-steps", nargs="+", type=int, default=None, metavar="N",
                    help=f"the teacher's DDIM step counts (default {DEFAULT_TEACHER_STEPS})")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--teacher-guidance", type=float, default=None, metavar="G",
                   help=f"the teacher's CFG scale, diffusers convention (default {DEFAULT_GUIDANCE})")
    g.add_argument("--guidance-grid", nargs="+", type=float, default=None, metavar="G",
                   help="pick the teacher's FID-minimising guidance per step count from these")
    ap.add_argument("--prompts", default=None, help="prompt file, one a line")
    ap.add_argument("--seeds-per-prompt", type=int, default=1, metavar="K",
                    help="with --prompts: each prompt K times with different seeds (diversity needs K >= 2)")
    ap.add_argument("--reference", default=None, help="a folder of reference images or a clean-fid .npz (mu, sigma)")
    ap.add_argument("--num-images", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    ap.add_argument("--batch-size", type=int, default=64, help="generation batch (latency is per image at it)")
    ap.add_argument("--image-size", type=int, default=None, help="resize generated images to this many pixels "
                    "before scoring (the published COCO protocol: 256)")
    ap.add_argument("--update-cards", action="store_true",
                    help="write each scored run's rows (with the teacher's) into its eval.md and model card")
    ap.add_argument("--hybrid", action="store_true", help="add rows where the teacher takes the first step")
    ap.add_argument("--features", default="auto", choices=["auto", "evaluator", "inception"])
    ap.add_argument("--inception-weights", default=None, metavar="FILE", help="clean-fid's inception-2015-12-05.pt")
    ap.add_argument("--evaluator", default=None, metavar="DIR", help="the domain evaluator (default: the shipped "
                    "distill_diffusion/assets/fmnist_evaluator)")
    ap.add_argument("--clip", default=None, metavar="PATH", help="an OpenAI CLIP folder for CLIP score "
                    "(default: the evaluator)")
    ap.add_argument("--fashion-mnist", default=None, metavar="DIR", help="folder of the Fashion-MNIST IDX files")
    ap.add_argument("--out", default=None, help="report folder (default reports/<time>)")
    ap.add_argument("--cache-dir", default=None, help="teacher and reference cache (default "
                    "$DISTILL_CACHE/eval or ~/.cache/distill-diffusion/eval)")
    ap.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's; on a shared "
                    "machine 1 avoids oversubscription)")
    ap.add_argument("--teacher-only", action="store_true", help="only the teacher's table: --teacher-steps at the "
                    "best guidance of the grid, over three seed sets (mean ± std)")
    ap.add_argument("--seed-sets", type=int, default=3, help="--teacher-only: number of seed sets")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    ap.add_argument("--config", default=None, help="YAML of option values (keys as the long options, - or _)")
    return ap


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = build_parser()
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    if known.config:
        ap.set_defaults(**load_config(known.config, ap))
    return ap.parse_args(argv)


def load_config(path: str, ap: argparse.ArgumentParser) -> dict[str, Any]:
    """A YAML of option values; unknown keys are an error (one line naming them)."""
    from omegaconf import OmegaConf

    p = Path(path)
    if not p.is_file():
        raise UserError(f"config {path!r} does not exist")
    try:
        data = OmegaConf.to_container(OmegaConf.load(p), resolve=True) or {}
    except Exception as e:
        raise UserError(f"{path} is not valid YAML ({type(e).__name__})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} must be a mapping of option: value")
    dests = {a.dest for a in ap._actions}
    out = {k.replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(out) - dests - {"config"})
    if unknown:
        raise UserError(f"{path}: unknown option(s) {', '.join(unknown)}")
    return out


def check_args(a: argparse.Namespace) -> None:
    if not a.runs and not a.teacher_only:
        raise UserError("no runs: pass --runs RUN [RUN ...] (train.py output folders) or --teacher-only")
    for name in ("num_images", "batch_size", "seeds_per_prompt", "seed_sets", "threads"):
        if getattr(a, name) is not None and getattr(a, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1")
    if a.teacher_steps is not None and min(a.teacher_steps) < 1:
        raise UserError("--teacher-steps must be >= 1")
    if a.image_size is not None and a.image_size < 8:
        raise UserError("--image-size must be >= 8")
    if a.teacher_guidance is not None and a.guidance_grid is not None:
        raise UserError("give --teacher-guidance or --guidance-grid, not both")
    for g in [a.teacher_guidance] + (a.guidance_grid or []):
        if g is not None and g < 0:
            raise UserError("guidance scales must be >= 0 (diffusers convention: 1 = no guidance)")


def cache_dir_of(a: argparse.Namespace) -> Path | None:
    from .generate import default_cache_dir

    return None if a.no_cache else (Path(a.cache_dir).expanduser() if a.cache_dir else default_cache_dir())


def resolve_runs(a: argparse.Namespace) -> tuple[list[dict[str, Any]], str]:
    """Read every run's sampling.json (UserError if missing) and settle the teacher. A checkpoint folder in
    ``--runs`` is exported first and scored as ``<run>_at<step>`` (:mod:`eval.checkpoints`)."""
    from distill_diffusion.artifacts import check_run, check_teacher, teacher_ref, weights_hash

    from .checkpoints import as_run, is_checkpoint

    runs = []
    for given in a.runs:
        d = as_run(given, cache_dir_of(a)) if is_checkpoint(given) else given
        runs.append({"dir": d, "info": check_run(d), "checkpoint": given if d != given else None})
    teacher = a.teacher
    if teacher is None:
        refs = {r["info"].get("teacher", "embedded") for r in runs}
        if len(refs) > 1:
            raise UserError(f"the runs were distilled from different teachers ({', '.join(sorted(refs))}); "
                            "evaluate them separately or pass --teacher")
        teacher = refs.pop() if refs else "embedded"
    check_teacher(teacher)
    th = weights_hash(teacher)
    for r in runs:
        rh = r["info"].get("teacher_hash")
        if rh and rh != th:
            raise UserError(f"{r['dir']} was distilled from {r['info'].get('teacher')} (weights {rh}), not from "
                            f"--teacher {teacher_ref(teacher)} (weights {th})")
    return runs, teacher


def unique_names(dirs: list[str]) -> list[str]:
    """Row labels: each run folder's name as given (a symlinked run keeps its link's name), numbered if repeated."""
    names = [Path(os.path.abspath(d)).name or "run" for d in dirs]
    out = []
    for i, n in enumerate(names):
        out.append(n if names.count(n) == 1 else f"{n}#{names[:i + 1].count(n)}")
    return out


def build_context(a: argparse.Namespace, teacher: str) -> Any:
    """Eval set, reference statistics, features, CLIP and zero-shot models; all input checks before heavy work."""
    import torch

    from distill_diffusion.artifacts import is_embedded_teacher, weights_hash

    from . import generate, metrics

    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    embedded = is_embedded_teacher(teacher)
    n = a.num_images
    if a.prompts:
        es = generate.file_eval_set(a.prompts, n, a.seed, a.seeds_per_prompt)
    elif embedded:
        es = None  # built below, after the reference count check gives a clear message
    else:
        raise UserError(f"--prompts FILE is needed for teacher {teacher!r} (the Fashion-MNIST captions only suit "
                        "the embedded teacher)")
    if a.reference:
        p = Path(a.reference).expanduser()
        if p.is_dir():
            ref = metrics.Reference("folder", str(p))
        elif p.is_file() and p.suffix == ".npz":
            ref = metrics.Reference("stats", str(p))
        else:
            raise UserError(f"--reference {a.reference!r} is neither a folder of images nor a .npz of statistics")
    elif embedded:
        ref = metrics.Reference("fmnist")
    else:
        ref = None
    if ref is not None:
        count = metrics.reference_count(ref, a.fashion_mnist)
        if count is not None and count < n:
            raise UserError(f"the reference ({ref.describe()}) has {count} images, fewer than --num-images {n}")
    if es is None:
        es = generate.fmnist_eval_set(n, a.seed, a.fashion_mnist)
    evaluator = Path(a.evaluator).expanduser() if a.evaluator else metrics.EMBEDDED_EVALUATOR
    if a.evaluator and not evaluator.is_dir():
        raise UserError(f"--evaluator {a.evaluator!r} does not exist")
    cache_dir = cache_dir_of(a)
    fm = metrics.select_features(a.features, evaluator if evaluator.is_dir() else None, a.inception_weights,
                                 cache_dir).to(device)
    ev_clip = metrics.load_clip(None, evaluator) if evaluator.is_dir() else None
    clip = metrics.load_clip(a.clip, None) if a.clip else ev_clip
    if clip is not None:
        clip.model.to(device)
    zero_shot = metrics.ZeroShot(ev_clip) if ev_clip is not None and all(x is not None for x in es.labels) else None
    ref_stats = metrics.reference_stats(ref, fm, cache_dir, device, a.batch_size, a.fashion_mnist,
                                        not a.quiet) if ref is not None else None
    return generate.Context(es=es, ref=ref_stats, fm=fm, clip=clip, zero_shot=zero_shot, teacher_ref=teacher,
                            teacher_hash=weights_hash(teacher), batch_size=a.batch_size, device=device,
                            image_size=a.image_size, cache_dir=cache_dir, progress=not a.quiet)


def set_teacher_sampling(ctx: Any, teacher: str, runs: list[dict[str, Any]]) -> None:
    """The teacher rows' sampler and image side, which also key its cache: the teacher's own flow scheduler for a
    flow teacher (from its configs, or from its runs), DDIM for a VP one; the runs' training resolution, left out
    when it is the teacher's own, so ``--teacher-only`` and ``--runs`` reports share their teacher rows."""
    from distill_diffusion.artifacts import teacher_facts

    kind, native = teacher_facts(teacher)
    resolutions = {r["info"].get("resolution") for r in runs} - {None}
    res = resolutions.pop() if len(resolutions) == 1 else None
    ctx.teacher_resolution = None if res == native else res
    if kind == "flow" or any(r["info"].get("schedule") == "flow" for r in runs):
        ctx.teacher_sampler = "FlowMatchEulerDiscreteScheduler (the teacher's own flow schedule)"


def run(a: argparse.Namespace, argv: list[str]) -> Path:
    from datetime import datetime

    from . import generate, report

    check_args(a)
    if a.threads is not None:
        import torch

        torch.set_num_threads(a.threads)
    runs, teacher = resolve_runs(a)
    ctx = build_context(a, teacher)
    set_teacher_sampling(ctx, teacher, runs)
    out = Path(a.out or f"reports/{datetime.now():%Y%m%d-%H%M%S}")
    steps = a.teacher_steps or DEFAULT_TEACHER_STEPS
    grid = a.guidance_grid or [a.teacher_guidance if a.teacher_guidance is not None else DEFAULT_GUIDANCE]
    meta = report.meta(a, command_line("python -m eval", argv), ctx, teacher, grid)
    if a.teacher_only:
        from .teacher_table import teacher_table

        rows = teacher_table(ctx, steps, grid, a.seed_sets, SEED_SET_OFFSET)
        report.write_teacher_table(out, rows, meta)
        print(f"teacher table written to {out}/report.md", file=sys.stderr)
        return out
    best, every = generate.best_teacher_rows(ctx, steps, grid)
    rows = list(best)
    ref_teacher = max(best, key=lambda r: r["steps"])
    hybrid_g = a.teacher_guidance if a.teacher_guidance is not None else ref_teacher["guidance"]
    from distill_diffusion.artifacts import SAMPLING_FILE, list_students, load_student, read_run_info

    skipped = []
    names = unique_names([r["dir"] for r in runs])
    for r, name in zip(runs, names):
        pipe = load_student(r["dir"], device=ctx.device)
        method = r["info"].get("method")
        for s in sorted(r["info"]["steps"]):
            rows.append(generate.evaluate_row(ctx, generate.Row(name, "student", s, None, r["dir"], method), pipe))
        if a.hybrid:
            for s in sorted(r["info"]["steps"]):
                if s < 2:
                    skipped.append(f"{name} at 1 step: a hybrid needs >= 2 steps (the teacher takes the first)")
                    continue
                row = generate.Row(f"{name}+teacher-first", "hybrid", s, hybrid_g, r["dir"], method)
                rows.append(generate.evaluate_row(ctx, row, pipe))
        del pipe
        # Students a run exported on the way (TSCD's stages: sampling_student_S4.json next to student_S4/).
        for extra in [f for f in list_students(r["dir"]) if f != SAMPLING_FILE]:
            stage = load_student(r["dir"], device=ctx.device, sampling_file=extra)
            label = f"{name}/{Path(extra).stem.removeprefix('sampling_')}"
            for s in sorted(stage.distill.steps):
                rows.append(generate.evaluate_row(ctx, generate.Row(label, "student", s, None, r["dir"], method),
                                                  stage))
            del stage
    for r in rows:
        r["speedup"] = ref_teacher["latency_ms"] / r["latency_ms"] if r["latency_ms"] else None
    meta["reference_teacher_row"] = {"steps": ref_teacher["steps"], "guidance": ref_teacher["guidance"]}
    # Which runs this report scored, and how far each was trained (0: an untrained export_initial baseline).
    meta["runs"] = [{"dir": r["dir"], "method": r["info"].get("method"), "trained_steps": r["info"].get("step"),
                     "teacher_hash": r["info"].get("teacher_hash"), "run_info": read_run_info(r["dir"]),
                     "checkpoint": r["checkpoint"], "averaged_steps": r["info"].get("averaged_steps")}
                    for r in runs]
    meta["notes"] = averaged_notes(runs, names) + skipped
    report.write(out, rows, every, meta)
    print(f"report written to {out}/report.md", file=sys.stderr)
    if a.update_cards:
        update_cards(runs, rows, meta, out)
    return out


def averaged_notes(runs: list[dict[str, Any]], names: list[str]) -> list[str]:
    """What a row's label does not say: which students are the average of several checkpoints (``export_average``,
    recorded as ``averaged_steps`` in their sampling.json)."""
    from distill_diffusion.artifacts import averaged_weights

    return [f"{name}: weights are {w}" for r, name in zip(runs, names) if (w := averaged_weights(r["info"]))]


def update_cards(runs: list[dict[str, Any]], rows: list[dict[str, Any]], meta: dict[str, Any], out: Path) -> None:
    """Each run's rows of this report, beside the teacher's, as its eval summary (shown in its model card)."""
    from distill_diffusion.artifacts import attach_eval

    from . import report

    teacher = [r for r in rows if r["kind"] == "teacher"]
    for r in runs:
        mine = [x for x in rows if x["kind"] != "teacher" and x.get("run") == r["dir"]]
        text = (f"From `{meta['command']}` ({meta['prompts']['n']} images; full report: `{out}/report.md`):\n\n"
                + report.table(teacher + mine, meta) + "\n")
        attach_eval(r["dir"], text)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        a = parse_args(argv)
        run(a, argv)
    except UserError as e:
        print(f"error: {str(e).splitlines()[0] if str(e) else 'bad input'}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
